"""Reads a body (a request's, or a fetched image's), refusing it as soon as it is known to be too large."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import Request

from llava_worker.errors import InvalidRequestError


async def read_limited(
    pieces: AsyncIterator[bytes], declared: str | None, limit: int, too_large: Callable[[str], Exception]
) -> bytes:
    """Joins `pieces`, raising `too_large(detail)` once the declared or counted size passes `limit`."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"of {declared} bytes ")
    body = bytearray()
    async for piece in pieces:
        body += piece
        if len(body) > limit:
            raise too_large("")
    return bytes(body)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed `limit` bytes."""
    return await read_limited(
        request.stream(),
        request.headers.get("content-length"),
        limit,
        lambda size: InvalidRequestError(f"request body {size}is larger than the {limit} bytes accepted"),
    )
