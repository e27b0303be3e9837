"""Runs the worker's HTTP server and turns SIGTERM/SIGINT into a graceful drain and a clean exit."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from llava_worker.http.app import create_app
from llava_worker.http.connections import ConnectionRules, connection_cap, guarded_protocol

if TYPE_CHECKING:
    from llava_worker.worker import ModelWorker

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains the worker before the server stops.

    uvicorn alone would stop at once and then re-raise the signal, so the process would not exit 0
    and streams in flight would be cut. Here: stop admitting, let running requests finish within
    the grace period (then cancel them with an error chunk), stop heartbeats, then shut down.
    A second signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, worker: ModelWorker, grace: float) -> None:
        super().__init__(config)
        self._worker = worker
        self._grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in `_captured_signals`: uvicorn would re-raise it after shutdown.
        if self._draining is not None or self._loop is None:
            logger.warning("second signal %s: stopping now", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        logger.info("received %s: draining before shutdown", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._worker.drain(self._grace)
        finally:
            self.should_exit = True


def server_config(worker: ModelWorker, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `worker`: its app, and the connection rules of its flags."""
    config = worker.config
    rules = ConnectionRules(connection_cap(config.max_connections), config.header_timeout)
    return uvicorn.Config(
        create_app(worker),
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(rules),
        timeout_keep_alive=config.keep_alive_timeout,
        # uvicorn's lines go through the worker's own handlers: one format, --log-file, the repeat limit.
        log_config=None,
    )


def serve(worker: ModelWorker) -> None:
    """Serves `worker` until SIGTERM/SIGINT, then drains it; returns normally (exit status 0)."""
    config = worker.config
    DrainingServer(server_config(worker, config.host, config.port), worker, config.shutdown_grace).run()
