"""Keeps the worker registered with its controller: registration, heartbeats, re-registration.

Every call runs on one background task with a timeout, so a slow or absent controller never delays
start-up or a request; while the controller is unreachable the task keeps retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import httpx

logger = logging.getLogger(__name__)

#: Longest wait between registration attempts while the controller is unreachable.
MAX_RETRY_INTERVAL = 5.0


class ControllerLink:
    """Registration and heartbeats for one worker.

    `status` is called for the current worker status (the body of `/worker_get_status`).
    """

    def __init__(
        self,
        controller_address: str,
        worker_address: str,
        status: Callable[[], dict[str, Any]],
        *,
        multimodal: bool,
        heartbeat_interval: float,
        timeout: float,
    ) -> None:
        self._controller = controller_address.rstrip("/")
        self._worker_address = worker_address
        self._status = status
        self._multimodal = multimodal
        self._interval = heartbeat_interval
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._reachable: bool | None = None
        self.registered = False
        """Whether the controller currently knows this worker (as far as the last call told)."""

    async def start(self) -> None:
        """Starts the background task; returns at once, without waiting for the controller."""
        self._client = httpx.AsyncClient(timeout=self._timeout)
        self._task = asyncio.create_task(self._run(), name="controller-link")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def notify(self) -> None:
        """Asks for a heartbeat soon (a request started or ended), without waiting for it."""
        self._wake.set()

    async def register(self) -> bool:
        """Registers the worker; True when the controller accepted it."""
        body = {
            "worker_name": self._worker_address,
            "check_heart_beat": True,
            "worker_status": self._status(),
            "multimodal": self._multimodal,
        }
        if await self._post("/register_worker", body) is None:
            return False
        self.registered = True
        logger.info("registered with the controller at %s as %s", self._controller, self._worker_address)
        return True

    async def heartbeat(self) -> bool:
        """Sends one heartbeat, re-registering when the controller has forgotten this worker.

        Returns whether the worker is registered afterwards.
        """
        body = {"worker_name": self._worker_address, "queue_length": self._status()["queue_length"]}
        answer = await self._post("/receive_heart_beat", body)
        if answer is None:
            self.registered = False
            return False
        if isinstance(answer, dict) and answer.get("exist") is False:
            logger.info("the controller does not know this worker (it restarted?); registering again")
            self.registered = False
            return await self.register()
        return True

    async def _run(self) -> None:
        while True:
            if self.registered:
                await self.heartbeat()
            else:
                await self.register()
            if self.registered:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            else:
                # Requests keep notifying; while the controller is away, retry at a steady pace instead.
                await asyncio.sleep(min(self._interval, MAX_RETRY_INTERVAL))
            self._wake.clear()

    async def _post(self, path: str, body: dict[str, Any]) -> Any | None:
        """The decoded answer, or None when the controller could not be reached or refused."""
        assert self._client is not None, "ControllerLink.start() was not called"
        url = self._controller + path
        try:
            response = await self._client.post(url, json=body)
            response.raise_for_status()
            answer = response.json()
        except Exception as exc:
            if _being_cancelled():
                # A connect attempt can turn stop()'s cancellation into an ExceptionGroup of connect
                # errors; swallowing it would leave this task retrying forever and stop() waiting on it.
                raise asyncio.CancelledError() from exc
            # Not only httpx.HTTPError: a malformed address raises httpx.InvalidURL or an ExceptionGroup,
            # which would end the link for good (and resurface from stop()); keep retrying instead.
            if self._reachable is not False:
                logger.warning("controller at %s is unreachable (%s); will keep retrying", url, exc)
            self._reachable = False
            return None
        if self._reachable is False:
            logger.info("controller at %s is reachable again", self._controller)
        self._reachable = True
        # `register_worker` answers JSON null; report success as an empty dict.
        return {} if answer is None else answer


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
