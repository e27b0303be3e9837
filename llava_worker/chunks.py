"""StreamChunk: one step of a request's answer as the worker hands it to the HTTP edge."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamChunk:
    """One step of a request's answer: the text so far (the prompt too when echoed), cumulative."""

    text: str
    completion_tokens: int = 0
    finish_reason: str | None = None
    """None while running; then `stop`, `length`, `cancelled` or `exceeds_context`."""
    prompt_tokens: int = 0
    error_code: int = 0
    """With finish reason `error`: the protocol's error code (1, or FastChat's 42903 when overloaded)."""


#: Yielded while the request waits for a slot; each dialect sends it as bytes its clients skip.
KEEPALIVE = StreamChunk("")
