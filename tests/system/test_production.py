"""Production behaviour under load and failure: many clients, hang-ups, a controller restart, signals,
keepalives, and the operability endpoints.

Everything is real and on loopback: in-process workers on uvicorn, FastChat's controller and
`python -m llava_worker` as subprocesses, tiny random-weight checkpoints. Every wait is bounded.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from llava_worker.config import WorkerConfig
from llava_worker.engine.core import _Request
from llava_worker.engine.streams import RequestStream
from llava_worker.models.loaded import LoadedModel
from tests.support.payloads import TEXT_PROMPT, encode_image, greedy
from tests.support.processes import WorkerProcess
from tests.support.reference import reference_text
from tests.support.servers import Controller, ModelCache, RunningWorker, stream_chunks, wait_until

#: Greedy prompts for the text-only checkpoint; none reaches end-of-sequence within 480 tokens.
PROMPTS = [
    TEXT_PROMPT,
    "USER: Hi. ASSISTANT:",
    "USER: Count the stars. ASSISTANT:",
    "USER: What is the capital of France? ASSISTANT:",
    "USER: Describe a quiet forest. ASSISTANT:",
]
#: Close to the text-only checkpoint's 512-token context: about 2 s of decoding on this machine.
LONG_TOKENS = 480


# -- helpers ------------------------------------------------------------------------------------


def text_only(checkpoints: dict[str, Path], models: ModelCache) -> LoadedModel:
    """The text-only checkpoint as loaded in this process (for reference answers)."""
    return models.get(WorkerConfig(model_path=str(checkpoints["text-only"]), device="cpu"))


_REFERENCES: dict[tuple[int, str, int], str] = {}


def expected_text(loaded: LoadedModel, prompt: str, max_new_tokens: int) -> str:
    """The full cumulative text a greedy text-only request must end with (computed once per session)."""
    key = (id(loaded), prompt, max_new_tokens)
    if key not in _REFERENCES:
        _REFERENCES[key] = prompt + reference_text(loaded, prompt, [], max_new_tokens)
    return _REFERENCES[key]


def post_stream(base_url: str, payload: dict[str, Any], timeout: float = 60) -> tuple[int, list[dict[str, Any]]]:
    """HTTP status and decoded chunks of a generate request, whatever the status."""
    with requests.post(base_url + "/worker_generate_stream", json=payload, stream=True, timeout=timeout) as r:
        return r.status_code, [json.loads(chunk) for chunk in r.iter_lines(delimiter=b"\0") if chunk]


def vm_rss_bytes() -> int:
    """This process's resident set size, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            assert unit == "kB"
            return int(value) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


#: Threads of asyncio's default executor (`asyncio.to_thread`), a pool the event loop grows on
#: demand up to a fixed size and then reuses: it may grow past a warm-up, never past this.
EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)


def thread_census() -> tuple[int, int]:
    """(threads outside asyncio's executor pools, threads inside them) in this process."""
    pooled = sum(1 for thread in threading.enumerate() if thread.name.startswith("asyncio_"))
    return threading.active_count() - pooled, pooled


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live(kind: type) -> int:
    """Objects of exactly type `kind` still alive after a full collection."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


def run_threads(threads: list[threading.Thread], timeout: float) -> None:
    """Starts `threads` and waits (at most `timeout` seconds in all) for every one to end."""
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = sum(1 for thread in threads if thread.is_alive())
    assert stuck == 0, f"{stuck} of {len(threads)} client threads were still running after {timeout} s"


class Client(threading.Thread):
    """Reads one stream's JSON chunks, noting when each arrived; with `leave_after`, hangs up after
    that many (leaving the `with` closes the connection: the worker sees a disconnect)."""

    def __init__(self, url: str, payload: dict[str, Any], leave_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.payload, self.leave_after = url, payload, leave_after
        self.chunks: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with requests.post(self.url + "/worker_generate_stream", json=self.payload, stream=True, timeout=60) as r:
                for chunk in r.iter_lines(delimiter=b"\0"):
                    if chunk:
                        self.chunks.append(json.loads(chunk))
                        self.times.append(time.monotonic())
                    if self.leave_after is not None and len(self.chunks) >= self.leave_after:
                        break
        except BaseException as exc:  # reported by the test
            self.error = exc


def metric_values(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`/metrics`, parsed: (sample name, sorted labels) → value."""
    response = requests.get(base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def wait_idle(worker: RunningWorker, timeout: float = 15) -> None:
    gate = worker.worker.gate

    def idle() -> bool:
        return gate.queue_length == 0 and gate.running == 0 and gate.waiting == 0

    wait_until(idle, timeout, "every slot to come back")


# -- 1. many concurrent clients -----------------------------------------------------------------

CLIENTS = 50


def test_200_requests_from_50_concurrent_clients_leave_nothing_behind(start_worker):
    worker: RunningWorker = start_worker("text-only")
    assert worker.worker.config.limit_model_concurrency == 5  # the default limit
    loaded = worker.worker.loaded
    expected = {prompt: expected_text(loaded, prompt, 12) for prompt in PROMPTS}
    wrong: list[str] = []

    def client(index: int, count: int) -> None:
        for turn in range(count):
            prompt = PROMPTS[(index + turn) % len(PROMPTS)]
            try:
                chunks = stream_chunks(worker.url, greedy(prompt, max_new_tokens=12), timeout=60)
            except Exception as exc:
                wrong.append(f"client {index} request {turn}: {exc!r}")
                continue
            final = chunks[-1] if chunks else None
            if final != {"text": expected[prompt], "error_code": 0}:
                wrong.append(f"client {index} request {turn}: {final}")

    def round_of(count: int) -> None:
        run_threads([threading.Thread(target=client, args=(i, count), daemon=True) for i in range(CLIENTS)], 90)

    # Warm-up: the same shape of load, so lazily created threads (the event loop's executor for
    # input preparation), allocator arenas and connection state exist before the baseline.
    round_of(1)
    wait_idle(worker)
    (threads, _), rss, fds = thread_census(), vm_rss_bytes(), open_fds()

    round_of(4)
    assert wrong == [], f"{len(wrong)} of {4 * CLIENTS} requests went wrong, e.g. {wrong[:3]}"
    # The limit held, and the requests did share the decode batch.
    assert worker.worker.engine.peak_batch == 5
    wait_idle(worker)
    assert worker.status()["queue_length"] == 0

    # Nothing per request or per connection outlives it: threads, sockets, engine request state.
    # Every client thread has ended; the worker's own threads (server, engine) are the same few.
    wait_until(lambda: thread_census()[0] <= threads, 10, f"the thread count to return to {threads}")
    assert thread_census()[1] <= EXECUTOR_THREADS
    # (Two descriptors of slack for anything transient; a leaked connection per request would be 200.)
    wait_until(lambda: open_fds() <= fds + 2, 10, f"open file descriptors to return to {fds}")
    assert live(_Request) == 0
    assert live(RequestStream) == 0
    # RSS: the tiny model's per-request state is kilobytes, so this bound is for gross leaks (a
    # retained batch cache or thread per request, an unbounded buffer); below it, allocator noise
    # (glibc arenas of 50 client threads, torch's CPU caching) moves RSS by a few MB either way.
    growth = vm_rss_bytes() - rss
    assert growth < 100 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MB over 200 requests"


# -- 2. clients that hang up mid-stream ---------------------------------------------------------

LEAVERS = 100
LEAVE_AFTER = 3
LEAVER_TOKENS = 400


def test_100_clients_hanging_up_mid_stream_free_every_slot_and_stop_generation(start_worker):
    worker: RunningWorker = start_worker("text-only")
    engine, metrics = worker.worker.engine, worker.worker.metrics
    loaded = worker.worker.loaded
    prompts = PROMPTS[:2]
    expected = {p: expected_text(loaded, p, LEAVER_TOKENS) for p in prompts}
    steps_before = engine.steps
    tokens_before = metrics.generated_tokens._value.get()

    leavers = [
        Client(worker.url, greedy(prompts[i % 2], max_new_tokens=LEAVER_TOKENS), LEAVE_AFTER) for i in range(LEAVERS)
    ]
    run_threads(list(leavers), 90)
    for leaver in leavers:
        assert leaver.error is None, leaver.error
        assert len(leaver.chunks) == LEAVE_AFTER
        full = expected[leaver.payload["prompt"]]
        # What it read before leaving was the right answer, so far.
        assert all(c["error_code"] == 0 and full.startswith(c["text"]) for c in leaver.chunks)

    wait_idle(worker)
    # The engine is idle: no decode step runs for requests whose clients have gone.
    steps_idle = engine.steps
    time.sleep(0.5)
    assert engine.steps == steps_idle, "the engine kept decoding after every client had left"
    # Had they run to the end, 100 x 400 tokens would have been generated (in 8000 batch-of-5
    # steps); hang-ups noticed within a few tokens leave a small fraction of that.
    generated = metrics.generated_tokens._value.get() - tokens_before
    assert generated < LEAVERS * LEAVER_TOKENS / 10, f"{generated} tokens generated for clients that left"
    assert engine.steps - steps_before < LEAVERS * LEAVER_TOKENS / 5 / 10
    assert metrics.requests.labels("cancelled")._value.get() == LEAVERS

    # Served as usual afterwards.
    chunks = worker.generate(greedy(TEXT_PROMPT, max_new_tokens=12))
    assert chunks[-1] == {"text": expected_text(loaded, TEXT_PROMPT, 12), "error_code": 0}
    wait_idle(worker)


# -- 3. the controller dies and comes back ------------------------------------------------------


@pytest.mark.subprocess
def test_requests_survive_a_controller_kill_and_the_worker_registers_again(start_worker, start_controller):
    controller: Controller = start_controller()
    worker: RunningWorker = start_worker(
        "text-only", no_register=False, controller_address=controller.url, heartbeat_interval=0.5
    )
    name, link, loaded = worker.worker.model_name, worker.worker.controller, worker.worker.loaded
    assert link is not None
    wait_until(lambda: name in controller.list_models(), 20, "registration")
    expected_long = {p: expected_text(loaded, p, LONG_TOKENS) for p in PROMPTS[:3]}
    expected_short = expected_text(loaded, TEXT_PROMPT, 12)

    in_flight = [Client(worker.url, greedy(p, max_new_tokens=LONG_TOKENS)) for p in expected_long]
    for client in in_flight:
        client.start()
    wait_until(lambda: all(c.chunks for c in in_flight), 20, "the long requests to be streaming")
    assert worker.worker.gate.running == 3

    process = controller._process
    assert process is not None
    process.kill()  # SIGKILL: no goodbye
    process.wait(timeout=15)
    assert worker.worker.gate.running >= 1, "the controller should die while requests run"
    wait_until(lambda: not link.registered, 10, "the worker to notice the controller is gone")

    # During the outage, requests sent straight to the worker are served, without waiting on it.
    during = [Client(worker.url, greedy(p, max_new_tokens=LONG_TOKENS)) for p in expected_long]
    for client in during:
        client.start()
    for _ in range(3):
        started = time.monotonic()
        assert worker.generate(greedy(TEXT_PROMPT, max_new_tokens=12), timeout=30)[-1] == {
            "text": expected_short,
            "error_code": 0,
        }
        assert time.monotonic() - started < 10
    for client in [*in_flight, *during]:
        client.join(timeout=60)
        assert not client.is_alive(), "a request did not finish within 60 s"
        assert client.error is None, client.error
        assert client.chunks[-1] == {"text": expected_long[client.payload["prompt"]], "error_code": 0}
    assert not link.registered

    restarted = start_controller(port=controller.port)
    wait_until(lambda: name in restarted.list_models(), 20, "registration with the restarted controller")
    # The controller lists the worker as soon as it reads the registration; the worker marks itself
    # registered only once the answer is back, a moment later.
    wait_until(lambda: link.registered, 10, "the worker to see its registration answered")
    assert restarted.worker_address(name) == worker.url
    via_controller = stream_chunks(restarted.url, {**greedy(TEXT_PROMPT, max_new_tokens=12), "model": name})
    assert via_controller[-1] == {"text": expected_short, "error_code": 0}
    wait_idle(worker)


# -- 4. SIGTERM / SIGINT on a real worker process -----------------------------------------------


#: The tests that use `worker_processes`.
SIGNAL_TESTS = frozenset(
    {
        "test_sigterm_lets_running_streams_finish_and_refuses_new_ones",
        "test_a_short_grace_cancels_running_streams_with_a_shutdown_error",
    }
)


@pytest.fixture(scope="module", autouse=True)
def worker_processes(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, WorkerProcess]]:
    """The signal tests' workers, launched together as this module's first test starts (when a
    signal test is selected at all): their slow imports overlap each other and the tests before."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    if not selected & SIGNAL_TESTS:
        yield {}
        return
    log_dir = tmp_path_factory.mktemp("workers")
    model = checkpoints["text-only"]
    processes = {
        name: WorkerProcess(
            ["--device", "cpu", "--no-register", "--model-path", str(model), "--shutdown-grace", str(grace)], log_dir
        )
        for name, grace in (("generous", 60), ("short-SIGTERM", 1), ("short-SIGINT", 1))
    }
    yield processes
    for process in processes.values():
        process.kill()


def assert_clean_exit(worker: WorkerProcess) -> str:
    code = worker.wait_exit()
    stderr = worker.stderr()
    assert code == 0, f"exit status {code}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    return stderr


@pytest.mark.subprocess
def test_sigterm_lets_running_streams_finish_and_refuses_new_ones(worker_processes, checkpoints, models):
    loaded = text_only(checkpoints, models)
    expected = {p: expected_text(loaded, p, LONG_TOKENS) for p in PROMPTS}  # while the worker starts
    worker = worker_processes["generous"].wait_ready()
    # Five long streams (the default limit) decode together: a drain of a few seconds.
    running = [Client(worker.url, greedy(p, max_new_tokens=LONG_TOKENS)) for p in PROMPTS]
    for client in running:
        client.start()
    wait_until(lambda: all(c.chunks for c in running), 20, "the long requests to be streaming")

    worker.process.send_signal(signal.SIGTERM)

    def draining() -> bool:
        try:
            return requests.get(worker.url + "/ready", timeout=5).status_code == 503
        except requests.ConnectionError:
            raise AssertionError("the worker stopped serving before /ready said it was draining") from None

    wait_until(draining, 10, "/ready to say the worker is draining")
    ready = requests.get(worker.url + "/ready", timeout=5)
    assert ready.json() == {"status": "not ready", "reason": "shutting down"}
    assert requests.get(worker.url + "/health", timeout=5).json() == {"status": "ok"}  # still alive
    # The server is still up only while the drain lasts, so an answer at all means "during the drain".
    status, refused = post_stream(worker.url, greedy(TEXT_PROMPT, max_new_tokens=12), timeout=10)
    assert status == 503
    assert len(refused) == 1 and refused[0]["error_code"] == 1
    assert "shutting down" in refused[0]["text"]

    for client in running:
        client.join(timeout=30)
        assert not client.is_alive() and client.error is None
        assert client.chunks[-1] == {"text": expected[client.payload["prompt"]], "error_code": 0}
    stderr = assert_clean_exit(worker)
    assert "received SIGTERM: draining" in stderr
    assert f"draining: {len(running)} running" in stderr  # the signal came while all of them ran
    assert "cancelling" not in stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.subprocess
def test_a_short_grace_cancels_running_streams_with_a_shutdown_error(worker_processes, checkpoints, models, sig):
    loaded = text_only(checkpoints, models)
    expected = {p: expected_text(loaded, p, LONG_TOKENS) for p in PROMPTS}
    worker = worker_processes[f"short-{sig.name}"].wait_ready()
    # Five at once decode more slowly than one: they certainly outlast the 1 s grace.
    running = [Client(worker.url, greedy(p, max_new_tokens=LONG_TOKENS)) for p in PROMPTS]
    for client in running:
        client.start()
    wait_until(lambda: all(c.chunks for c in running), 20, "the long requests to be streaming")
    signalled = time.monotonic()
    worker.process.send_signal(sig)

    for client in running:
        client.join(timeout=30)
        assert not client.is_alive() and client.error is None
        *answer, last = client.chunks
        assert last["error_code"] == 1 and "shutting down" in last["text"], last
        full = expected[client.payload["prompt"]]
        assert answer and all(c["error_code"] == 0 and full.startswith(c["text"]) for c in answer)
        assert answer[-1]["text"] != full, "the stream should have been cut before its end"
    assert time.monotonic() - signalled < 10
    stderr = assert_clean_exit(worker)
    assert f"received {sig.name}: draining" in stderr
    assert f"draining: {len(running)} running" in stderr
    assert "cancelling them" in stderr


# -- 5. keepalive while waiting for a slot ------------------------------------------------------


def test_a_waiting_request_gets_headers_and_nul_keepalives_before_its_answer(start_worker):
    worker: RunningWorker = start_worker("text-only", limit_model_concurrency=1, keepalive_interval=0.3)
    loaded = worker.worker.loaded
    # Two long requests ahead of it (one running, one waiting): about 2 s in line on this machine.
    blockers = [Client(worker.url, greedy(p, max_new_tokens=LONG_TOKENS)) for p in PROMPTS[1:3]]
    blockers[0].start()
    wait_until(lambda: bool(blockers[0].chunks), 20, "the first request to be streaming")
    blockers[1].start()
    wait_until(lambda: worker.worker.gate.waiting == 1, 10, "the second request to wait")

    arrivals: list[tuple[float, bytes]] = []
    with requests.post(
        worker.url + "/worker_generate_stream", json=greedy(TEXT_PROMPT, max_new_tokens=12), stream=True, timeout=30
    ) as r:
        headers_at = time.monotonic()
        assert r.status_code == 200
        waiting_at_first_byte = -1
        for byte in r.iter_content(chunk_size=1):
            arrivals.append((time.monotonic(), byte))
            if waiting_at_first_byte < 0:
                waiting_at_first_byte = worker.worker.gate.waiting
    for blocker in blockers:
        blocker.join(timeout=30)
        assert blocker.error is None and blocker.chunks[-1]["error_code"] == 0

    body = b"".join(byte for _, byte in arrivals)
    # The first byte, a lone NUL, came while the request was still in line.
    assert body.startswith(b"\0")
    assert waiting_at_first_byte == 2
    nuls = len(body) - len(body.lstrip(b"\0"))
    nul_times = [at for at, _ in arrivals[:nuls]]
    # Several lone NULs, spaced by the keepalive interval, all while the slot was taken ...
    in_line = [at for at in nul_times if at < blockers[1].times[-1]]
    assert len(in_line) >= 4, f"{len(in_line)} keepalive bytes while waiting ~2 s at a 0.3 s interval"
    gaps = [b - a for a, b in itertools.pairwise(nul_times)]
    assert all(gap > 0.15 for gap in gaps), f"keepalives should be ~0.3 s apart, not {gaps}"
    # ... the headers long before the first JSON chunk ...
    first_json_at = arrivals[nuls][0]
    assert first_json_at - headers_at > 1.0
    # ... then the real answer, correct, as ordinary NUL-delimited chunks.
    chunks = [json.loads(piece) for piece in body.split(b"\0") if piece]
    assert chunks[-1] == {"text": expected_text(loaded, TEXT_PROMPT, 12), "error_code": 0}
    assert all(c["error_code"] == 0 and c["text"].startswith(TEXT_PROMPT) for c in chunks)
    wait_idle(worker)


# -- 6. /health, /ready, /metrics ---------------------------------------------------------------


def test_health_ready_and_metrics_report_what_happened(start_worker):
    worker: RunningWorker = start_worker("text-only")
    loaded = worker.worker.loaded
    health = requests.get(worker.url + "/health", timeout=5)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = requests.get(worker.url + "/ready", timeout=5)
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "model": worker.worker.model_name})

    # Two requests end by length, one at a stop string, one by its client hanging up.
    short = expected_text(loaded, TEXT_PROMPT, 12)
    for _ in range(2):
        assert worker.generate(greedy(TEXT_PROMPT, max_new_tokens=12))[-1] == {"text": short, "error_code": 0}
    answer = reference_text(loaded, PROMPTS[1], [], 24)
    stop = next(answer[i : i + 3] for i in range(6, len(answer) - 3) if answer.find(answer[i : i + 3]) == i)
    stopped = worker.generate(greedy(PROMPTS[1], max_new_tokens=24, stop=stop))
    assert stopped[-1] == {"text": PROMPTS[1] + answer[: answer.find(stop)], "error_code": 0}
    leaver = Client(worker.url, greedy(PROMPTS[2], max_new_tokens=LEAVER_TOKENS), leave_after=2)
    run_threads([leaver], 30)
    assert leaver.error is None and len(leaver.chunks) == 2
    wait_idle(worker)

    values = metric_values(worker.url)
    outcomes = {
        dict(labels)["outcome"]: value
        for (sample, labels), value in values.items()
        if sample == "llava_worker_requests_total"
    }
    assert {k: v for k, v in outcomes.items() if v} == {"stop": 1, "length": 2, "cancelled": 1}
    # 12 + 12 for the length ones, at least one for the stopped one, a few for the leaver (not 400).
    tokens = values[("llava_worker_generated_tokens_total", ())]
    assert 12 + 12 + 1 + 2 <= tokens < 12 + 12 + 24 + LEAVER_TOKENS
    assert tokens == worker.worker.metrics.generated_tokens._value.get()
    assert values[("llava_worker_queue_length", ())] == 0
    assert values[("llava_worker_running_requests", ())] == 0
    assert values[("llava_worker_time_to_first_token_seconds_count", ())] == 4
    assert values[("llava_worker_time_between_tokens_seconds_count", ())] > 0
    assert values[("llava_worker_time_between_tokens_seconds_sum", ())] > 0

    # With its engine stopped the worker is alive but not ready.
    worker.worker.engine.stop()
    not_ready = requests.get(worker.url + "/ready", timeout=10)
    assert not_ready.status_code == 503
    assert not_ready.json()["status"] == "not ready"
    assert "not running" in not_ready.json()["reason"]
    assert requests.get(worker.url + "/health", timeout=5).status_code == 200


def test_a_web_ui_conversation_reuses_its_image_and_history_and_says_so(start_worker, caplog):
    """LLaVA's web UI re-sends the history and the image every turn: the second turn is answered
    exactly, from the cached prefix, and `/metrics` and the request's log line show the reuse."""
    worker: RunningWorker = start_worker("llava-1.5")
    loaded = worker.worker.loaded
    image = encode_image(3)
    first = "A chat between a user and an assistant. USER: <image>\nWhat is shown here? ASSISTANT:"
    answer = reference_text(loaded, first, [image], 12)
    assert worker.generate(greedy(first, [image], max_new_tokens=12))[-1]["text"] == first + answer
    second = f"{first} {answer.strip()}</s>USER: And the colours? ASSISTANT:"
    with caplog.at_level(logging.INFO, logger="llava_worker.worker"):
        chunks = worker.generate(greedy(second, [image], max_new_tokens=10))
        wait_idle(worker)
    assert chunks[-1]["text"] == second + reference_text(loaded, second, [image], 10)
    first_tokens = worker.worker.engine.prefix_cache.reused_tokens
    assert first_tokens > 0
    assert any(f"({first_tokens} reused)" in record.message for record in caplog.records)

    values = metric_values(worker.url)
    assert values[("llava_worker_prefix_cache_hits_total", ())] == 1
    assert values[("llava_worker_prefix_cache_misses_total", ())] == 1
    assert values[("llava_worker_prefix_reused_tokens_total", ())] == first_tokens
    assert values[("llava_worker_prefix_cache_bytes", ())] > 0
    # The second turn's image lies inside the reused prefix: the tower ran once, for the first turn.
    assert values[("llava_worker_image_cache_misses_total", ())] == 1
    assert values[("llava_worker_image_cache_bytes", ())] > 0
    assert values[("llava_worker_queue_time_seconds_count", ())] == 2
    # Nothing else decodes, so nothing is chunked: the first turn is a tower pass and one language-model
    # pass, the second one language-model pass over what the prefix does not cover.
    assert values[("llava_worker_prefill_chunk_tokens_count", ())] == 3
