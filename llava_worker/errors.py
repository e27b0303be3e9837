"""Typed errors of the worker; `server.py` maps every one of them to the wire in one place."""

from __future__ import annotations


class WorkerError(Exception):
    """A failure whose message is fit to show to the user who sent the request."""


class InvalidRequestError(WorkerError):
    """The request body is malformed or a parameter is out of range."""


class ImageError(WorkerError):
    """An image could not be used (undecodable, wrong count, model takes none)."""


class GenerationError(WorkerError):
    """The model failed while generating."""


class OutOfMemoryError(GenerationError):
    """The accelerator ran out of memory; its cache has been freed."""


class StartupError(Exception):
    """The worker cannot start with the given settings; the message is one line for the user."""


def plural(count: int, noun: str) -> str:
    """`1 image`, `2 images`: messages read naturally whatever the count."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
