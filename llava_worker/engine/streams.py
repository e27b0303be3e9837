"""What a request's generation produces, and how it travels from the engine thread to asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationOutput:
    """A snapshot of one request's progress; `text` is the generated text visible so far."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    """None while running; then `stop` (stop string or end of sequence), `length` or `cancelled`."""
    error: BaseException | None = None
    reused_prompt_tokens: int = 0
    """Prompt tokens whose KV states came from the prefix cache (set on the final output)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class RequestStream:
    """Latest output of one request, handed from the engine thread to one asyncio reader.

    Only the newest snapshot is kept, so a slow reader never makes the engine wait and never piles
    up stale copies of the text; it just receives fewer, longer steps.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._latest = GenerationOutput()
        self._changed = asyncio.Event()

    def publish(self, output: GenerationOutput) -> None:
        """Called from the engine thread."""
        with self._lock:
            self._latest = output
        # A closed event loop means the server is gone and nobody is reading.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._changed.set)

    async def outputs(self) -> AsyncIterator[GenerationOutput]:
        """Snapshots until (and including) the final one, which has a finish reason or an error."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            with self._lock:
                output = self._latest
            yield output
            if output.finished:
                return
