"""Fixtures: tiny checkpoints, loaded models, in-process workers on real loopback HTTP, FastChat's controller.

Helpers live in `tests/support/`; this file only wires them into pytest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from llava_worker.config import WorkerConfig
from llava_worker.testing.tiny import build_all
from llava_worker.testing.tiny_families import build_family_checkpoints
from llava_worker.testing.tiny_internvl_chat import build_internvl_chat_checkpoints
from llava_worker.testing.tiny_original import build_original_checkpoints
from llava_worker.worker import ModelWorker
from tests.support.servers import Controller, ModelCache, RunningWorker, free_port


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = os.environ.get("LLAVA_WORKER_TEST_CHECKPOINTS")
    target = Path(root) if root else tmp_path_factory.mktemp("checkpoints")
    return (
        build_all(target)
        | build_original_checkpoints(target)
        | build_internvl_chat_checkpoints(target)
        | build_family_checkpoints(target)
    )


@pytest.fixture(scope="session")
def models() -> ModelCache:
    return ModelCache()


@pytest.fixture
def start_worker(checkpoints: dict[str, Path], models: ModelCache) -> Iterator[Callable[..., RunningWorker]]:
    """Starts a worker on a tiny checkpoint: `start_worker("llava-1.5", stream_interval=2, ...)`."""
    running: list[RunningWorker] = []

    def start(kind: str, **settings: Any) -> RunningWorker:
        base = WorkerConfig(model_path=str(checkpoints[kind]), device="cpu", no_register=True)
        config = replace(base, **settings)
        port = free_port()
        if "worker_address" not in settings:
            config = replace(config, worker_address=f"http://127.0.0.1:{port}")
        server = RunningWorker(ModelWorker(config, models.get(config)), port)
        running.append(server.start())
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture
def start_controller(tmp_path: Path) -> Iterator[Callable[..., Controller]]:
    started: list[Controller] = []

    def start(port: int | None = None, launch: bool = True) -> Controller:
        controller = Controller(tmp_path, port)
        started.append(controller)
        return controller.start() if launch else controller

    yield start
    for controller in started:
        controller.stop()
