#!/usr/bin/env python
"""Measures the worker against bare `model.generate` on the same model and machine, in one run.

    python scripts/benchmark.py                           # text mode: a random 21 M-parameter Llama
    python scripts/benchmark.py --mode image              # image mode: a tiny LLaVA-1.5, one image per request
    python scripts/benchmark.py --mode vision             # vision mode: LLaVA-1.5-shaped (336 px, 576 image tokens)
    python scripts/benchmark.py --mode vision --profile   # where a single image stream's time goes
    python scripts/benchmark.py --mode vision --device cuda --llava-7b-shapes   # LLaVA-1.5-7B's shapes on a GPU

Text and image modes print aggregate generated tokens/s, median time to first token (TTFT), median
time between tokens (TBT) and peak memory for: bare `generate` at batch 1 and batch N, and the
worker over real HTTP with 1 and N concurrent streaming clients; then the ratios, and how much later
a request that arrives while N-1 others are decoding gets its first token than it would alone.

Vision mode (issue 11) runs a random-weight LLaVA-1.5 of compute-relevant size (a 336 px CLIP tower
with 14 px patches, so 576 image tokens per image, before the text mode's 21 M-parameter Llama)
with prompts as LLaVA's web UI sends them (`conv_llava_v1`: system message, `USER: <image>\n...
ASSISTANT:`), greedy, and measures four workloads against bare `generate` in the same run:
8 concurrent image clients (aggregate tokens/s vs `generate` batch 8), 1 image client (vs batch 1),
a 5-turn web-UI conversation (TTFT of turn 5 vs turn 1) and 4 text streams decoding while 4 image
requests arrive (their longest gap between chunks vs their median gap). With --profile it instead
times the phases of single image requests inside the worker (and, with --cprofile, profiles each of
the worker's threads) against bare `generate` at batch 1.

With --device cuda the worker and bare `generate` run on the GPU in float16 (on the CPU both run in
float32, as the worker chooses), and vision mode instead measures the worker against bare `generate`
at 1, 8 and 32 concurrent image requests (--levels). --llava-7b-shapes makes that model a random-weight
LLaVA-1.5 of llava-hf/llava-1.5-7b-hf's exact shapes (CLIP ViT-L/14-336, the two-layer projector,
Llama-2-7B; 7.06 B parameters), built directly on the GPU in float16 into --checkpoints once (about
14 GB; no hub access) by `llava_worker/testing/gpu_shapes.py`.
"""

from __future__ import annotations

import argparse
import base64
import functools
import importlib
import io
import itertools
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_worker.models.chat_template import LLAVA_SYSTEM_MESSAGE  # noqa: E402
from llava_worker.testing.tiny import (  # noqa: E402
    BENCH_IMAGE_TOKENS,
    build_all,
    build_atomically,
    build_benchmark_llama,
    build_benchmark_llava15,
    make_test_image,
)

#: The `--device` choices: the worker picks float32 on the CPU and float16 on a GPU; so does bare `generate`.
DEVICES = ("cpu", "cuda")

TEXT_PROMPTS = [
    "USER: Tell me a story about the sea. ASSISTANT:",
    "USER: What is the capital of the little island where the boat sails? ASSISTANT:",
    "USER: Hi. ASSISTANT:",
    "USER: Describe a walk through a quiet forest at dawn, with birds. ASSISTANT:",
]
IMAGE_PROMPT = "USER: <image>\nWhat is shown in this picture? ASSISTANT:"

# -- vision mode: LLaVA's web UI on a LLaVA-1.5-shaped model ----------------------------------------

#: Where the vision model is built under --checkpoints; bump the stamp when its builder changes.
VISION_MODEL_DIR = "bench-llava-1.5-336"
VISION_MODEL_STAMP = "1\n"
#: The size the images are sent at (the web UI sends PNG, after shrinking large photos).
VISION_IMAGE_SIZE = (640, 480)
#: `conv_llava_v1.sep2`: what the web UI sends as `stop`.
WEB_UI_STOP = "</s>"
#: First questions of the image clients (one each, so prompt lengths differ a little).
VISION_QUESTIONS = (
    "What is shown in this picture?",
    "Describe this image in detail.",
    "What colours are in the image?",
    "Is there a person in this photo?",
    "What is the weather like in this picture?",
    "Where could this photo have been taken?",
    "What stands out the most in the image?",
    "Write a short caption for this picture.",
)
#: The five turns of the web-UI conversation.
CONVERSATION = (
    "What is shown in this picture?",
    "What colour is the largest object?",
    "Is there anything unusual about it?",
    "Where do you think this was taken?",
    "Sum up our conversation in one sentence.",
)
#: The text-only streams that decode while image requests arrive.
TEXT_QUESTIONS = (
    "Tell me a story about the sea.",
    "What is the capital of the little island where the boat sails?",
    "Describe a walk through a quiet forest at dawn, with birds.",
    "Write a poem about a red boat on a blue river.",
)


@dataclass
class Figures:
    """One configuration's results."""

    tokens_per_s: float
    ttft_ms: float
    tbt_ms: float
    peak_mib: float


Item = tuple[str, str | None]
"""A request: its prompt and its base64 image (or None)."""


def web_ui_prompt(turns: list[tuple[str, str | None]], image: bool) -> str:
    """The prompt LLaVA's web UI sends: `conv_llava_v1.get_prompt()` (separator style TWO), i.e. the
    system message, then `USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:`. The image leads
    the first question; each answer is the worker's own (stripped, as the UI keeps it), None for
    the turn being asked."""
    prompt = LLAVA_SYSTEM_MESSAGE + " "
    for index, (question, answer) in enumerate(turns):
        text = f"<image>\n{question}" if image and index == 0 else question
        prompt += f"USER: {text} ASSISTANT:"
        # An empty message renders as the bare role in `get_prompt`, without a separator.
        prompt += f" {answer}{WEB_UI_STOP}" if answer else ""
    return prompt


def vision_image(seed: int) -> str:
    """A base64 PNG of 640x480 that differs per seed; smooth, so PNG compresses it like a photo."""
    buffer = io.BytesIO()
    image = make_test_image(seed, (16, 12)).resize(VISION_IMAGE_SIZE, Image.Resampling.BICUBIC)
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def prompts_for(mode: str, count: int) -> list[Item]:
    """(prompt, base64 image or None) pairs; images differ per request."""
    if mode == "text":
        return [(TEXT_PROMPTS[i % len(TEXT_PROMPTS)], None) for i in range(count)]
    if mode == "vision":
        questions = [VISION_QUESTIONS[i % len(VISION_QUESTIONS)] for i in range(count)]
        return [
            (web_ui_prompt([(question, None)], image=True), vision_image(i)) for i, question in enumerate(questions)
        ]
    result: list[Item] = []
    for i in range(count):
        buffer = io.BytesIO()
        make_test_image(i, (40 + 3 * i, 30)).save(buffer, format="PNG")
        result.append((IMAGE_PROMPT, base64.b64encode(buffer.getvalue()).decode()))
    return result


# -- bare generate, in a child process so its peak memory is its own --------------------------------


def bare_load(path: str, image_mode: bool, device: str) -> tuple[Any, Any]:
    """The processor (or tokenizer) and model, loaded as the worker loads them: float32 on the CPU,
    float16 on a GPU (placed there as it loads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    dtype = torch.float32 if device == "cpu" else torch.float16
    placement: dict[str, Any] = {} if device == "cpu" else {"device_map": device}
    encoder: Any
    if image_mode:
        encoder = AutoProcessor.from_pretrained(path)
        encoder.tokenizer.padding_side = "left"
        model: Any = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **placement)
    else:
        encoder = AutoTokenizer.from_pretrained(path)
        encoder.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    model.eval()
    return encoder, model


def bare_child(spec: dict[str, Any]) -> dict[str, float]:
    """Runs in its own process: bare `model.generate` over `items`, `batch` prompts at a time."""
    import resource

    import torch
    from PIL import Image
    from transformers.generation.streamers import BaseStreamer

    path, batch, new_tokens = spec["model"], spec["batch"], spec["new_tokens"]
    items: list[tuple[str, str | None]] = spec["items"]
    device: str = spec.get("device", "cpu")
    image_mode = any(image for _, image in items)
    encoder, model = bare_load(path, image_mode, device)

    class Clock(BaseStreamer):
        """Notes when each step's tokens come out (the first call is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(group: list[tuple[str, str | None]]) -> tuple[float, float, int, list[float]]:
        prompts = [prompt for prompt, _ in group]
        if image_mode:
            images = [Image.open(io.BytesIO(base64.b64decode(image or ""))).convert("RGB") for _, image in group]
            inputs = encoder(text=prompts, images=images, return_tensors="pt", padding=True)
        else:
            inputs = encoder(prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                streamer=clock if batch == 1 else None,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        generated = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
        return start, end, generated, clock.times[1:]

    run(items[:batch])  # warm-up
    ttfts: list[float] = []
    gaps: list[float] = []
    total, elapsed = 0, 0.0
    for i in range(0, len(items), batch):
        start, end, generated, times = run(items[i : i + batch])
        total += generated
        elapsed += end - start
        if times:
            ttfts.append(times[0] - start)
            gaps += [b - a for a, b in itertools.pairwise(times)]
    return {
        "tokens_per_s": total / elapsed,
        # Batch-N generate streams nothing, so it has no per-token timings to report.
        "ttft_ms": 1000 * statistics.median(ttfts) if ttfts else float("nan"),
        "tbt_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
        # On a GPU, the most GPU memory torch's allocator held (the CUDA context not included).
        "peak_mib": torch.cuda.max_memory_reserved() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bare_generate(model: Path, batch: int, new_tokens: int, items: list[Item], device: str = "cpu") -> Figures:
    spec = json.dumps({"model": str(model), "batch": batch, "new_tokens": new_tokens, "items": items, "device": device})
    result = subprocess.run(
        # The spec goes by stdin: with images it is far longer than one argument may be.
        [sys.executable, __file__, "--bare-child", "-"],
        input=spec,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"bare generate failed:\n{result.stderr[-3000:]}")
    return Figures(**json.loads(result.stdout.strip().splitlines()[-1]))


# -- the worker over HTTP --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gpu_mib(pid: int) -> float:
    """The GPU memory that process `pid` holds now, by nvidia-smi (NaN where it cannot tell). torch's
    allocator keeps what it has reserved, so after a run this is about the process's peak."""
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        listing = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return float("nan")
    for line in listing.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return float(fields[1])
    return float("nan")


class WorkerProcess:
    """`python -m llava_worker` on a free port; `launcher` replaces `-m llava_worker` (instrumentation)."""

    def __init__(
        self,
        model: Path,
        limit: int,
        launcher: list[str] | None = None,
        device: str = "cpu",
        start_timeout: float = 180,
        extra: Sequence[str] = (),
    ) -> None:
        self.device = device
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                *(launcher or [sys.executable, "-m", "llava_worker"]),
                *("--model-path", str(model), "--device", device),
                *("--no-register", "--host", "127.0.0.1", "--port", str(self.port)),
                *("--limit-model-concurrency", str(limit)),
                *extra,
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the worker exited; see {self.log.name}")
            try:
                requests.post(self.url + "/worker_get_status", timeout=2)
                return
            except requests.RequestException:
                time.sleep(0.2)
        raise SystemExit(f"the worker did not start in {start_timeout:.0f} s; see {self.log.name}")

    def peak_mib(self) -> float:
        """Peak resident memory; on a GPU, the GPU memory the worker holds (see `gpu_mib`)."""
        if self.device == "cuda":
            return gpu_mib(self.process.pid)
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class Timing:
    start: float
    first: float
    chunk_times: list[float]
    end: float
    text: str = ""
    """The last chunk's text (the prompt, then the answer: the LLaVA protocol echoes the prompt)."""


def stream_one(
    url: str,
    prompt: str,
    image: str | None,
    new_tokens: int,
    stop: str | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> Timing:
    payload: dict[str, Any] = {"prompt": prompt, "temperature": 0, "max_new_tokens": new_tokens}
    if image:
        payload["images"] = [image]
    if stop is not None:
        payload["stop"] = stop
    start = time.perf_counter()
    times: list[float] = []
    text = ""
    with requests.post(url + "/worker_generate_stream", json=payload, stream=True, timeout=600) as response:
        for chunk in response.iter_lines(delimiter=b"\0"):
            if not chunk:
                continue
            data = json.loads(chunk)
            if data["error_code"] != 0:
                raise SystemExit(f"the worker answered an error: {data['text']}")
            times.append(time.perf_counter())
            text = data["text"]
            if on_chunk is not None:
                on_chunk()
    return Timing(start, times[0], times, time.perf_counter(), text)


def in_threads(calls: Sequence[Callable[[], Timing]]) -> tuple[list[threading.Thread], list[Timing]]:
    """Starts each call on its own thread; the list fills with their timings as they finish."""
    timings: list[Timing] = []
    threads = [threading.Thread(target=lambda call=call: timings.append(call())) for call in calls]
    for thread in threads:
        thread.start()
    return threads, timings


def join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()


def worker_clients(url: str, clients: int, items: list[Item], new_tokens: int) -> list[Timing]:
    """Each client sends its share of `items` one after another; all clients run at once."""
    timings: list[Timing] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for prompt, image in items[index::clients]:
            timing = stream_one(url, prompt, image, new_tokens)
            with lock:
                timings.append(timing)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    join(threads)
    return timings


def summarise(timings: list[Timing], new_tokens: int, peak: float) -> Figures:
    wall = max(t.end for t in timings) - min(t.start for t in timings)
    gaps = [b - a for t in timings for a, b in itertools.pairwise(t.chunk_times)]
    return Figures(
        tokens_per_s=len(timings) * new_tokens / wall,
        ttft_ms=1000 * statistics.median(t.first - t.start for t in timings),
        tbt_ms=1000 * statistics.median(gaps) if gaps else float("nan"),
        peak_mib=peak,
    )


def late_arrival(url: str, clients: int, items: list[Item], new_tokens: int) -> tuple[float, float]:
    """TTFT of a request that arrives while `clients - 1` others are decoding, and the step time then."""
    background_tokens = new_tokens * 4
    busy: list[Timing] = []
    threads = [
        threading.Thread(target=lambda p=p, i=i: busy.append(stream_one(url, p, i, background_tokens)))
        for p, i in items[: clients - 1]
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the others are well into decoding by now
    prompt, image = items[-1]
    late = stream_one(url, prompt, image, new_tokens)
    join(threads)
    step_gaps = [b - a for t in busy for a, b in itertools.pairwise(t.chunk_times)]
    return late.first - late.start, statistics.median(step_gaps)


def print_figures(results: dict[str, Figures]) -> None:
    print(f"{'configuration':34} {'tokens/s':>10} {'TTFT ms':>9} {'TBT ms':>8} {'peak MiB':>9}")
    for name, figures in results.items():
        print(
            f"{name:34} {figures.tokens_per_s:10.1f} {figures.ttft_ms:9.1f} {figures.tbt_ms:8.2f} "
            f"{figures.peak_mib:9.0f}"
        )


# -- text and image modes --------------------------------------------------------------------------


def run_throughput(args: argparse.Namespace) -> None:
    """Text and image modes: throughput at 1 and N clients against bare `generate`, and a late arrival."""
    n, new_tokens = args.clients, args.new_tokens or 64
    if args.mode == "text":
        model = args.checkpoints / "bench-llama-21m"
        if not (model / "config.json").exists():
            build_benchmark_llama(model)
    else:
        model = build_all(args.checkpoints)["llava-1.5"]
    items = prompts_for(args.mode, n * (args.rounds or 2))
    print(f"model: {model}  mode: {args.mode}  N={n}  new tokens per request: {new_tokens}  torch threads: default")
    print(f"cpus: {os.cpu_count()}; figures vary with machine load, compare the ratios")
    if args.device != "cpu":
        print(f"device: {args.device}, float16; peak MiB is GPU memory (see --help)")

    results: dict[str, Figures] = {}
    results["bare generate, batch 1"] = bare_generate(model, 1, new_tokens, items[: max(4, n // 2)], args.device)
    results[f"bare generate, batch {n}"] = bare_generate(model, n, new_tokens, items, args.device)

    worker = WorkerProcess(model, n, device=args.device, extra=shlex.split(args.worker_args))
    try:
        worker_clients(worker.url, 1, items[:1], 8)  # warm-up
        single = worker_clients(worker.url, 1, items[: max(4, n // 2)], new_tokens)
        results["worker over HTTP, 1 client"] = summarise(single, new_tokens, worker.peak_mib())
        many = worker_clients(worker.url, n, items, new_tokens)
        results[f"worker over HTTP, {n} clients"] = summarise(many, new_tokens, worker.peak_mib())
        alone = statistics.median(t.first - t.start for t in worker_clients(worker.url, 1, items[-1:] * 3, new_tokens))
        late_ttft, step = late_arrival(worker.url, n, items, new_tokens)
    finally:
        worker.close()

    print()
    print_figures(results)
    bare1 = results["bare generate, batch 1"].tokens_per_s
    baren = results[f"bare generate, batch {n}"].tokens_per_s
    one = results["worker over HTTP, 1 client"].tokens_per_s
    many_tps = results[f"worker over HTTP, {n} clients"].tokens_per_s
    print()
    print(f"worker, 1 client  / bare batch 1 : {one / bare1:5.2f}   (target >= 0.9)")
    print(f"worker, {n} clients / bare batch {n} : {many_tps / baren:5.2f}   (target >= 0.8)")
    print(f"worker, {n} clients / worker, 1 client: {many_tps / one:5.2f}")
    extra_steps = (late_ttft - alone) / step
    print(
        f"late arrival: TTFT {1000 * late_ttft:.1f} ms with {n - 1} decoding vs {1000 * alone:.1f} ms alone; "
        f"{extra_steps:+.1f} decode steps ({1000 * step:.2f} ms each)   (target <= 3)"
    )


# -- vision mode (issue 11) ------------------------------------------------------------------------


def vision_model(checkpoints: Path) -> Path:
    """The vision benchmark's LLaVA-1.5, built once under `checkpoints`."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    target = checkpoints / VISION_MODEL_DIR
    build_atomically(build_benchmark_llava15, target, VISION_MODEL_STAMP, force=False)
    return target


def vision_items(count: int, first_seed: int) -> list[Item]:
    """First-turn web-UI requests, each with its own image (seeds from `first_seed`: no two rows of
    the run share an image, so no row can profit from another's images being seen before)."""
    questions = [VISION_QUESTIONS[i % len(VISION_QUESTIONS)] for i in range(count)]
    return [(web_ui_prompt([(q, None)], image=True), vision_image(first_seed + i)) for i, q in enumerate(questions)]


class ChunkCounter:
    """Counts each stream's chunks, so the caller can wait until every stream is decoding."""

    def __init__(self, streams: int) -> None:
        self._counts = [0] * streams
        self._changed = threading.Condition()

    def tick(self, stream: int) -> None:
        with self._changed:
            self._counts[stream] += 1
            self._changed.notify_all()

    def wait(self, chunks: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: min(self._counts) >= chunks, timeout)


def conversation(url: str, image: str, new_tokens: int) -> list[tuple[float, str]]:
    """LLaVA's web UI: every turn re-sends the whole history and the image. Each turn's time to first
    chunk, and its prompt."""
    history: list[tuple[str, str | None]] = []
    turns: list[tuple[float, str]] = []
    for question in CONVERSATION:
        prompt = web_ui_prompt([*history, (question, None)], image=True)
        timing = stream_one(url, prompt, image, new_tokens, stop=WEB_UI_STOP)
        turns.append((timing.first - timing.start, prompt))
        # The UI keeps `text[len(prompt):].strip()`: the worker echoes the prompt, as LLaVA's does.
        answer = timing.text.removeprefix(prompt)
        history.append((question, answer.strip()))
    return turns


@dataclass
class Interference:
    """Text streams' gaps between chunks while image requests arrive."""

    longest_gap: float
    """The longest gap that overlaps the arrival and prefill of the image requests."""
    median_gap: float
    """The median gap over the text streams' whole lives."""
    image_ttft: float
    """The image requests' median time to first chunk."""
    covered: bool
    """Whether the text streams were still decoding when the last image request got its first chunk."""


def after(seconds: float, call: Callable[[], Timing]) -> Callable[[], Timing]:
    def delayed() -> Timing:
        time.sleep(seconds)
        return call()

    return delayed


def text_during_images(url: str, images: list[Item], new_tokens: int, text_tokens: int, gap: float) -> Interference:
    """One text-only stream per TEXT_QUESTIONS; once all of them decode, the image requests arrive,
    `gap` seconds apart (0: at the same moment)."""
    counter = ChunkCounter(len(TEXT_QUESTIONS))
    text_calls = [
        functools.partial(
            stream_one,
            url,
            web_ui_prompt([(question, None)], image=False),
            None,
            text_tokens,
            WEB_UI_STOP,
            functools.partial(counter.tick, index),
        )
        for index, question in enumerate(TEXT_QUESTIONS)
    ]
    text_threads, texts = in_threads(text_calls)
    if not counter.wait(chunks=8, timeout=120):
        raise SystemExit("the text streams did not start decoding within 120 s")
    arrival = time.perf_counter()
    image_calls = [
        after(index * gap, functools.partial(stream_one, url, prompt, image, new_tokens, WEB_UI_STOP))
        for index, (prompt, image) in enumerate(images)
    ]
    image_threads, arrived = in_threads(image_calls)
    join(image_threads)
    join(text_threads)
    prefilled = max(t.first for t in arrived)
    gaps = [(a, b) for t in texts for a, b in itertools.pairwise(t.chunk_times)]
    return Interference(
        longest_gap=max((b - a for a, b in gaps if b >= arrival and a <= prefilled), default=float("nan")),
        median_gap=statistics.median(b - a for a, b in gaps),
        image_ttft=statistics.median(t.first - t.start for t in arrived),
        covered=min(t.end for t in texts) > prefilled,
    )


@dataclass
class VisionRun:
    """Everything one vision run measured."""

    n: int
    figures: dict[str, Figures] = field(default_factory=dict)
    conversations: list[list[tuple[float, str]]] = field(default_factory=list)
    interference: Interference | None = None


def run_vision(args: argparse.Namespace) -> None:
    """The four workloads of issue 11, side by side with bare `generate` (see the module docstring)."""
    n, new_tokens = args.clients, args.new_tokens or 48
    model = vision_model(args.checkpoints)
    # Distinct images per row: 0.. for one client, 100.. for N clients, 200.. the conversations,
    # 300.. the images that arrive during text streams, 900 the warm-up.
    single = vision_items(args.single_requests, first_seed=0)
    many = vision_items(n * (args.rounds or 2), first_seed=100)
    print(f"model: {model}: LLaVA-1.5 shapes (336 px CLIP tower, {BENCH_IMAGE_TOKENS} image tokens), random weights")
    print(f"mode: vision  N={n}  new tokens per request: {new_tokens}  greedy, float32, cpus: {os.cpu_count()}")
    began = time.perf_counter()
    run = VisionRun(n)
    run.figures["bare generate, batch 1"] = bare_generate(model, 1, new_tokens, single)
    run.figures[f"bare generate, batch {n}"] = bare_generate(model, n, new_tokens, many)
    worker = WorkerProcess(model, n, extra=shlex.split(args.worker_args))
    try:
        worker_clients(worker.url, 1, vision_items(1, first_seed=900), 8)  # warm-up
        timings = worker_clients(worker.url, 1, single, new_tokens)
        run.figures["worker over HTTP, 1 client"] = summarise(timings, new_tokens, worker.peak_mib())
        timings = worker_clients(worker.url, n, many, new_tokens)
        run.figures[f"worker over HTTP, {n} clients"] = summarise(timings, new_tokens, worker.peak_mib())
        for index in range(args.conversations):
            run.conversations.append(conversation(worker.url, vision_image(200 + index), new_tokens))
        arriving = vision_items(4, first_seed=300)
        run.interference = text_during_images(worker.url, arriving, new_tokens, args.text_tokens, args.arrival_gap)
    finally:
        worker.close()
    print_vision(run, model)
    print(f"\nthe vision run took {time.perf_counter() - began:.0f} s (model build excluded)")


def prompt_tokens(model: Path, prompts: list[str]) -> list[int]:
    """Each prompt's length in tokens, each `<image>` counted as the image tokens it stands for."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    counts = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    return [
        count + prompt.count("<image>") * (BENCH_IMAGE_TOKENS - 1)
        for count, prompt in zip(counts, prompts, strict=True)
    ]


def print_vision(run: VisionRun, model: Path) -> None:
    n, figures, interference = run.n, run.figures, run.interference
    assert interference is not None
    print()
    print_figures(figures)
    turn_ttfts = [statistics.median(turns[i][0] for turns in run.conversations) for i in range(len(CONVERSATION))]
    tokens = prompt_tokens(model, [prompt for _, prompt in run.conversations[0]])
    print()
    print("web-UI conversation, per turn (median of the conversations): TTFT ms, prompt tokens")
    print(
        "  "
        + "   ".join(
            f"turn {i + 1}: {1000 * t:.0f} ms, {k}" for i, (t, k) in enumerate(zip(turn_ttfts, tokens, strict=True))
        )
    )
    image_ttft = 1000 * interference.image_ttft
    print(f"text streams while 4 image requests arrive: the image requests' median TTFT {image_ttft:.0f} ms")
    if not interference.covered:
        print("  WARNING: a text stream ended before the image requests were prefilled; raise --text-tokens")
    bare1, bare_n = figures["bare generate, batch 1"], figures[f"bare generate, batch {n}"]
    one, many = figures["worker over HTTP, 1 client"], figures[f"worker over HTTP, {n} clients"]
    rows = [
        (
            f"{n} image clients: aggregate tokens/s vs bare batch {n}",
            f"{many.tokens_per_s:.1f} vs {bare_n.tokens_per_s:.1f} tokens/s",
            many.tokens_per_s / bare_n.tokens_per_s,
            ">= 0.8",
        ),
        (
            "1 image client: tokens/s vs bare batch 1",
            f"{one.tokens_per_s:.1f} vs {bare1.tokens_per_s:.1f} tokens/s",
            one.tokens_per_s / bare1.tokens_per_s,
            ">= 0.9",
        ),
        (
            "5-turn web-UI conversation: TTFT turn 5 vs turn 1",
            f"{1000 * turn_ttfts[-1]:.0f} vs {1000 * turn_ttfts[0]:.0f} ms",
            turn_ttfts[-1] / turn_ttfts[0],
            "<= 0.5",
        ),
        (
            "4 text streams, 4 images arrive: longest vs median gap",
            f"{1000 * interference.longest_gap:.0f} vs {1000 * interference.median_gap:.1f} ms",
            interference.longest_gap / interference.median_gap,
            "<= 3",
        ),
    ]
    print()
    print(f"{'workload (issue 11)':56} {'measured':30} {'ratio':>7}  goal")
    for name, measured, ratio, goal in rows:
        print(f"{name:56} {measured:30} {ratio:7.2f}  {goal}")


# -- vision mode on a GPU: concurrency levels, optionally on LLaVA-1.5-7B's shapes -----------------

#: Where --llava-7b-shapes builds its model under --checkpoints (`-tiny` with --tiny-shapes); bump the
#: stamp when `build_llava15_7b_shapes` changes.
LLAVA_7B_DIR = "llava-1.5-7b-shapes"
LLAVA_7B_STAMP = "1\n"
#: Seconds the worker may take to load a model: 7 B parameters take a while to load onto a GPU.
LEVELS_WORKER_START = 600


def levels_model(args: argparse.Namespace) -> tuple[Path, str]:
    """The model of the levels run, built once under --checkpoints, and a line that describes it."""
    if not args.llava_7b_shapes:
        return vision_model(args.checkpoints), f"LLaVA-1.5 image geometry ({BENCH_IMAGE_TOKENS} image tokens), small"
    from llava_worker.testing.gpu_shapes import build_llava15_7b_shapes, parameter_count

    args.checkpoints.mkdir(parents=True, exist_ok=True)
    target = args.checkpoints / (LLAVA_7B_DIR + ("-tiny" if args.tiny_shapes else ""))
    builder = functools.partial(build_llava15_7b_shapes, device=args.device, tiny=args.tiny_shapes)
    build_atomically(builder, target, LLAVA_7B_STAMP, force=False)
    shapes = "tiny widths and depths" if args.tiny_shapes else "CLIP ViT-L/14-336, Llama-2-7B"
    billions = parameter_count(tiny=args.tiny_shapes) / 1e9
    return target, f"LLaVA-1.5-7B's architecture ({shapes}; {billions:.3f} B parameters)"


def level_requests(args: argparse.Namespace, level: int) -> int:
    """Requests measured at `level` concurrent requests: --single-requests one after another at 1,
    else --rounds (default 1 here) per client."""
    return args.single_requests if level == 1 else level * (args.rounds or 1)


def clients_label(level: int) -> str:
    return f"worker over HTTP, {level} client{'s' if level > 1 else ''}"


def progress(began: float, message: str) -> None:
    print(f"[{time.perf_counter() - began:6.1f} s] {message}", flush=True)


def run_vision_levels(args: argparse.Namespace) -> None:
    """The worker against bare `generate` at each of --levels concurrent image requests (default 1, 8
    and 32), on --device: one worker whose --limit-model-concurrency is the highest level."""
    levels, new_tokens = args.levels, args.new_tokens or 48
    dtype = "float32" if args.device == "cpu" else "float16"
    began = time.perf_counter()
    model, description = levels_model(args)
    built = time.perf_counter()
    print(f"model: {model}: {description}, random weights")
    print(
        f"mode: vision, {', '.join(map(str, levels))} concurrent image requests  new tokens per request: "
        f"{new_tokens}  greedy, {dtype} on {args.device}  cpus: {os.cpu_count()}"
    )
    progress(began, "model ready")
    # Distinct images per level (1000, 2000, ...), and for each level's warm-up (+500).
    items = {level: vision_items(level_requests(args, level), 1000 * (i + 1)) for i, level in enumerate(levels)}
    figures: dict[str, Figures] = {}
    for level in levels:
        figures[f"bare generate, batch {level}"] = bare_generate(model, level, new_tokens, items[level], args.device)
        progress(began, f"bare generate, batch {level}: {figures[f'bare generate, batch {level}'].tokens_per_s:.1f}")
    worker = WorkerProcess(
        model, max(levels), device=args.device, start_timeout=LEVELS_WORKER_START, extra=shlex.split(args.worker_args)
    )
    try:
        progress(began, "worker started")
        for i, level in enumerate(levels):
            # Warm-up at this level, as bare `generate` warms up at each batch size.
            worker_clients(worker.url, level, vision_items(level, 1000 * (i + 1) + 500), 8)
            timings = worker_clients(worker.url, level, items[level], new_tokens)
            figures[clients_label(level)] = summarise(timings, new_tokens, worker.peak_mib())
            progress(began, f"{clients_label(level)}: {figures[clients_label(level)].tokens_per_s:.1f}")
    finally:
        worker.close()
    print_levels(figures, levels, args.device)
    finished = time.perf_counter()
    print(
        f"\nthe run took {finished - began:.0f} s: {built - began:.0f} s to build (or find) the model, "
        f"then {finished - built:.0f} s"
    )


#: Issue 11's goals for the worker's share of bare `generate`'s tokens/s (8's also shown for higher levels).
LEVEL_GOALS = {1: ">= 0.9", 8: ">= 0.8"}


def print_levels(figures: dict[str, Figures], levels: list[int], device: str) -> None:
    print()
    print_figures(figures)
    if device == "cuda":
        print("(peak MiB on cuda: GPU memory; bare: torch's reserved peak, worker: nvidia-smi after the level)")
    bare1 = figures[f"bare generate, batch {levels[0]}"].tokens_per_s
    worker1 = figures[clients_label(levels[0])].tokens_per_s
    print()
    print(
        f"{'concurrent image requests':26} {'worker tok/s':>12} {'bare tok/s':>11} {'worker/bare':>12} "
        f"{f'worker/w@{levels[0]}':>11} {f'bare/b@{levels[0]}':>11}  goal"
    )
    for level in levels:
        bare = figures[f"bare generate, batch {level}"].tokens_per_s
        worker = figures[clients_label(level)].tokens_per_s
        goal = LEVEL_GOALS.get(level, "(>= 0.8)" if level > 8 else "")
        print(
            f"{level:<26} {worker:12.1f} {bare:11.1f} {worker / bare:12.2f} "
            f"{worker / worker1:11.2f} {bare / bare1:11.2f}  {goal}"
        )


# -- vision mode --profile: where a single image stream's time goes ---------------------------------

PARSE = "HTTP: parse the request body"
PREPARE = "prepare_inputs: decode the image, processor"
PREFILL = "engine: prefill pieces (tower, LM)"
TOWER = "vision tower + projector"
DECODE = "engine: decode step"
STEP_INPUTS = "decode step inputs (mask, positions)"
CHOOSE = "choose tokens (sampling)"
ACCEPT = "accept tokens (detokenise, publish)"
ENCODE = "HTTP: encode a chunk"
#: What the instrumented worker times: (module, attribute, label).
PHASES = (
    ("llava_worker.http.app", "parse_generate_params", PARSE),
    ("llava_worker.worker", "prepare_inputs", PREPARE),
    ("llava_worker.engine.prefill", "PrefillGroup.step", PREFILL),
    ("transformers.models.llava.modeling_llava", "LlavaModel.get_image_features", TOWER),
    ("llava_worker.engine.core", "Engine._decode_step", DECODE),
    ("llava_worker.engine.batch", "DecodeBatch.step_inputs", STEP_INPUTS),
    ("llava_worker.engine.core", "Engine._choose", CHOOSE),
    ("llava_worker.engine.core", "Engine._accept", ACCEPT),
    ("llava_worker.http.fastchat", "encode_chunk", ENCODE),
)
Event = tuple[str, float, float]
"""(phase, start, end): `time.perf_counter()` is the system's monotonic clock, the same in every process."""


def _timed(original: Callable[..., Any], label: str, events: list[Event]) -> Callable[..., Any]:
    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            events.append((label, start, time.perf_counter()))

    return timed


def _instrument(events: list[Event]) -> list[str]:
    """Wraps each of PHASES in a timer; returns those that this version of the code lacks."""
    missing = []
    for module, path, label in PHASES:
        *parents, name = path.split(".")
        try:
            owner: Any = importlib.import_module(module)
            for parent in parents:
                owner = getattr(owner, parent)
            setattr(owner, name, _timed(getattr(owner, name), label, events))
        except (ImportError, AttributeError):
            missing.append(f"{module}.{path}")
    return missing


def _profile_threads(profiles: list[tuple[str, Any]]) -> None:
    """cProfile profiles one thread: give every thread started from now on, and the server's event
    loop, a profile of its own."""
    import cProfile

    import llava_worker.http.launcher as launcher

    original_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile()
        profiles.append((self.name, profile))
        profile.enable()
        try:
            original_run(self)
        finally:
            profile.disable()

    original_serve = launcher.serve

    def serve(worker: Any) -> None:
        profile = cProfile.Profile()
        profiles.append(("event loop", profile))
        profile.enable()
        try:
            original_serve(worker)
        finally:
            profile.disable()

    setattr(threading.Thread, "run", run)  # noqa: B010
    setattr(launcher, "serve", serve)  # noqa: B010


def instrumented_worker(out: Path, cprofile: bool, argv: list[str]) -> None:
    """`python -m llava_worker argv` with PHASES timed (events.json in `out` at exit) and, with
    `cprofile`, every thread profiled (one .pstats file per thread)."""
    events: list[Event] = []
    missing = _instrument(events)
    profiles: list[tuple[str, Any]] = []
    if cprofile:
        _profile_threads(profiles)
    from llava_worker.cli import main as worker_main

    try:
        worker_main(argv)
    finally:
        (out / "events.json").write_text(json.dumps({"events": events, "missing": missing}))
        for index, (name, profile) in enumerate(profiles):
            profile.dump_stats(out / f"{index:02d}-{name.replace('/', '_').replace(' ', '_')}.pstats")


def instrumented_run(
    model: Path, items: list[Item], new_tokens: int, out: Path, cprofile: bool, flags: list[str]
) -> list[Timing]:
    """One image client's requests against an instrumented worker (with extra worker `flags`), after
    a warm-up."""
    mode = "cprofile" if cprofile else "timers"
    launcher = [sys.executable, __file__, "--instrumented-worker", str(out), mode, "--", *flags]
    worker = WorkerProcess(model, 8, launcher)
    try:
        worker_clients(worker.url, 1, vision_items(1, first_seed=900), 8)  # warm-up
        timings = worker_clients(worker.url, 1, items, new_tokens)
    finally:
        worker.close()
    if not (out / "events.json").exists():
        raise SystemExit(f"the instrumented worker did not exit cleanly; see {worker.log.name}")
    return timings


def timed_run(model: Path, items: list[Item], new_tokens: int, flags: list[str]) -> tuple[list[Timing], list[Event]]:
    """`instrumented_run` with the phase timers only; the requests' timings and the phases' events."""
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as out:
        timings = instrumented_run(model, items, new_tokens, Path(out), cprofile=False, flags=flags)
        recorded = json.loads((Path(out) / "events.json").read_text())
    if recorded["missing"]:
        print(f"not instrumented (not in this code): {', '.join(recorded['missing'])}")
    return timings, [(label, start, end) for label, start, end in recorded["events"]]


def step_median(timings: list[Timing], events: list[Event]) -> float:
    """The median decode step inside the engine while `timings` ran."""
    return statistics.median(e[2] - e[1] for e in events if e[0] == DECODE and timings[0].start <= e[1])


def _spans(timing: Timing, events: list[Event]) -> dict[str, float]:
    """One request's time, cut at the instrumented phases into spans that add up to its total."""
    mine = sorted((e for e in events if timing.start <= e[1] <= timing.end), key=lambda e: e[1])
    totals: dict[str, float] = {}
    for label, start, end in mine:
        totals[label] = totals.get(label, 0.0) + end - start
    prepare = next(e for e in mine if e[0] == PREPARE)
    # The prefill comes in pieces (tower, language-model chunks): from the first one's start to the last one's end.
    pieces = [e for e in mine if e[0] == PREFILL]
    prefill = (PREFILL, pieces[0][1], pieces[-1][2])
    steps = [e for e in mine if e[0] == DECODE]
    last = steps[-1][2] if steps else prefill[2]
    stepping = sum(end - start for _, start, end in steps)
    return {
        "total, as the client sees it": timing.end - timing.start,
        "time to first chunk": timing.first - timing.start,
        "client sends → prepare_inputs starts (HTTP in)": prepare[1] - timing.start,
        PREPARE: prepare[2] - prepare[1],
        "prepare_inputs ends → prefill starts (slot, queue)": prefill[1] - prepare[2],
        PREFILL: prefill[2] - prefill[1],
        f"  of which {TOWER}": totals.get(TOWER, 0.0),
        "  prefill ends → first chunk at the client": timing.first - prefill[2],
        f"{len(steps)} decode steps": stepping,
        f"  of which {STEP_INPUTS}": totals.get(STEP_INPUTS, 0.0),
        f"  of which {CHOOSE} (prefill's too)": totals.get(CHOOSE, 0.0),
        f"  of which {ACCEPT} (prefill's too)": totals.get(ACCEPT, 0.0),
        "engine loop between prefill and steps, and between steps": last - prefill[2] - stepping,
        "last step → last chunk at the client": timing.end - last,
        f"({ENCODE}, on the event loop, all chunks)": totals.get(ENCODE, 0.0),
        f"({PARSE})": totals.get(PARSE, 0.0),
    }


def print_breakdown(timings: list[Timing], events: list[Event], bare: Figures, new_tokens: int) -> None:
    spans = [_spans(timing, events) for timing in timings]
    worker_total = statistics.median(s["total, as the client sees it"] for s in spans)
    bare_total = new_tokens / bare.tokens_per_s
    bare_figures = {
        "total, as the client sees it": f"{1000 * bare_total:9.1f}",
        "time to first chunk": f"{bare.ttft_ms:9.1f}",
        PREFILL: f"{bare.ttft_ms:9.1f}",
        f"{new_tokens - 1} decode steps": f"{1000 * bare_total - bare.ttft_ms:9.1f}",
    }
    print(f"\nsingle image stream, ms per request (median of {len(spans)}); bare `generate` at batch 1 beside it")
    print(f"{'phase':62} {'worker':>9} {'share':>6} {'bare':>9}")
    for label in spans[0]:
        value = statistics.median(s.get(label, 0.0) for s in spans)
        share = f"{100 * value / worker_total:5.1f}%"
        print(f"{label:62} {1000 * value:9.1f} {share:>6} {bare_figures.get(label, ''):>9}")
    gaps = [b - a for t in timings for a, b in itertools.pairwise(t.chunk_times)]
    print(
        f"decode step: worker median {1000 * step_median(timings, events):.2f} ms inside the engine, "
        f"{1000 * statistics.median(gaps):.2f} ms between chunks at the client; "
        f"bare generate {bare.tbt_ms:.2f} ms between tokens"
    )


#: Where threads wait for work; left out of the profiles' lists.
IDLE_WAITS = {
    "<method 'poll' of 'select.epoll' objects>",
    "<method 'get' of '_queue.SimpleQueue' objects>",
    "<method 'acquire' of '_thread.lock' objects>",
}


def print_profiles(out: Path, top: int) -> None:
    """Each thread group's functions with the most time of their own."""
    import pstats

    groups: dict[str, list[str]] = {}
    for path in sorted(out.glob("*.pstats")):
        name = path.stem.split("-", 1)[1]
        group = "engine" if name == "engine" else "event_loop" if name == "event_loop" else "other threads"
        if name.startswith("asyncio_"):
            group = "to_thread pool (prepare_inputs)"
        groups.setdefault(group, []).append(str(path))
    for group, paths in groups.items():
        stats = pstats.Stats(*paths)
        rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
        idle = sum(row[1][2] for row in rows if row[0][2] in IDLE_WAITS)
        rows = [row for row in rows if row[0][2] not in IDLE_WAITS]
        total = sum(row[1][2] for row in rows)
        print(
            f"\ncProfile, {group}: {total:.2f} s of own time in all, besides {idle:.2f} s waiting for work; "
            f"the top {top} functions by own time"
        )
        print_rows(rows[:top])
        ours = sorted((row for row in rows if "llava_worker/" in row[0][0]), key=lambda row: row[1][3], reverse=True)
        if ours:
            print(f"the worker's own functions by cumulative time (top {top})")
            print_rows(ours[:top])


def print_rows(rows: list[Any]) -> None:
    print(f"{'own s':>8} {'cum s':>8} {'calls':>8}  function")
    for (filename, line, function), (_, calls, own, cumulative, _) in rows:
        where = filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        print(f"{own:8.3f} {cumulative:8.3f} {calls:8d}  {function} ({where}:{line})")


def run_profile(args: argparse.Namespace) -> None:
    """Single image requests through an instrumented worker, against bare `generate` at batch 1."""
    new_tokens = args.new_tokens or 48
    model = vision_model(args.checkpoints)
    items = vision_items(args.single_requests, first_seed=0)
    print(f"model: {model}  mode: vision --profile  new tokens per request: {new_tokens}  cpus: {os.cpu_count()}")
    bare = bare_generate(model, 1, new_tokens, items)
    timings, events = timed_run(model, items, new_tokens, [])
    worker = summarise(timings, new_tokens, float("nan"))
    print()
    print_figures({"bare generate, batch 1": bare, "worker over HTTP, 1 client (timers)": worker})
    print(f"worker / bare: {worker.tokens_per_s / bare.tokens_per_s:.2f}")
    print_breakdown(timings, events, bare, new_tokens)
    # The same with one chunk per request: what streaming every token costs the decode steps.
    timings, events = timed_run(model, items, new_tokens, ["--stream-interval", str(new_tokens)])
    once = summarise(timings, new_tokens, float("nan"))
    print(
        f"with --stream-interval {new_tokens} (one chunk per request): {once.tokens_per_s:.1f} tokens/s "
        f"({once.tokens_per_s / bare.tokens_per_s:.2f} of bare), decode step median "
        f"{1000 * step_median(timings, events):.2f} ms inside the engine"
    )
    if args.cprofile:
        with tempfile.TemporaryDirectory(prefix="bench-cprofile-") as out:
            timings = instrumented_run(model, items, new_tokens, Path(out), cprofile=True, flags=[])
            profiled = summarise(timings, new_tokens, float("nan"))
            print(f"\nunder cProfile (which slows Python code down): {profiled.tokens_per_s:.1f} tokens/s")
            print_profiles(Path(out), args.top)


# -- the command line ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["text", "image", "vision"], default="text")
    parser.add_argument("--clients", type=int, default=8, help="N: concurrent clients, batch size, worker limit")
    parser.add_argument("--new-tokens", type=int, help="per request (default: 64; vision mode 48)")
    parser.add_argument(
        "--rounds", type=int, help="requests per client in the N-client run (default 2; 1 in the --device cuda levels)"
    )
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "tiny-checkpoints")
    parser.add_argument("--worker-args", default="", help='more flags for the worker, e.g. "--prefill-chunk-tokens 64"')
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the worker and bare generate run: float32 on cpu, float16 on cuda (peak MiB is then GPU memory)",
    )
    vision = parser.add_argument_group("vision mode")
    vision.add_argument("--single-requests", type=int, default=4, help="requests of the 1-client run")
    vision.add_argument("--conversations", type=int, default=2, help="5-turn web-UI conversations, one after another")
    vision.add_argument("--text-tokens", type=int, default=256, help="tokens of the text streams images arrive among")
    vision.add_argument(
        "--arrival-gap",
        type=float,
        default=0.0,
        help="seconds between the image requests that arrive among text streams",
    )
    vision.add_argument("--profile", action="store_true", help="instead: time the phases of single image requests")
    vision.add_argument("--cprofile", action="store_true", help="with --profile: cProfile every worker thread too")
    vision.add_argument("--top", type=int, default=15, help="functions listed per thread with --cprofile")
    gpu = parser.add_argument_group("vision mode with --device cuda (or --llava-7b-shapes)")
    gpu.add_argument(
        "--levels",
        type=levels_list,
        default=[1, 8, 32],
        help="concurrent image requests measured, comma-separated, the first as the reference (default 1,8,32)",
    )
    gpu.add_argument(
        "--llava-7b-shapes",
        action="store_true",
        help="a random-weight model of LLaVA-1.5-7B's exact shapes, built on the GPU in float16 (~14 GB on disk)",
    )
    # The same architecture with tiny sizes, to try the --llava-7b-shapes code path on a CPU.
    gpu.add_argument("--tiny-shapes", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_args(parser, args)
    return args


def levels_list(text: str) -> list[int]:
    try:
        levels = [int(level) for level in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be at least 1: {text!r}")
    return levels


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses combinations that would measure something else than asked."""
    if args.llava_7b_shapes and (args.mode != "vision" or args.profile):
        parser.error("--llava-7b-shapes is for --mode vision (without --profile)")
    if args.llava_7b_shapes and args.device != "cuda" and not args.tiny_shapes:
        parser.error("--llava-7b-shapes needs --device cuda (7 B parameters in float32 on a CPU are no benchmark)")
    if args.tiny_shapes and not args.llava_7b_shapes:
        parser.error("--tiny-shapes goes with --llava-7b-shapes")
    if args.profile and args.device != "cpu":
        # Its phase timers read the host clock around asynchronous GPU work.
        parser.error("--profile runs on the CPU only")
    if args.device == "cuda" and not args.bare_child:
        import torch

        if not torch.cuda.is_available():
            # The worker would log a line and quietly run on the CPU.
            parser.error("--device cuda, but torch sees no CUDA GPU here")


def main() -> None:
    if sys.argv[1:2] == ["--instrumented-worker"]:
        # benchmark.py --instrumented-worker OUT {timers|cprofile} -- worker flags...
        instrumented_worker(Path(sys.argv[2]), sys.argv[3] == "cprofile", sys.argv[5:])
        return
    args = parse_args()
    if args.bare_child:
        spec = sys.stdin.read() if args.bare_child == "-" else args.bare_child
        print(json.dumps(bare_child(json.loads(spec))))
    elif args.mode == "vision" and args.profile:
        run_profile(args)
    elif args.mode == "vision" and (args.device == "cuda" or args.llava_7b_shapes):
        run_vision_levels(args)
    elif args.mode == "vision":
        run_vision(args)
    else:
        run_throughput(args)


if __name__ == "__main__":
    main()
