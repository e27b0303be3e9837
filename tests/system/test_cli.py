"""`python -m llava_worker` as a real process: flags, start-up errors, end to end with FastChat's controller."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from llava_worker.cli import config_from_args
from llava_worker.config import model_name_from_path
from tests.support.original_reference import reference_generate, reference_tokenizer
from tests.support.payloads import PROMPT_1, TEXT_PROMPT, encode_image
from tests.support.processes import REPO, START_WITHIN, WorkerProcess, worker_command, worker_env
from tests.support.servers import free_port, stream_chunks, wait_until

ORIGINAL_FLAGS = [
    "--host",
    "--port",
    "--worker-address",
    "--controller-address",
    "--model-path",
    "--model-base",
    "--model-name",
    "--device",
    "--multi-modal",
    "--limit-model-concurrency",
    "--stream-interval",
    "--no-register",
    "--load-8bit",
    "--load-4bit",
    "--use-flash-attn",
]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts worker processes; whatever is still running at the end is killed."""
    started: list[WorkerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(list(args), tmp_path, env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


def assert_clean_exit(worker: WorkerProcess, sig: signal.Signals) -> None:
    code = worker.stop(sig)
    stderr = worker.stderr()
    assert "Traceback" not in stderr, stderr
    # uvicorn shuts down gracefully on either signal; dying of the signal itself is fine too.
    assert code in (0, -sig), f"exit status {code}\n{stderr}"
    assert "Finished server process" in stderr


def heartbeats_logged(tmp_path: Path, controller: Any, worker_url: str) -> int:
    """Heartbeats FastChat's controller logged from `worker_url` (its log is kept under tmp_path)."""
    log = tmp_path / f"controller-{controller.port}.out"
    text = log.read_text(errors="replace") if log.exists() else ""
    return len(re.findall(rf"Receive heart beat\. {re.escape(worker_url)}$", text, re.MULTILINE))


@pytest.mark.subprocess
def test_help_lists_every_original_flag():
    result = subprocess.run(
        worker_command("--help"), cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in [*ORIGINAL_FLAGS, "--heartbeat-interval"]:
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", result.stdout), f"{flag} missing from --help"
    assert "Traceback" not in result.stderr


def test_defaults_are_the_originals():
    config = config_from_args(["--model-path", "/models/llava-v1.5-7b"])
    assert (config.host, config.port) == ("localhost", 21002)
    assert config.worker_address == "http://localhost:21002"
    assert config.controller_address == "http://localhost:21001"
    assert config.device == "cuda"
    assert (config.limit_model_concurrency, config.stream_interval) == (5, 1)
    assert not (config.no_register or config.multi_modal or config.load_8bit or config.load_4bit)
    assert not config.use_flash_attn
    assert config.model_base is None and config.model_name is None
    assert config.served_model_name == "llava-v1.5-7b"


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/models/llava-v1.5-7b", "llava-v1.5-7b"),
        ("/models/llava-v1.5-7b/", "llava-v1.5-7b"),
        ("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf"),
        ("/runs/llava-lora/checkpoint-1200", "llava-lora_checkpoint-1200"),
        ("/runs/llava-lora/checkpoint-1200/", "llava-lora_checkpoint-1200"),
        ("runs/my-run/checkpoint-7", "my-run_checkpoint-7"),
        ("/runs/checkpoint-3/final", "final"),
    ],
)
def test_model_name_from_path(path, name):
    assert model_name_from_path(path) == name


def test_model_name_flag_wins_over_the_path():
    config = config_from_args(["--model-path", "/runs/x/checkpoint-5", "--model-name", "custom"])
    assert config.served_model_name == "custom"


IMPOSSIBLE = {
    "8bit-and-4bit": (["--load-8bit", "--load-4bit"], "--load-8bit and --load-4bit"),
    "flash-attn-missing": (["--use-flash-attn"], "--use-flash-attn"),
    "missing-path": (["--model-path", "/nonexistent/dir"], "/nonexistent/dir"),
    "multi-modal-text-only": (["--multi-modal"], "--multi-modal"),
    # "@name" stands for the path of that tiny checkpoint.
    "lora-without-model-base": (["--model-path", "@llava-v1.5-lora"], "--model-base"),
    "vision-tower-on-llava-hf": (["--model-path", "@llava-1.5", "--vision-tower", "@clip-tower"], "--vision-tower"),
}


@pytest.fixture(scope="module")
def refused(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Runs every impossible command line at once (each pays for importing torch): name → (status, stderr)."""
    log_dir = tmp_path_factory.mktemp("refused")
    text_only = str(checkpoints["text-only"])
    processes: dict[str, subprocess.Popen[bytes]] = {}
    results: dict[str, tuple[int, str]] = {}
    try:
        for name, (named_flags, _) in IMPOSSIBLE.items():
            flags = [str(checkpoints[f[1:]]) if f.startswith("@") else f for f in named_flags]
            # The text-only checkpoint unless the case names its own path; it cannot be the problem.
            args = ["--model-path", text_only, *flags] if "--model-path" not in flags else flags
            command = worker_command(*args, "--device", "cpu", "--no-register", "--port", str(free_port()))
            with open(log_dir / f"{name}.err", "wb") as stderr:
                processes[name] = subprocess.Popen(
                    command, cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL, stderr=stderr
                )
        for name, process in processes.items():
            try:
                code = process.wait(timeout=START_WITHIN)
            except subprocess.TimeoutExpired:
                code = -999  # still running: it did not refuse; reported by the test
            results[name] = (code, (log_dir / f"{name}.err").read_text(errors="replace"))
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    return results


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
@pytest.mark.subprocess
def test_impossible_flags_end_with_one_clear_line(case, refused):
    if case == "flash-attn-missing" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    code, stderr = refused[case]
    assert code != -999, f"the worker did not stop within {START_WITHIN} s:\n{stderr}"
    assert code != 0
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("llava-worker: error:")]
    assert len(errors) == 1, stderr
    assert IMPOSSIBLE[case][1] in errors[0]
    assert stderr.strip().splitlines()[-1] == errors[0]  # the last word is the reason


@pytest.mark.subprocess
def test_end_to_end_with_fastchat_controller(checkpoints, start_controller, launch, tmp_path):
    controller = start_controller()
    worker = launch(
        "--model-path",
        str(checkpoints["llava-1.5"]),
        "--device",
        "cpu",
        "--controller-address",
        controller.url,
        "--heartbeat-interval",
        "1",
    )
    name = "tiny-llava-1.5"
    worker.wait_listed(controller, name)
    address = controller.worker_address(name)
    assert address == worker.url

    body = {"model": name, "prompt": PROMPT_1, "images": [encode_image(1)], "temperature": 0, "max_new_tokens": 8}
    chunks = stream_chunks(address, body)
    assert chunks and all(chunk["error_code"] == 0 for chunk in chunks), chunks
    assert all(chunk["text"].startswith(PROMPT_1) for chunk in chunks)
    assert len(chunks[-1]["text"]) > len(PROMPT_1)
    # The status call races the end of the stream; wait for the request to have left the engine.
    wait_until(lambda: worker.status()["queue_length"] == 0, 5, "the worker to be idle")
    assert worker.status() == {"model_names": [name], "speed": 1, "queue_length": 0}
    wait_until(lambda: heartbeats_logged(tmp_path, controller, worker.url) >= 2, 10, "heartbeats every second")

    assert_clean_exit(worker, signal.SIGINT)


@pytest.mark.subprocess
def test_original_lora_checkpoint_with_model_base_and_vision_tower_flags(checkpoints, launch):
    """The original's command line for a LoRA checkpoint, with the tower given as a local copy."""
    worker = launch(
        "--model-path",
        str(checkpoints["llava-v1.5-lora"]),
        "--model-base",
        str(checkpoints["vicuna-base"]),
        "--vision-tower",
        str(checkpoints["clip-tower"]),
        "--device",
        "cpu",
        "--no-register",
    ).wait_serving()
    body = {"prompt": PROMPT_1, "images": [encode_image(1)], "temperature": 0, "max_new_tokens": 8}
    chunks = stream_chunks(worker.url, body)
    assert chunks[-1]["error_code"] == 0 and len(chunks[-1]["text"]) > len(PROMPT_1), chunks[-1]
    assert "merged 14 LoRA weights" in worker.stderr()
    assert_clean_exit(worker, signal.SIGTERM)


def _hub_cache_with(cache: Path, repos: dict[str, Path]) -> None:
    """A Hugging Face cache holding `repos` (hub id -> files) as if downloaded: what an offline
    machine with pre-fetched models has."""
    commit = "0" * 40
    for repo_id, files in repos.items():
        storage = cache / ("models--" + repo_id.replace("/", "--"))
        (storage / "refs").mkdir(parents=True)
        (storage / "refs" / "main").write_text(commit)
        shutil.copytree(files, storage / "snapshots" / commit)


@pytest.mark.subprocess
def test_original_checkpoint_and_its_tower_by_hub_id(checkpoints, launch, tmp_path):
    """Hub ids for the checkpoint and for the mm_vision_tower it names, resolved from the local cache."""
    cache = tmp_path / "hub-cache"
    tower_id = json.loads((checkpoints["llava-v1.6-mistral"] / "config.json").read_text())["mm_vision_tower"]
    _hub_cache_with(
        cache, {"liuhaotian/llava-v1.6-tiny": checkpoints["llava-v1.6-mistral"], tower_id: checkpoints["clip-tower"]}
    )
    worker = launch(
        *("--model-path", "liuhaotian/llava-v1.6-tiny", "--device", "cpu", "--no-register"),
        env={"HF_HUB_CACHE": str(cache)},
    ).wait_serving()
    image = encode_image(1, (40, 30))
    chunks = stream_chunks(worker.url, {"prompt": PROMPT_1, "images": [image], "temperature": 0, "max_new_tokens": 8})
    pil = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
    ids = reference_generate(
        checkpoints["llava-v1.6-mistral"], PROMPT_1, [pil], 8, vision_tower=checkpoints["clip-tower"]
    )
    tokenizer = reference_tokenizer(checkpoints["llava-v1.6-mistral"])
    answer = str(tokenizer.decode(ids, skip_special_tokens=True))
    assert chunks[-1] == {"text": PROMPT_1 + answer, "error_code": 0}
    assert_clean_exit(worker, signal.SIGTERM)


def test_original_flags_reach_the_config():
    config = config_from_args(
        ["--model-path", "m", "--model-base", "b", "--vision-tower", "t", "--pad-images", "--device", "cpu"]
    )
    assert (config.model_base, config.vision_tower, config.pad_images) == ("b", "t", True)


@pytest.mark.subprocess
def test_model_name_flag_is_announced(checkpoints, start_controller, launch):
    controller = start_controller()
    worker = launch(
        "--model-path",
        str(checkpoints["text-only"]),
        "--model-name",
        "custom",
        "--device",
        "cpu",
        "--controller-address",
        controller.url,
        "--heartbeat-interval",
        "1",
    )
    worker.wait_listed(controller, "custom")
    assert controller.list_models() == ["custom"]
    assert controller.worker_address("custom") == worker.url
    assert worker.status()["model_names"] == ["custom"]
    assert_clean_exit(worker, signal.SIGTERM)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to fall back from")
@pytest.mark.subprocess
def test_device_cuda_without_a_gpu_falls_back_to_the_cpu(checkpoints, launch, tmp_path):
    # Served from a `checkpoint-N` directory, so the announced name follows the original's rule.
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    (run_dir / "checkpoint-7").symlink_to(checkpoints["text-only"], target_is_directory=True)
    worker = launch("--model-path", str(run_dir / "checkpoint-7"), "--device", "cuda", "--no-register")
    worker.wait_serving()
    stderr = worker.stderr()
    assert "Traceback" not in stderr, stderr
    assert re.search(r"WARNING .*--device cuda was requested but CUDA is not available; running on the CPU", stderr)
    assert re.search(r"loaded .* on cpu,", stderr), stderr

    assert worker.status() == {"model_names": ["my-run_checkpoint-7"], "speed": 1, "queue_length": 0}
    body = {"model": "my-run_checkpoint-7", "prompt": TEXT_PROMPT, "temperature": 0, "max_new_tokens": 8}
    chunks = stream_chunks(worker.url, body)
    assert chunks and all(chunk["error_code"] == 0 for chunk in chunks), chunks
    assert chunks[-1]["text"].startswith(TEXT_PROMPT) and len(chunks[-1]["text"]) > len(TEXT_PROMPT)
    assert_clean_exit(worker, signal.SIGTERM)
