"""AdmissionGate: at most N requests run at once; the others wait in arrival order."""

from __future__ import annotations

import asyncio
from collections import deque


class Slot:
    """A granted place among the running requests; `release()` is idempotent."""

    def __init__(self, gate: AdmissionGate) -> None:
        self._gate: AdmissionGate | None = gate

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._release()


class AdmissionGate:
    """A first-come, first-served counting gate with the counters `queue_length` is made of.

    Written out rather than using asyncio.Semaphore so that order is strictly by arrival and the
    running / waiting figures come from the gate itself.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed: BaseException | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def queue_length(self) -> int:
        """Requests running plus requests waiting, as the controller expects it."""
        return self.running + self.waiting

    async def wait_idle(self) -> None:
        """Returns once no request holds a place."""
        await self._idle.wait()

    def close(self, error: BaseException) -> None:
        """Admits nobody any more: every waiter, and every later `acquire`, raises `error`."""
        self._closed = error
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    async def acquire(self) -> Slot:
        """Waits for a free place; cancelling the wait gives up the place in line."""
        if self._closed is not None:
            raise self._closed
        if self.running < self.limit and not self._waiters:
            self.running += 1
            self._idle.clear()
            return Slot(self)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the place was handed over just as the waiter left: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        return Slot(self)

    def _release(self) -> None:
        # Hand the place straight to the oldest waiter, so `running` never dips below what is in use.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
        if self.running == 0:
            self._idle.set()
