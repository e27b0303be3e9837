#!/usr/bin/env python3
"""End-to-end demo: a real FastChat controller, this worker on a tiny checkpoint, one streamed request.

Builds the tiny random-weight checkpoints into ./tiny-checkpoints (once), starts FastChat's
controller and `python -m llava_worker` as separate processes on free loopback ports, waits until
the controller lists the model, then does what LLaVA's `test_message.py` does: asks the controller
for the worker's address and sends that worker a templated prompt (with one image for the LLaVA
models), printing the answer as it streams in. Both processes are shut down however the demo ends.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_ROOT = REPO_ROOT / "tiny-checkpoints"
STARTUP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 10.0
#: LLaVA-1.5's conversation template (`conv_vicuna_v1` / `conv_llava_v1`): system line, `USER:`, `ASSISTANT:`.
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
DEFAULT_IMAGE_QUESTION = "What is shown in this image?"
DEFAULT_TEXT_QUESTION = "Tell me a story about the sea."
#: The template's `sep2`, which LLaVA's clients send as the stop string.
STOP = "</s>"


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


class Service:
    """A subprocess whose stdout and stderr go to a log file, printed when something goes wrong."""

    def __init__(self, name: str, args: list[str], cwd: Path, log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(
            args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise DemoError(f"the {self.name} exited early with status {code}")

    def stop(self) -> None:
        """Terminate, wait a bounded time, then kill."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"[demo] the {self.name} did not stop within {SHUTDOWN_TIMEOUT_S:.0f} s; killing it")
                self.process.kill()
                self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        self._log.close()

    def print_log(self, max_lines: int = 80) -> None:
        lines = self.log_path.read_text(errors="replace").splitlines()
        print(f"----- last {min(len(lines), max_lines)} lines of the {self.name}'s output ({self.log_path.name}) -----")
        for line in lines[-max_lines:]:
            print(line)
        print(f"----- end of the {self.name}'s output -----")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_prompt(question: str, with_image: bool) -> str:
    user = f"<image>\n{question}" if with_image else question
    return f"{SYSTEM_PROMPT} USER: {user} ASSISTANT:"


def encode_test_image() -> str:
    from llava_worker.testing.tiny import make_test_image

    buffer = io.BytesIO()
    make_test_image(seed=0, size=(64, 48)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def wait_for_model(client: httpx.Client, controller: str, model: str, services: list[Service]) -> None:
    """Polls the controller's `/list_models` until `model` is there (bounded by STARTUP_TIMEOUT_S)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_problem = "no answer yet"
    while time.monotonic() < deadline:
        for service in services:
            service.check_alive()
        try:
            models = client.post(f"{controller}/list_models", timeout=5).json().get("models", [])
            if model in models:
                return
            last_problem = f"the controller lists {models or 'no models'}"
        except (httpx.HTTPError, ValueError) as exc:
            last_problem = f"the controller did not answer ({type(exc).__name__}: {exc})"
        time.sleep(0.5)
    raise DemoError(f"{model} was not registered within {STARTUP_TIMEOUT_S:.0f} s: {last_problem}")


def stream_chunks(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The NUL-delimited JSON chunks of a `/worker_generate_stream` answer, as they arrive."""
    buffer = b""
    for data in response.iter_bytes():
        buffer += data
        *complete, buffer = buffer.split(b"\0")
        for piece in complete:
            if piece.strip():
                yield json.loads(piece)
    if buffer.strip():
        yield json.loads(buffer)


def generate(client: httpx.Client, worker: str, payload: dict[str, Any]) -> str:
    """Sends one request and prints each chunk's new text as it arrives; returns the whole answer."""
    prompt: str = payload["prompt"]
    shown = ""
    with client.stream("POST", f"{worker}/worker_generate_stream", json=payload, timeout=REQUEST_TIMEOUT_S) as resp:
        if resp.status_code != 200:
            resp.read()
            raise DemoError(f"the worker answered HTTP {resp.status_code}: {resp.text[:500]}")
        for chunk in stream_chunks(resp):
            if chunk.get("error_code", 0) != 0:
                print()
                raise DemoError(f"the worker reported an error (error_code {chunk['error_code']}): {chunk['text']}")
            text: str = chunk["text"]
            if not text.startswith(prompt):
                raise DemoError(f"a chunk does not start with the prompt: {text[:200]!r}")
            answer = text[len(prompt) :]
            # Cumulative chunks: print only what is new since the previous one.
            print(answer[len(shown) :] if answer.startswith(shown) else f"\n{answer}", end="", flush=True)
            shown = answer
    print()
    return shown


def worker_status_when_idle(client: httpx.Client, worker: str, timeout: float = 5.0) -> Any:
    """The worker's status, polled briefly: the slot frees once the generation thread has exited,
    which can be a moment after the last chunk arrived."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.post(f"{worker}/worker_get_status", timeout=10).json()
        if status.get("queue_length") == 0 or time.monotonic() >= deadline:
            return status
        time.sleep(0.1)


#: Tiny checkpoints in the original LLaVA layout, with the flags the original's users give them
#: ("@name" is the path of another tiny checkpoint).
ORIGINAL_MODELS: dict[str, tuple[str, list[str]]] = {
    "original-v1.5": ("llava-v1.5-llava_llama", []),
    "original-v1.5-lora": ("llava-v1.5-lora", ["--model-base", "@vicuna-base"]),
    "original-v1.6": ("llava-v1.6-mistral", ["--vision-tower", "@clip-tower"]),
    "internvl-chat": ("internvl-chat-7b", []),
}


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def run_demo(args: argparse.Namespace, stack: ExitStack) -> None:
    from llava_worker.testing.tiny import CHECKPOINT_DIRS, build_all
    from llava_worker.testing.tiny_internvl_chat import build_internvl_chat_checkpoints
    from llava_worker.testing.tiny_original import build_original_checkpoints

    print(f"[demo] building the tiny checkpoints in {CHECKPOINT_ROOT} (once; later runs reuse them)")
    paths = build_all(CHECKPOINT_ROOT)
    extra_flags: list[str] = []
    if args.model in ORIGINAL_MODELS:
        paths |= build_original_checkpoints(CHECKPOINT_ROOT) | build_internvl_chat_checkpoints(CHECKPOINT_ROOT)
        checkpoint, flags = ORIGINAL_MODELS[args.model]
        model_dir = paths[checkpoint]
        extra_flags = [_relative(paths[f[1:]]) if f.startswith("@") else f for f in flags]
    else:
        model_dir = CHECKPOINT_ROOT / CHECKPOINT_DIRS[args.model]
    model_name = model_dir.name
    with_image = args.model != "text-only"

    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llava-worker-demo-")))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", LOGDIR=str(workdir))
    ctl_port, worker_port = free_port(), free_port()
    controller = f"http://127.0.0.1:{ctl_port}"
    worker_address = f"http://127.0.0.1:{worker_port}"
    services: list[Service] = []

    def stop_all() -> None:
        # The worker first, so its last heartbeat does not hit a controller that is already gone.
        for service in reversed(services):
            service.stop()

    stack.callback(stop_all)
    try:
        print(f"[demo] starting FastChat's controller on {controller}")
        ctl_cmd = [sys.executable, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(ctl_port)]
        # It writes controller.log into its working directory, hence the temporary one.
        services.append(Service("controller", ctl_cmd, workdir, workdir / "controller.out", env))
        model_flags = ["--model-path", _relative(model_dir), *extra_flags]
        print(f"[demo] starting the worker on {worker_address} with {' '.join(model_flags)}")
        worker_cmd = [
            *(sys.executable, "-m", "llava_worker", "--host", "127.0.0.1", "--port", str(worker_port)),
            *("--worker-address", worker_address, "--controller-address", controller),
            *(*model_flags, "--device", "cpu", "--heartbeat-interval", "2"),
        ]
        services.append(Service("worker", worker_cmd, REPO_ROOT, workdir / "worker.out", env))

        with httpx.Client() as client:
            print(f"[demo] waiting (at most {STARTUP_TIMEOUT_S:.0f} s) for the controller to list {model_name}")
            started = time.monotonic()
            wait_for_model(client, controller, model_name, services)
            print(f"[demo] registered after {time.monotonic() - started:.1f} s")

            # As LLaVA's test_message.py: the controller tells which worker serves the model.
            address = client.post(f"{controller}/get_worker_address", json={"model": model_name}, timeout=10)
            worker = str(address.json().get("address", ""))
            if not worker:
                raise DemoError(f"the controller has no worker address for {model_name}")
            print(f"[demo] the controller routes {model_name} to {worker}")

            question = args.prompt or (DEFAULT_IMAGE_QUESTION if with_image else DEFAULT_TEXT_QUESTION)
            prompt = build_prompt(question, with_image)
            payload: dict[str, Any] = {
                "model": model_name,
                "prompt": prompt,
                "temperature": 0.0,
                "top_p": 1.0,
                "max_new_tokens": args.max_new_tokens,
                "stop": STOP,
            }
            if with_image:
                payload["images"] = [encode_test_image()]
            print()
            print("[demo] note: the tiny model's weights are random, so its words are random too;")
            path = "controller, worker, image, streaming" if with_image else "controller, worker, streaming"
            print(f"[demo] what this shows is the whole path working: {path}.")
            print()
            print(f"Prompt: {prompt}" + ("   (+ one 64x48 PNG image)" if with_image else ""))
            print("Answer: ", end="", flush=True)
            answer = generate(client, worker, payload)
            if not answer:
                raise DemoError("the worker streamed no text")
            print()
            status = worker_status_when_idle(client, worker)
            print(f"[demo] worker status: {json.dumps(status)}")
    except Exception:
        for service in services:
            service.print_log()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--model",
        choices=["llava-1.5", "llava-next", "text-only", *ORIGINAL_MODELS],
        default="llava-1.5",
        help="tiny checkpoint to serve (default: llava-1.5); original-* are in the original LLaVA layout, "
        "internvl-chat is InternVL-Chat-1.0 (that layout with an InternViT-6B tower)",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"the user's question (default: {DEFAULT_IMAGE_QUESTION!r}; text-only: {DEFAULT_TEXT_QUESTION!r})",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length of the answer in tokens (default: 32)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    try:
        with ExitStack() as stack:
            run_demo(args, stack)
    except DemoError as exc:
        print(f"[demo] FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[demo] interrupted", file=sys.stderr)
        return 130
    print("[demo] done; controller and worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
