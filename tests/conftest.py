"""Shared fixtures: tiny checkpoints, in-process workers on real loopback HTTP, FastChat's controller."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import uvicorn
from PIL import Image

from llava_worker.config import WorkerConfig
from llava_worker.http.app import create_app
from llava_worker.models.loader import LoadedModel, load_model
from llava_worker.testing.tiny import build_all, make_test_image
from llava_worker.testing.tiny_original import build_original_checkpoints
from llava_worker.worker import ModelWorker

PROMPT_1 = "USER: <image>\nWhat is shown here? ASSISTANT:"
PROMPT_2 = "USER: <image>\nCompare it with <image>\nplease. ASSISTANT:"
TEXT_PROMPT = "USER: Tell me a story about the sea. ASSISTANT:"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def encode_image(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    make_test_image(seed, size).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Polls `condition` for at most `timeout` seconds (bounded, as every loop in the tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = os.environ.get("LLAVA_WORKER_TEST_CHECKPOINTS")
    target = Path(root) if root else tmp_path_factory.mktemp("checkpoints")
    return build_all(target) | build_original_checkpoints(target)


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


@pytest.fixture(scope="session")
def models() -> ModelCache:
    return ModelCache()


class RunningWorker:
    """A ModelWorker served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, worker: ModelWorker, port: int) -> None:
        self.worker = worker
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(worker), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> RunningWorker:
        self._thread.start()
        wait_until(lambda: self._server.started, 20, "the worker's HTTP server to start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)

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


def reference_tokens(loaded: LoadedModel, prompt: str, images: list[str], max_new_tokens: int) -> list[int]:
    """What `model.generate` gives greedily for the same prompt and images, computed in the test."""
    pil = [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in images]
    if loaded.processor is not None:
        # Clients write <image>; a model family with its own marker (InternVL) gets that instead.
        prompt = prompt.replace("<image>", loaded.processor.image_token)
        inputs = loaded.processor(text=[prompt], images=pil or None, return_tensors="pt")
    else:
        inputs = loaded.tokenizer(prompt, return_tensors="pt")
    model: Any = loaded.model
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    tokens: list[int] = output[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens


def reference_text(loaded: LoadedModel, prompt: str, images: list[str], max_new_tokens: int) -> str:
    tokens = reference_tokens(loaded, prompt, images, max_new_tokens)
    return str(loaded.tokenizer.decode(tokens, skip_special_tokens=True))


def greedy(prompt: str, images: list[str] | None = None, max_new_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": "m",
        "prompt": prompt,
        "temperature": 0,
        "max_new_tokens": max_new_tokens,
    }
    if images is not None:
        payload["images"] = images
    payload.update(extra)
    return payload


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
