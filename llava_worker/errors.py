"""Typed errors of the worker, and the metrics outcome of each; `http/failures.py` puts them on the wire."""

from __future__ import annotations


class WorkerError(Exception):
    """A failure whose message is fit to show to the user who sent the request."""


class InvalidRequestError(WorkerError):
    """The request body is malformed or a parameter is out of range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt cannot fit the model's context, as its length alone proves (it is not tokenized)."""


class InvalidJSONError(InvalidRequestError):
    """The request body is not JSON at all."""


class ImageError(WorkerError):
    """An image could not be used (undecodable, wrong count, model takes none)."""


class GenerationError(WorkerError):
    """The model failed while generating."""


class OutOfMemoryError(GenerationError):
    """The accelerator ran out of memory; its cache has been freed."""


class ShuttingDownError(GenerationError):
    """The worker is draining for shutdown and admits no new work."""

    def __init__(self) -> None:
        super().__init__("the worker is shutting down; send the request again (to another worker)")


class QueueFullError(WorkerError):
    """Too many requests are waiting for a slot; this one is refused rather than queued without end."""

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(
            f"the worker is overloaded: {waiting} requests are already waiting for a slot (at most {limit}, "
            "--max-queue); send the request again later"
        )


class StartupError(Exception):
    """The worker cannot start with the given settings; the message is one line for the user."""


def outcome_of(error: BaseException) -> str:
    """The `outcome` label a request that failed with `error` is counted under in the metrics.

    `rejected`: refused because the worker is draining or its queue is full; `invalid`: the request itself is wrong
    (its body, parameters or images), found before or after it took a slot; `error`: anything else.
    """
    if isinstance(error, (ShuttingDownError, QueueFullError)):
        return "rejected"
    if isinstance(error, (InvalidRequestError, ImageError)):
        return "invalid"
    return "error"


def plural(count: int, noun: str) -> str:
    """`1 image`, `2 images`: messages read naturally whatever the count."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
