"""One `python -m llava_worker` process (the tiny LLaVA-1.5) under what an exposed worker meets: rounds
of large images, a flood of idle connections past its open-file limit, and a few thousand mixed
requests (good, bad, huge, images, disconnects, cancels, slow clients). It serves on throughout, its
log stays short, and its memory, threads, descriptors and queue come back to where they were."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from llava_worker.host_memory import TRIM_AFTER_IDLE
from tests.support.payloads import PROMPT_1, TEXT_PROMPT, encode_image, greedy
from tests.support.processes import WorkerProcess
from tests.support.servers import wait_until

pytestmark = pytest.mark.subprocess

#: The worker's open-file limit: low, so that the descriptor flood reaches it.
OPEN_FILES = 128
#: What memory may stay above the idle worker's after large requests (allocator slack, caches).
RSS_SLACK_MB = 150
#: Requests of the mixed soak, and the seconds it may take at most.
SOAK_REQUESTS = 3000
SOAK_WITHIN = 240.0


@dataclass(frozen=True)
class Vitals:
    rss_mb: int
    threads: int
    fds: int


def vitals(pid: int) -> Vitals:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return Vitals(
        rss_mb=int(fields["VmRSS"].split()[0]) // 1024,
        threads=int(fields["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


@pytest.fixture(scope="module")
def worker(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    args = [
        "--device", "cpu", "--no-register", "--model-path", str(checkpoints["llava-1.5"]),
        "--header-timeout", "1", "--body-timeout", "2", "--max-request-bytes", str(48 << 20),
        "--max-images", "8", "--max-request-pixels", "100000000", "--limit-model-concurrency", "4",
    ]  # fmt: skip
    process = WorkerProcess(args, tmp_path_factory.mktemp("soak"), open_files=OPEN_FILES)
    try:
        yield process.wait_ready()
    finally:
        process.kill()


def post(worker: WorkerProcess, path: str, payload: Any, timeout: float = 60) -> requests.Response:
    return requests.post(worker.url + path, json=payload, timeout=timeout)


def served(worker: WorkerProcess) -> bool:
    answer = post(worker, "/worker_generate_stream", greedy(TEXT_PROMPT, max_new_tokens=4))
    chunks = [json.loads(chunk) for chunk in answer.content.split(b"\0") if chunk]
    return answer.status_code == 200 and chunks[-1]["error_code"] == 0


def settle(worker: WorkerProcess, within: float = 20.0) -> Vitals:
    """The worker's vitals once its queue is empty and they stop changing (the idle trim included)."""
    wait_until(lambda: worker.status()["queue_length"] == 0, within, "the queue to empty")
    time.sleep(TRIM_AFTER_IDLE + 1.0)  # the worker gives memory back once it has been idle that long
    before = vitals(worker.process.pid)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = vitals(worker.process.pid)
        if abs(now.rss_mb - before.rss_mb) < 5 and now.fds == before.fds:
            return now
        before = now
    return before


def noise_jpeg(seed: int, width: int, height: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=50)
    return base64.b64encode(buffer.getvalue()).decode()


def test_memory_goes_back_after_rounds_of_large_images(worker: WorkerProcess) -> None:
    assert post(worker, "/worker_generate", greedy(PROMPT_1, [encode_image(1)], max_new_tokens=2)).ok
    baseline = settle(worker)
    large = [noise_jpeg(seed, 3000 + 37 * seed, 2000 + 11 * seed) for seed in range(6)]
    payload = greedy("USER: " + "<image>\n" * len(large) + "What are these? ASSISTANT:", large, max_new_tokens=2)
    peak = baseline.rss_mb
    for _ in range(2):
        with ThreadPoolExecutor(2) as clients:
            answers = list(clients.map(lambda _: post(worker, "/worker_generate", payload), range(2)))
            peak = max(peak, vitals(worker.process.pid).rss_mb)
        assert all(a.json()["error_code"] == 0 for a in answers), [a.text[:200] for a in answers]
        peak = max(peak, vitals(worker.process.pid).rss_mb)
        after = settle(worker)
        assert after.rss_mb <= baseline.rss_mb + RSS_SLACK_MB, f"{after.rss_mb} MB after, {baseline.rss_mb} MB before"
    assert peak > baseline.rss_mb + 2 * RSS_SLACK_MB, "the large images should have cost memory while they ran"


def test_a_flood_of_idle_connections_neither_stops_the_worker_nor_floods_its_log(worker: WorkerProcess) -> None:
    baseline = settle(worker)
    log_lines = len(worker.stderr().splitlines())
    host, port = worker.url.removeprefix("http://").split(":")
    flood: list[socket.socket] = []
    try:
        for _ in range(2 * OPEN_FILES):  # twice what the worker could ever hold
            try:
                flood.append(socket.create_connection((host, int(port)), timeout=5))
            except OSError:
                break
        # The idle ones are closed after the header timeout (1 s); the worker answers again soon after.
        wait_until(lambda: _answers_health(worker), 15, "the worker to answer during the flood", interval=0.2)
        assert served(worker)
    finally:
        for connection in flood:
            connection.close()
    assert len(flood) > OPEN_FILES
    added = worker.stderr().splitlines()[log_lines:]
    assert len(added) < 120, "\n".join(added[:40])
    assert settle(worker).fds <= baseline.fds + 2


def _answers_health(worker: WorkerProcess) -> bool:
    try:
        return requests.get(worker.url + "/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


# The mixed soak: each kind of client is a function that makes one request and says what it got.


def good_text(worker: WorkerProcess, rng: random.Random) -> int:
    answer = post(worker, "/worker_generate_stream", greedy(TEXT_PROMPT, max_new_tokens=rng.randint(1, 6)))
    assert b'"error_code": 0' in answer.content.rsplit(b"\0", 2)[-2]
    return answer.status_code


def good_image(worker: WorkerProcess, rng: random.Random) -> int:
    payload = greedy(PROMPT_1, [encode_image(rng.randint(1, 4))], max_new_tokens=3)
    answer = post(worker, "/worker_generate", payload)
    assert answer.json()["error_code"] == 0, answer.text[:200]
    return answer.status_code


BAD_BODIES: list[bytes] = [
    b"{not json",
    b"[]",
    b'{"prompt": 3}',
    json.dumps(greedy(PROMPT_1, ["bm90IGFuIGltYWdl"])).encode(),  # base64 of text, not of an image
    json.dumps(greedy(TEXT_PROMPT, [encode_image(1)])).encode(),  # an image and no placeholder
    json.dumps(greedy(TEXT_PROMPT, stop=["x"] * 100)).encode(),  # too many stop strings
    json.dumps(greedy(TEXT_PROMPT, max_new_tokens=-1)).encode(),
    b'{"prompt": "' + b"[" * 10_000 + b'"}',
    b"[" * 100_000,
]


def bad_request(worker: WorkerProcess, rng: random.Random) -> int:
    path = rng.choice(["/worker_generate_stream", "/worker_generate", "/count_token", "/v1/chat/completions"])
    answer = requests.post(worker.url + path, data=rng.choice(BAD_BODIES), timeout=30)
    assert answer.status_code < 500 or answer.status_code == 503, answer.text[:200]
    return answer.status_code


def huge_body(worker: WorkerProcess, rng: random.Random) -> int:
    try:
        answer = requests.post(worker.url + "/worker_generate_stream", data=b"x" * (49 << 20), timeout=60)
    except requests.ConnectionError:
        return 0  # refused from its declared length, and closed while the client was still sending
    assert b"larger than" in answer.content, answer.content[:200]
    return answer.status_code


def leaves_mid_stream(worker: WorkerProcess, rng: random.Random) -> int:
    with requests.post(
        worker.url + "/worker_generate_stream", json=greedy(TEXT_PROMPT, max_new_tokens=200), stream=True, timeout=30
    ) as answer:
        next(answer.iter_content(64))
        return answer.status_code  # and the connection closes unread


def cancels_openai_stream(worker: WorkerProcess, rng: random.Random) -> int:
    payload: dict[str, Any] = {
        "model": model_name(worker),
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 200,
    }
    with requests.post(
        worker.url + "/v1/chat/completions", json={**payload, "stream": True}, stream=True, timeout=30
    ) as answer:
        next(answer.iter_lines())
        return answer.status_code


@functools.cache
def model_name(worker: WorkerProcess) -> str:
    return str(requests.get(worker.url + "/v1/models", timeout=10).json()["data"][0]["id"])


def slow_headers(worker: WorkerProcess, rng: random.Random) -> int:
    host, port = worker.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        began = time.monotonic()
        try:
            for byte in b"POST /worker_get_status HTTP/1.1\r\n":
                connection.sendall(bytes([byte]))
                time.sleep(0.1)
            assert connection.recv(100) == b"", "closed by the worker, without an answer"
        except ConnectionResetError:
            pass
        except BrokenPipeError:
            pass
        assert time.monotonic() - began < 6
        return 0


def light_routes(worker: WorkerProcess, rng: random.Random) -> int:
    path, payload = rng.choice(
        [("/worker_get_status", None), ("/count_token", {"prompt": "Hello there"}), ("/model_details", None)]
    )
    answer = post(worker, path, payload, timeout=10)
    assert answer.status_code == 200
    return answer.status_code


#: Kinds of client with their share of the requests.
MIX: list[tuple[Callable[[WorkerProcess, random.Random], int], int]] = [
    (good_text, 30),
    (good_image, 10),
    (bad_request, 30),
    (light_routes, 20),
    (leaves_mid_stream, 4),
    (cancels_openai_stream, 4),
    (huge_body, 1),
    (slow_headers, 1),
]


def run_mix(worker: WorkerProcess, count: int, seed: int, within: float) -> dict[str, int]:
    kinds = [kind for kind, share in MIX for _ in range(share)]
    plan = [random.Random(seed + n).choice(kinds) for n in range(count)]
    done: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + within

    def one(n: int) -> None:
        if time.monotonic() > deadline:
            return
        kind = plan[n]
        kind(worker, random.Random(seed * 7919 + n))
        with lock:
            done[kind.__name__] = done.get(kind.__name__, 0) + 1

    with ThreadPoolExecutor(12) as clients:
        for future in [clients.submit(one, n) for n in range(count)]:
            future.result()
    return done


def test_a_few_thousand_mixed_requests_leave_nothing_behind(worker: WorkerProcess) -> None:
    run_mix(worker, 150, seed=1, within=60)  # every pool and cache reaches its working size
    baseline = settle(worker)
    log_lines = len(worker.stderr().splitlines())
    began = time.monotonic()
    done = run_mix(worker, SOAK_REQUESTS, seed=2, within=SOAK_WITHIN)
    took = time.monotonic() - began
    assert sum(done.values()) == SOAK_REQUESTS, f"only {done} in {took:.0f} s"
    assert served(worker)
    after = settle(worker)
    assert worker.status()["queue_length"] == 0
    assert after.fds <= baseline.fds + 2, (baseline, after)
    assert after.threads <= baseline.threads + 2, (baseline, after)
    assert after.rss_mb <= baseline.rss_mb + RSS_SLACK_MB, (baseline, after)
    added = "\n".join(worker.stderr().splitlines()[log_lines:])
    assert "Traceback" not in added and " ERROR " not in added, added[-3000:]
