#!/usr/bin/env python
"""Measures the worker against bare `model.generate` on the same model and machine, in one run.

    python scripts/benchmark.py                 # text mode: a random 21 M-parameter Llama
    python scripts/benchmark.py --mode image    # image mode: a tiny LLaVA-1.5, one image per request

Prints aggregate generated tokens/s, median time to first token (TTFT), median time between tokens
(TBT) and peak memory for: bare `generate` at batch 1 and batch N, and the worker over real HTTP
with 1 and N concurrent streaming clients; then the ratios, and how much later a request that
arrives while N-1 others are decoding gets its first token than it would alone.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_worker.testing.tiny import build_all, build_benchmark_llama, make_test_image  # noqa: E402

TEXT_PROMPTS = [
    "USER: Tell me a story about the sea. ASSISTANT:",
    "USER: What is the capital of the little island where the boat sails? ASSISTANT:",
    "USER: Hi. ASSISTANT:",
    "USER: Describe a walk through a quiet forest at dawn, with birds. ASSISTANT:",
]
IMAGE_PROMPT = "USER: <image>\nWhat is shown in this picture? ASSISTANT:"


@dataclass
class Figures:
    """One configuration's results."""

    tokens_per_s: float
    ttft_ms: float
    tbt_ms: float
    peak_mib: float


def prompts_for(mode: str, count: int) -> list[tuple[str, str | None]]:
    """(prompt, base64 image or None) pairs; images differ per request."""
    if mode == "text":
        return [(TEXT_PROMPTS[i % len(TEXT_PROMPTS)], None) for i in range(count)]
    result: list[tuple[str, str | None]] = []
    for i in range(count):
        buffer = io.BytesIO()
        make_test_image(i, (40 + 3 * i, 30)).save(buffer, format="PNG")
        result.append((IMAGE_PROMPT, base64.b64encode(buffer.getvalue()).decode()))
    return result


# -- bare generate, in a child process so its peak memory is its own --------------------------------


def bare_child(spec: dict[str, Any]) -> dict[str, float]:
    """Runs in its own process: bare `model.generate` over `items`, `batch` prompts at a time."""
    import resource

    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    path, batch, new_tokens = spec["model"], spec["batch"], spec["new_tokens"]
    items: list[tuple[str, str | None]] = spec["items"]
    image_mode = any(image for _, image in items)
    encoder: Any
    if image_mode:
        encoder = AutoProcessor.from_pretrained(path)
        encoder.tokenizer.padding_side = "left"
        model: Any = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    else:
        encoder = AutoTokenizer.from_pretrained(path)
        encoder.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()

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
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bare_generate(model: Path, batch: int, new_tokens: int, items: list[tuple[str, str | None]]) -> Figures:
    spec = json.dumps({"model": str(model), "batch": batch, "new_tokens": new_tokens, "items": items})
    result = subprocess.run(
        [sys.executable, __file__, "--bare-child", spec], capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"bare generate failed:\n{result.stderr[-3000:]}")
    return Figures(**json.loads(result.stdout.strip().splitlines()[-1]))


# -- the worker over HTTP --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WorkerProcess:
    def __init__(self, model: Path, limit: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "llava_worker", "--model-path", str(model), "--device", "cpu"),
                *("--no-register", "--host", "127.0.0.1", "--port", str(self.port)),
                *("--limit-model-concurrency", str(limit)),
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the worker exited; see {self.log.name}")
            try:
                requests.post(self.url + "/worker_get_status", timeout=2)
                return
            except requests.RequestException:
                time.sleep(0.2)
        raise SystemExit(f"the worker did not start in 180 s; see {self.log.name}")

    def peak_mib(self) -> float:
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


def stream_one(url: str, prompt: str, image: str | None, new_tokens: int) -> Timing:
    payload: dict[str, Any] = {"prompt": prompt, "temperature": 0, "max_new_tokens": new_tokens}
    if image:
        payload["images"] = [image]
    start = time.perf_counter()
    times: list[float] = []
    with requests.post(url + "/worker_generate_stream", json=payload, stream=True, timeout=600) as response:
        for chunk in response.iter_lines(delimiter=b"\0"):
            if not chunk:
                continue
            data = json.loads(chunk)
            if data["error_code"] != 0:
                raise SystemExit(f"the worker answered an error: {data['text']}")
            times.append(time.perf_counter())
    return Timing(start, times[0], times, time.perf_counter())


def worker_clients(url: str, clients: int, items: list[tuple[str, str | None]], new_tokens: int) -> list[Timing]:
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
    for thread in threads:
        thread.join()
    return timings


def summarise(timings: list[Timing], new_tokens: int, peak: float) -> Figures:
    wall = max(t.end for t in timings) - min(t.start for t in timings)
    gaps = [b - a for t in timings for a, b in itertools.pairwise(t.chunk_times)]
    return Figures(
        tokens_per_s=len(timings) * new_tokens / wall,
        ttft_ms=1000 * statistics.median(t.first - t.start for t in timings),
        tbt_ms=1000 * statistics.median(gaps),
        peak_mib=peak,
    )


def late_arrival(url: str, clients: int, items: list[tuple[str, str | None]], new_tokens: int) -> tuple[float, float]:
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
    for thread in threads:
        thread.join()
    step_gaps = [b - a for t in busy for a, b in itertools.pairwise(t.chunk_times)]
    return late.first - late.start, statistics.median(step_gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["text", "image"], default="text")
    parser.add_argument("--clients", type=int, default=8, help="N: concurrent clients, batch size, worker limit")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client in the N-client run")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "tiny-checkpoints")
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_child:
        print(json.dumps(bare_child(json.loads(args.bare_child))))
        return
    n, new_tokens = args.clients, args.new_tokens

    if args.mode == "text":
        model = args.checkpoints / "bench-llama-21m"
        if not (model / "config.json").exists():
            build_benchmark_llama(model)
    else:
        model = build_all(args.checkpoints)["llava-1.5"]
    items = prompts_for(args.mode, n * args.rounds)
    print(f"model: {model}  mode: {args.mode}  N={n}  new tokens per request: {new_tokens}  torch threads: default")
    print(f"cpus: {os.cpu_count()}; figures vary with machine load, compare the ratios")

    results: dict[str, Figures] = {}
    results["bare generate, batch 1"] = bare_generate(model, 1, new_tokens, items[: max(4, n // 2)])
    results[f"bare generate, batch {n}"] = bare_generate(model, n, new_tokens, items)

    worker = WorkerProcess(model, n)
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
    print(f"{'configuration':34} {'tokens/s':>10} {'TTFT ms':>9} {'TBT ms':>8} {'peak MiB':>9}")
    for name, figures in results.items():
        print(
            f"{name:34} {figures.tokens_per_s:10.1f} {figures.ttft_ms:9.1f} {figures.tbt_ms:8.2f} "
            f"{figures.peak_mib:9.0f}"
        )
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


if __name__ == "__main__":
    main()
