"""Runs one request's `model.generate` on its own thread and streams its text to asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from llava_worker.errors import GenerationError, OutOfMemoryError
from llava_worker.inputs import PreparedInputs
from llava_worker.loader import LoadedModel
from llava_worker.protocol import GenerateParams
from llava_worker.text import TextAccumulator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationOutput:
    """A snapshot of one request's progress; `text` is the generated text visible so far."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    """None while running; then `stop` (stop string or end of sequence), `length` or `cancelled`."""
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class _OutputSlot:
    """Latest output of a generation, handed from its thread to one asyncio reader.

    Only the newest snapshot is kept, so a slow reader never makes the generation thread wait and
    never piles up stale copies of the text; it just gets fewer, longer steps.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._latest = GenerationOutput()
        self._changed = asyncio.Event()

    def publish(self, output: GenerationOutput) -> None:
        """Called from the generation thread."""
        with self._lock:
            self._latest = output
        # A closed event loop means the server is gone and nobody is reading.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._changed.set)

    async def next(self) -> GenerationOutput:
        await self._changed.wait()
        self._changed.clear()
        with self._lock:
            return self._latest


class _Cancelled(StoppingCriteria):
    """Ends `generate` after the current token once the flag is set (cancel or stop string)."""

    def __init__(self, flag: threading.Event) -> None:
        self._flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = torch.full((input_ids.shape[0],), self._flag.is_set(), dtype=torch.bool, device=input_ids.device)
        return done  # type: ignore[return-value]


class _TokenStreamer(BaseStreamer):
    """Receives each new token from `generate` and publishes text every `interval` tokens."""

    def __init__(
        self, accumulator: TextAccumulator, slot: _OutputSlot, interval: int, stop_flag: threading.Event
    ) -> None:
        self._accumulator = accumulator
        self._slot = slot
        self._interval = interval
        self._stop_flag = stop_flag
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # generate() first hands over the prompt itself
            return
        self._accumulator.add(value.reshape(-1).tolist())
        if self._accumulator.stopped:
            self._stop_flag.set()
        elif self._accumulator.token_count % self._interval == 0:
            self._slot.publish(
                GenerationOutput(text=self._accumulator.visible_text(), completion_tokens=self._accumulator.token_count)
            )

    def end(self) -> None:
        pass  # the thread publishes the final output itself, once it knows how generation ended


class Generation:
    """One running generation; iterate `outputs()` for its progress, `cancel()` to stop it early.

    `on_done` runs on the event loop with the final output once the thread has really finished.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        inputs: PreparedInputs,
        params: GenerateParams,
        max_new_tokens: int,
        stream_interval: int,
        on_done: Callable[[GenerationOutput], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._slot = _OutputSlot(self._loop)
        self._stop_flag = threading.Event()
        self._cancelled = threading.Event()
        self._on_done = on_done
        self._accumulator = TextAccumulator(loaded.tokenizer, params.stop)
        self._max_new_tokens = max_new_tokens
        self._kwargs = _generate_kwargs(loaded, inputs, params, max_new_tokens)
        self._kwargs["streamer"] = _TokenStreamer(self._accumulator, self._slot, stream_interval, self._stop_flag)
        self._kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(self._stop_flag)])
        self._model: Any = loaded.model
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Stops generating after the current token; safe from any thread, any number of times."""
        self._cancelled.set()
        self._stop_flag.set()

    async def outputs(self) -> AsyncIterator[GenerationOutput]:
        """Snapshots until (and including) the final one, which has a finish reason or an error."""
        while True:
            output = await self._slot.next()
            yield output
            if output.finished:
                return

    def _run(self) -> None:
        final = GenerationOutput()
        try:
            with torch.inference_mode():
                self._model.generate(**self._kwargs)
            text = self._accumulator.final_text()
            tokens = self._accumulator.token_count
            if self._accumulator.stopped:
                reason = "stop"
            elif self._cancelled.is_set():
                reason = "cancelled"
            elif tokens >= self._max_new_tokens:
                reason = "length"
            else:
                reason = "stop"
            final = GenerationOutput(text=text, completion_tokens=tokens, finish_reason=reason)
        except torch.cuda.OutOfMemoryError:
            # Free the cached blocks now so the next request does not inherit a full device.
            torch.cuda.empty_cache()
            final = self._failed(OutOfMemoryError("the GPU ran out of memory while generating"))
        except Exception as exc:
            logger.exception("generation thread failed")
            final = self._failed(GenerationError(f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            try:
                self._slot.publish(final)
            finally:
                with contextlib.suppress(RuntimeError):  # event loop closed during shutdown
                    self._loop.call_soon_threadsafe(self._on_done, final)

    def _failed(self, error: BaseException) -> GenerationOutput:
        return GenerationOutput(completion_tokens=self._accumulator.token_count, error=error)


def _generate_kwargs(
    loaded: LoadedModel, inputs: PreparedInputs, params: GenerateParams, max_new_tokens: int
) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {
        **inputs.tensors,
        "max_new_tokens": max_new_tokens,
        "use_cache": True,
        "pad_token_id": pad_token_id,
    }
    if params.greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
    return kwargs
