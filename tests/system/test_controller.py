"""The worker against FastChat's real controller: registration, heartbeats, restarts, `no_register`.

Everything is real: the controller is `python -m fastchat.serve.controller` in a subprocess, workers
serve tiny random-weight checkpoints over loopback HTTP. What the controller has *cached* about a
worker (as opposed to what it can re-poll) is read from its own log: `get_worker_address` logs the
queue lengths it dispatches on, which only registration and heartbeats set.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.payloads import PROMPT_1, TEXT_PROMPT, encode_image
from tests.support.servers import Controller, RunningWorker, free_port, stream_chunks, wait_until

#: Every test here runs FastChat's real controller as a process.
pytestmark = pytest.mark.subprocess

#: Long enough (about 1.5 s on the text-only checkpoint here) that several queued ones keep it busy.
LONG_TOKENS = 450
#: A heartbeat interval no test lasts: heartbeats seen during such a test come from requests.
NO_PERIODIC_HEARTBEAT = 120.0
#: A bound for "the worker noticed and registered" (retries run every heartbeat interval here).
REGISTER_WITHIN = 20.0


def payload(prompt: str = TEXT_PROMPT, max_new_tokens: int = 8, images: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "prompt": prompt, "temperature": 0, "max_new_tokens": max_new_tokens}
    if images is not None:
        body["images"] = images
    return body


def assert_served(chunks: list[dict[str, Any]], prompt: str) -> None:
    assert chunks, "the answer had no chunks"
    assert all(chunk["error_code"] == 0 for chunk in chunks), chunks[-1]
    assert all(chunk["text"].startswith(prompt) for chunk in chunks)
    assert len(chunks[-1]["text"]) > len(prompt)


class ControllerLog:
    """The controller's own log (its stdout and stderr, appended across restarts on one port)."""

    def __init__(self, tmp_path: Path, controller: Controller) -> None:
        self.path = tmp_path / f"controller-{controller.port}.out"
        self.controller = controller

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def heartbeats(self, worker_url: str) -> int:
        """Heartbeats the controller accepted from `worker_url` (unknown ones are logged differently)."""
        return len(re.findall(rf"Receive heart beat\. {re.escape(worker_url)}$", self.text(), re.MULTILINE))

    def unknown_heartbeats(self, worker_url: str) -> int:
        """Heartbeats answered `exist: false`."""
        return len(re.findall(rf"Receive unknown heart beat\. {re.escape(worker_url)}$", self.text(), re.MULTILINE))

    def cached_queue_length(self, model: str) -> float:
        """The queue length the controller holds for the one worker serving `model`.

        Asks `/get_worker_address`, which logs the cached figure it dispatches on, then adds 1 to it
        (FastChat's shortest_queue bookkeeping): the next heartbeat overwrites that again.
        """
        pattern = re.compile(r"names: \[[^\]]*\], queue_lens: \[([^\]]*)\], ret:")
        seen = len(pattern.findall(self.text()))
        assert self.controller.worker_address(model), f"the controller knows no worker for {model}"
        found: list[str] = []

        def logged() -> bool:
            found[:] = pattern.findall(self.text())
            return len(found) > seen

        wait_until(logged, 5, "the controller to log its dispatch decision")
        values = [float(v) for v in found[-1].split(",")]
        assert len(values) == 1, f"expected one worker for {model}, the controller has {values}"
        return values[0]


def open_request(base_url: str, body: dict[str, Any]) -> socket.socket:
    """Sends a generate request and returns its connection without reading the answer.

    Sending never waits for the answer (a waiting request gets its headers only once it runs), so
    any number can be queued from the test thread; closing the socket is the client hanging up.
    """
    address = urlsplit(base_url)
    assert address.hostname is not None and address.port is not None
    data = json.dumps(body).encode()
    sock = socket.create_connection((address.hostname, address.port), timeout=10)
    head = (
        f"POST /worker_generate_stream HTTP/1.1\r\nHost: {address.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def hang_up(sockets: list[socket.socket]) -> None:
    """Closes the connections, the latest first, so the waiting requests leave before the running one."""
    for sock in reversed(sockets):
        sock.close()


class _Records(logging.Handler):
    """Keeps every record of the loggers it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def start_registered(
    start_worker: Any, controller: Controller, kind: str = "text-only", **settings: Any
) -> RunningWorker:
    """A worker that registers with `controller`, once the controller lists it."""
    settings.setdefault("heartbeat_interval", 0.5)
    worker: RunningWorker = start_worker(kind, no_register=False, controller_address=controller.url, **settings)
    wait_until(lambda: worker.worker.model_name in controller.list_models(), REGISTER_WITHIN, "registration")
    return worker


def test_registration_address_and_the_controller_proxy(start_worker, start_controller):
    controller = start_controller()
    worker = start_registered(start_worker, controller, "llava-1.5")
    name = worker.worker.model_name
    assert name == "tiny-llava-1.5"
    assert controller.list_models() == [name]
    assert controller.worker_address(name) == worker.url
    # The registration said the model takes images (FastChat keeps the optional "multimodal" flag).
    multimodal = requests.post(controller.url + "/list_multimodal_models", timeout=5).json()["models"]
    assert multimodal == [name]
    # The controller's own status call polls the worker's /worker_get_status.
    status = requests.post(controller.url + "/worker_get_status", timeout=10).json()
    assert status == {"model_names": [name], "speed": 1, "queue_length": 0}

    # FastChat's controller proxies /worker_generate_stream to the worker it picks, chunk by chunk.
    body = payload(PROMPT_1, 8, [encode_image(1)])
    body["model"] = name
    via_controller = stream_chunks(controller.url, body)
    assert_served(via_controller, PROMPT_1)
    # Greedy: the same answer as asked directly (chunk boundaries may differ, the text may not).
    assert via_controller[-1]["text"] == worker.generate(body)[-1]["text"]

    # An unknown model gets the controller's own error, not a hang.
    missing = stream_chunks(controller.url, {**body, "model": "no-such-model"})
    assert missing[0]["error_code"] != 0


def test_periodic_heartbeats_carry_running_plus_waiting(start_worker, start_controller, tmp_path):
    controller = start_controller()
    worker = start_registered(start_worker, controller, heartbeat_interval=0.5, limit_model_concurrency=1)
    name, log = worker.worker.model_name, ControllerLog(tmp_path, controller)
    wait_until(lambda: log.heartbeats(worker.url) >= 2, 10, "periodic heartbeats")

    def heartbeats_after(count: int) -> bool:
        return log.heartbeats(worker.url) >= count

    sockets = [open_request(worker.url, payload(max_new_tokens=LONG_TOKENS)) for _ in range(6)]
    try:
        wait_until(lambda: worker.status()["queue_length"] == 6, 15, "six requests: one running, five waiting")
        upper = worker.status()["queue_length"]
        # Two more heartbeats: the second was certainly built after `upper` was read.
        target = log.heartbeats(worker.url) + 2
        wait_until(lambda: heartbeats_after(target), 5, "two more heartbeats")
        cached = log.cached_queue_length(name)
        lower = worker.status()["queue_length"]
        # Registration said 0 and only one request can run: a figure of 2+ came from a heartbeat
        # that counted the waiting requests. The queue only shrinks here, hence the bracket.
        assert cached >= 2
        assert lower <= cached <= upper
    finally:
        hang_up(sockets)

    # Hung-up requests stop (running one) or leave the line (waiting ones); nothing runs on.
    wait_until(lambda: worker.status()["queue_length"] == 0, 15, "the worker to drop the hung-up requests")
    target = log.heartbeats(worker.url) + 2
    wait_until(lambda: heartbeats_after(target), 5, "two more heartbeats")
    assert log.cached_queue_length(name) == 0


def test_a_heartbeat_goes_out_when_a_request_starts_and_when_it_ends(start_worker, start_controller, tmp_path):
    controller = start_controller()
    worker = start_registered(
        start_worker, controller, heartbeat_interval=NO_PERIODIC_HEARTBEAT, limit_model_concurrency=1
    )
    name, log = worker.worker.model_name, ControllerLog(tmp_path, controller)
    assert log.heartbeats(worker.url) == 0

    answers: list[list[dict[str, Any]]] = []
    clients = [
        threading.Thread(target=lambda: answers.append(worker.generate(payload(max_new_tokens=LONG_TOKENS))))
        for _ in range(2)
    ]
    for client in clients:
        client.start()
    # No periodic heartbeat is due for minutes: this one is the first request starting.
    wait_until(lambda: log.heartbeats(worker.url) >= 1, 10, "a heartbeat as the first request starts")
    assert log.cached_queue_length(name) >= 1  # registration said 0; the start heartbeat says busy
    for client in clients:
        client.join(timeout=60)
        assert not client.is_alive(), "a request did not finish in 60 s"
    assert len(answers) == 2
    for answer in answers:
        assert_served(answer, TEXT_PROMPT)

    wait_until(lambda: worker.status()["queue_length"] == 0, 5, "the worker to be idle")
    time.sleep(1.0)  # a notified heartbeat leaves at once; give it time to land
    # The end heartbeat overwrote both the busy figure and get_worker_address's own +1.
    assert log.cached_queue_length(name) == 0
    assert log.heartbeats(worker.url) >= 2


def test_worker_registers_again_after_the_controller_restarts(start_worker, start_controller):
    controller = start_controller()
    worker = start_registered(start_worker, controller, heartbeat_interval=0.5)
    link = worker.worker.controller
    assert link is not None and link.registered
    name = worker.worker.model_name

    controller.stop()
    wait_until(lambda: not link.registered, 10, "the worker to notice the controller is gone")
    # Meanwhile requests sent straight to the worker are served as usual, without waiting on it.
    for _ in range(3):
        started = time.monotonic()
        assert_served(worker.generate(payload(), timeout=30), TEXT_PROMPT)
        assert time.monotonic() - started < 10
    # The status call races the end of the stream; wait for the request to have left the engine.
    wait_until(lambda: worker.status()["queue_length"] == 0, 5, "the worker to be idle")

    restarted = start_controller(port=controller.port)
    wait_until(lambda: name in restarted.list_models(), REGISTER_WITHIN, "registration with the new controller")
    assert restarted.worker_address(name) == worker.url
    assert link.registered
    body = {**payload(), "model": name}
    assert_served(stream_chunks(restarted.url, body), TEXT_PROMPT)


def test_heartbeat_answered_exist_false_registers_again(start_worker, start_controller, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llava_worker.controller")
    controller = start_controller()
    worker = start_registered(start_worker, controller, heartbeat_interval=NO_PERIODIC_HEARTBEAT)
    name = worker.worker.model_name

    # Restarted while the worker is idle between heartbeats: the worker has not noticed anything.
    controller.stop()
    restarted = start_controller(port=controller.port)
    assert restarted.list_models() == []
    log = ControllerLog(tmp_path, restarted)
    assert log.unknown_heartbeats(worker.url) == 0

    # A request sends a heartbeat; the new controller answers exist: false; the worker registers.
    assert_served(worker.generate(payload()), TEXT_PROMPT)
    wait_until(lambda: name in restarted.list_models(), REGISTER_WITHIN, "registration after exist: false")
    assert log.unknown_heartbeats(worker.url) >= 1
    assert "does not know this worker" in caplog.text
    assert restarted.worker_address(name) == worker.url


def test_worker_starts_while_the_controller_is_down_and_registers_later(start_worker, start_controller):
    port = free_port()
    worker: RunningWorker = start_worker(
        "text-only", no_register=False, controller_address=f"http://127.0.0.1:{port}", heartbeat_interval=0.5
    )
    link = worker.worker.controller
    assert link is not None
    # Serving at once: neither start-up nor requests wait for the absent controller.
    started = time.monotonic()
    assert worker.status()["queue_length"] == 0
    assert_served(worker.generate(payload(), timeout=30), TEXT_PROMPT)
    assert time.monotonic() - started < 10
    assert not link.registered

    controller = start_controller(port=port)
    name = worker.worker.model_name
    wait_until(lambda: name in controller.list_models(), REGISTER_WITHIN, "registration once the controller is up")
    assert link.registered
    assert controller.worker_address(name) == worker.url


def test_no_register_sends_nothing_to_the_controller(start_worker, start_controller, tmp_path):
    controller = start_controller()
    log = ControllerLog(tmp_path, controller)
    silent: RunningWorker = start_worker(
        "text-only", model_name="silent", no_register=True, controller_address=controller.url, heartbeat_interval=0.2
    )
    assert silent.worker.controller is None
    # A registering worker beside it: by the time it has registered and sent a few heartbeats, the
    # silent one has had as long to do the same.
    chatty = start_registered(start_worker, controller, model_name="chatty", heartbeat_interval=0.2)
    assert_served(silent.generate(payload()), TEXT_PROMPT)  # a request would notify a heartbeat
    wait_until(lambda: log.heartbeats(chatty.url) >= 5, 10, "the registering worker's heartbeats")
    assert controller.list_models() == ["chatty"]
    assert silent.url not in log.text()


@pytest.mark.parametrize("address", ["http://127.0.0.1:99999", "http://[::1"])
def test_a_malformed_controller_address_never_ends_the_link(start_worker, caplog, address):
    caplog.set_level(logging.INFO, logger="llava_worker.controller")
    # uvicorn's loggers do not propagate to the root logger caplog listens on.
    uvicorn_errors = _Records()
    logging.getLogger("uvicorn.error").addHandler(uvicorn_errors)
    try:
        worker: RunningWorker = start_worker(
            "text-only", no_register=False, controller_address=address, heartbeat_interval=0.2
        )
        assert_served(worker.generate(payload()), TEXT_PROMPT)
        wait_until(lambda: "will keep retrying" in caplog.text, 5, "the link to say it keeps retrying")
        link = worker.worker.controller
        assert link is not None and not link.registered
        time.sleep(1.0)  # several more attempts, each failing the same way
        assert_served(worker.generate(payload()), TEXT_PROMPT)
        worker.stop()  # the lifespan stops the link: nothing may resurface from it
        assert not worker.running, "the worker did not shut down: its controller link would not stop"
    finally:
        logging.getLogger("uvicorn.error").removeHandler(uvicorn_errors)
    assert [r.getMessage() for r in uvicorn_errors.records if r.levelno >= logging.ERROR] == []
    assert caplog.text.count("will keep retrying") == 1  # said once, not once per attempt
