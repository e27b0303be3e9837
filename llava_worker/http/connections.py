"""The HTTP/1.1 connection rules uvicorn leaves out: a hard connection cap, a deadline for headers, and
an answer for a client that half-closes its side after sending its request.

uvicorn's own `limit_concurrency` is checked only when a request arrives, so connections that never
send one hold a file descriptor each until the process runs out; and its keep-alive timer is
cancelled by the first byte, so headers sent a byte at a time keep a connection forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from dataclasses import dataclass
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

#: Sent, whole, to a connection past the cap; it is then closed.
_OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: 58\r\n\r\n"
    b"the worker has too many open connections; try again later\n"
)
#: Seconds a refused connection may take to read its 503 before it is closed regardless.
_REFUSAL_LINGER = 0.25
#: After a half-close, the peer is probed at these delays (seconds), then every `probe_interval`.
#: Two writes close together find a peer that closed entirely: the first draws its reset, the
#: second fails on it.
_FIRST_PROBES = (0.05, 0.1)


#: File descriptors kept free of connections: the controller link, remote image fetches, log files.
_FD_RESERVE = 32


def connection_cap(requested: int) -> int:
    """`requested`, or less when the open-file limit could not hold that many connections.

    The soft limit is raised to the hard one first, as servers commonly do. Past the limit, accept()
    fails in a loop that asyncio logs thousands of times a second, and nothing can be answered.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return requested
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64  # no /proc: a generous guess
    room = max(1, soft - in_use - _FD_RESERVE)
    if requested > room:
        logger.warning(
            "--max-connections %d lowered to %d: the open-file limit is %d and %d files are open",
            requested,
            room,
            soft,
            in_use,
        )
        return room
    return requested


@dataclass(frozen=True)
class ConnectionRules:
    max_connections: int
    """Open connections at most; one more is answered 503 and closed at once."""
    header_timeout: float
    """Seconds a request's headers may take, counted from the connection or the request's first byte."""
    probe_interval: float = 1.0
    """Seconds between probes of a half-closed client still waiting for an unstarted answer."""


def guarded_protocol(rules: ConnectionRules) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http` setting, with `rules` applied."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"rules": rules})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the rules of `ConnectionRules`.

    Half-close: `nc -N` and some scripted clients shut their sending side once the request is
    out, and read the answer. uvicorn took that end-of-file for a departure and answered nothing.
    Here the answer is written and the connection closed after it. A client that closed entirely
    looks the same until something is written to it, so while an answer has not started, the
    client is probed with `100 Continue` interim responses (which every HTTP/1.1 client skips);
    once gone, the write fails and the request is cancelled as for any disconnect.
    """

    rules: ClassVar[ConnectionRules]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._probe: asyncio.TimerHandle | None = None
        self._probes_sent = 0
        self._refused = len(self.connections) > self.rules.max_connections
        if self._refused:
            logger.warning(
                "refused a connection: %d open, at most %d", len(self.connections) - 1, self.rules.max_connections
            )
            try:
                transport.write(_OVER_CAPACITY)
                transport.write_eof()
            except OSError:
                transport.close()  # already gone
                return
            self.loop.call_later(_REFUSAL_LINGER, transport.close)
            return
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_deadline, self._probe):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped, so the client's unread request does not turn our close into a reset
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()  # part of the next request's headers is in
        elif self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol allows bool
        cycle = self.cycle
        answering = (
            not self._refused
            and cycle is not None
            and not cycle.response_complete
            and self.conn.their_state is h11.DONE
        )
        if not answering or cycle is None:
            return None  # nothing to answer: asyncio closes the connection
        cycle.keep_alive = False  # nothing more can come: close once the answer is out
        self._schedule_probe()
        return True  # keep our side open for the answer

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.rules.header_timeout, self._headers_overdue)

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.debug("closed a connection whose request headers took over %g s", self.rules.header_timeout)
            self.transport.close()

    def _schedule_probe(self) -> None:
        sent = self._probes_sent
        delay = _FIRST_PROBES[sent] if sent < len(_FIRST_PROBES) else self.rules.probe_interval
        self._probe = self.loop.call_later(delay, self._probe_peer)

    def _probe_peer(self) -> None:
        self._probe = None
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.transport.is_closing():
            return
        if cycle.response_started:
            return  # a started answer is written often enough (tokens, keepalives) to notice a departure
        # Written through h11, so that its state stays right for the final response.
        try:
            interim = self.conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        except h11.LocalProtocolError:
            return
        if interim:
            self.transport.write(interim)
        self._probes_sent += 1
        self._schedule_probe()
