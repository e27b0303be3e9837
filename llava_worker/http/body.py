"""Reads a body (a request's, or a fetched image's), refusing it as soon as it is known to be too large,
and parses a request body without stalling the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi import Request

from llava_worker.errors import InvalidRequestError

T = TypeVar("T")

#: Bodies larger than this are parsed on a thread, so the event loop keeps answering (probes, other
#: streams) meanwhile. A smaller body parses on the loop in at most about 20 ms, however hostile; a
#: typical one, in far less than the 0.1 ms that handing it to a thread costs.
PARSE_OFF_LOOP_BYTES = 256 * 1024


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


async def read_body(request: Request, limit: int, within: float) -> bytes:
    """The request body, refused as soon as it is known to exceed `limit` bytes, or when it has not
    all arrived within `within` seconds (a client trickling it would hold its connection forever)."""
    reading = read_limited(
        request.stream(),
        request.headers.get("content-length"),
        limit,
        lambda size: InvalidRequestError(f"request body {size}is larger than the {limit} bytes accepted"),
    )
    try:
        return await asyncio.wait_for(reading, within)
    except TimeoutError:
        raise InvalidRequestError(f"the request body did not arrive within {within:g} s") from None


async def parse_body(body: bytes, parse: Callable[[bytes], T]) -> T:
    """`parse(body)`, on a thread when the body is large."""
    if len(body) <= PARSE_OFF_LOOP_BYTES:
        return parse(body)
    return await asyncio.to_thread(parse, body)
