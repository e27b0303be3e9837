"""Stops work for a client that has gone: non-streamed answers are awaited only while it is connected."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed its connection before its answer was ready; the work was cancelled."""


def gone_response() -> Response:
    """What a route returns once its client has gone: nobody reads it (nginx's "client closed request")."""
    return Response(status_code=499)


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it as soon as the client disconnects (then raises ClientDisconnected).

    A streamed response notices a disconnect when its next write fails; an answer sent whole
    writes nothing until the end, so without this a gone client would keep its slot and the
    engine busy until its last token.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        # Let the cancellation run its clean-up (the engine drops the request) before answering.
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read already, so the next message the server passes on is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
