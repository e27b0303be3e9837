"""ControllerLink on its own: stop() ends it even when a connect attempt turns the cancellation into
another error (as anyio's happy-eyeballs connect does, raising an ExceptionGroup of connect errors)."""

from __future__ import annotations

import asyncio

import httpx

from llava_worker.controller import ControllerLink


def test_stop_ends_the_link_when_a_connect_attempt_swallows_the_cancellation():
    attempts = 0

    async def connect(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        try:
            await asyncio.sleep(3600)  # a connect attempt in progress
        except asyncio.CancelledError:
            if attempts > 1:
                raise
            # What a task group does when its connect attempts fail while it is being cancelled.
            raise ExceptionGroup("connect failed", [OSError("connection refused")]) from None
        raise AssertionError("unreachable")

    async def scenario() -> bool:
        link = ControllerLink(
            "http://127.0.0.1:9",
            "http://127.0.0.1:8",
            lambda: {"queue_length": 0},
            multimodal=False,
            heartbeat_interval=0.05,
            timeout=5.0,
        )
        await link.start()
        link._client = httpx.AsyncClient(transport=httpx.MockTransport(connect))
        await asyncio.sleep(0.1)  # the first registration is under way
        stopping = asyncio.ensure_future(link.stop())
        stopped, _ = await asyncio.wait({stopping}, timeout=5)
        if not stopped:
            # The link kept retrying; the second attempt takes a cancellation as it is, so this ends it.
            assert link._task is not None
            link._task.cancel()
            await asyncio.wait({stopping}, timeout=5)
        return bool(stopped)

    assert asyncio.run(scenario()), "stop() did not end the link"
    assert attempts == 1
