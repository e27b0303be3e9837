"""Servers and clients on loopback for the tests: in-process workers, FastChat's controller, streaming clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import uvicorn

from llava_worker.config import WorkerConfig
from llava_worker.http.launcher import server_config
from llava_worker.models.loaded import LoadedModel
from llava_worker.models.loader import load_model
from llava_worker.worker import ModelWorker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Polls `condition` for at most `timeout` seconds (bounded, as every loop in the tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class ModelCache:
    """Loads each checkpoint once per session, whatever the worker settings around it."""

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], LoadedModel] = {}

    def get(self, config: WorkerConfig) -> LoadedModel:
        key = (
            config.model_path,
            config.model_base,
            config.vision_tower,
            config.pad_images,
            config.load_8bit,
            config.load_4bit,
        )
        if key not in self._models:
            self._models[key] = load_model(config)
        return self._models[key]


class RunningWorker:
    """A ModelWorker served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, worker: ModelWorker, port: int) -> None:
        self.worker = worker
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        config = server_config(worker, "127.0.0.1", self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> RunningWorker:
        self._thread.start()
        wait_until(lambda: self._server.started, 20, "the worker's HTTP server to start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)

    @property
    def app(self) -> Any:
        """The FastAPI app served."""
        return self._server.config.app

    @property
    def running(self) -> bool:
        """Whether the server thread is still alive (after stop(): it did not shut down in time)."""
        return self._thread.is_alive()

    def generate(self, payload: dict[str, Any], timeout: float = 60) -> list[dict[str, Any]]:
        """Posts a request and returns every chunk of the answer, decoded."""
        return stream_chunks(self.url, payload, timeout)

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = requests.post(self.url + "/worker_get_status", timeout=10).json()
        return answer


def stream_chunks(base_url: str, payload: dict[str, Any], timeout: float = 60) -> list[dict[str, Any]]:
    with requests.post(base_url + "/worker_generate_stream", json=payload, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        return [json.loads(chunk) for chunk in r.iter_lines(delimiter=b"\0") if chunk]


class Controller:
    """FastChat's real controller, as a subprocess on 127.0.0.1."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Controller:
        log = open(self._workdir / f"controller-{self.port}.out", "ab")  # noqa: SIM115 - closed with the process
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastchat.serve.controller",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=self._workdir,  # FastChat writes its log files into the working directory
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._answers, 60, "FastChat's controller to start", interval=0.2)
        return self

    def _answers(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(f"the controller exited with {self._process.returncode}")
        try:
            requests.post(self.url + "/list_models", timeout=2)
        except requests.RequestException:
            return False
        return True

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=15)
        self._process = None

    def list_models(self) -> list[str]:
        try:
            answer = requests.post(self.url + "/list_models", timeout=5).json()
        except requests.RequestException:
            return []
        models: list[str] = answer["models"]
        return models

    def worker_address(self, model: str) -> str:
        address: str = requests.post(self.url + "/get_worker_address", json={"model": model}, timeout=5).json()[
            "address"
        ]
        return address


class StreamingClient(threading.Thread):
    """A client that reads a stream until told to hang up."""

    def __init__(self, url: str, payload: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.payload = url, payload
        self.chunks: list[dict[str, Any]] = []
        self.hang_up = threading.Event()
        self.response: requests.Response | None = None

    def run(self) -> None:
        with requests.post(self.url + "/worker_generate_stream", json=self.payload, stream=True, timeout=60) as r:
            self.response = r
            for chunk in r.iter_lines(delimiter=b"\0"):
                if chunk:
                    self.chunks.append(json.loads(chunk))
                if self.hang_up.is_set():
                    break
        # Leaving the `with` closes the connection: the worker sees a disconnect.


def stream_together(base_url: str, payloads: list[dict[str, Any]], timeout: float = 120) -> list[StreamingClient]:
    """One streaming client per payload, all started at once and each waited for (bounded)."""
    clients = [StreamingClient(base_url, payload) for payload in payloads]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=timeout)
    return clients
