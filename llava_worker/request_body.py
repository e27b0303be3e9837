"""Reads a request body, refusing it as soon as it is known to exceed the size limit."""

from __future__ import annotations

from fastapi import Request

from llava_worker.errors import InvalidRequestError


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidRequestError(f"request body of {declared} bytes is larger than the {limit} bytes accepted")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise InvalidRequestError(f"request body is larger than the {limit} bytes accepted")
    return bytes(body)
