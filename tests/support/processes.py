"""`python -m llava_worker` as a real process on 127.0.0.1, for the tests of the command line and of signals."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import requests

from tests.support.servers import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
#: Importing torch and transformers on a busy two-core machine takes a while; this bounds it.
START_WITHIN = 240.0
#: A worker asked to stop (SIGINT/SIGTERM) must be gone by then.
EXIT_WITHIN = 30.0


def worker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llava_worker", *args]


def worker_env() -> dict[str, str]:
    # Local checkpoints only: never wait on the network.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _limit_open_files(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


class WorkerProcess:
    """One `python -m llava_worker` on 127.0.0.1, its stderr kept in a file."""

    def __init__(
        self, args: list[str], log_dir: Path, env: dict[str, str] | None = None, open_files: int | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = log_dir / f"worker-{self.port}.err"
        command = worker_command("--host", "127.0.0.1", "--port", str(self.port), "--worker-address", self.url, *args)
        with open(self.stderr_path, "wb") as stderr, open(log_dir / f"worker-{self.port}.out", "wb") as stdout:
            environment = worker_env() | (env or {})
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=environment,
                stdout=stdout,
                stderr=stderr,
                preexec_fn=None if open_files is None else partial(_limit_open_files, open_files),
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"the worker exited with {self.process.returncode}:\n{self.stderr()}")

    def _answers(self, path: str) -> bool:
        self._check_running()
        try:
            return requests.request("GET" if path == "/ready" else "POST", self.url + path, timeout=2).ok
        except requests.RequestException:
            return False

    def wait_serving(self) -> WorkerProcess:
        """Until it answers the worker protocol."""
        wait_until(lambda: self._answers("/worker_get_status"), START_WITHIN, "the worker to serve", interval=0.2)
        return self

    def wait_ready(self) -> WorkerProcess:
        """Until its readiness probe says its engine answers."""
        wait_until(lambda: self._answers("/ready"), START_WITHIN, "the worker process to be ready", interval=0.2)
        return self

    def wait_listed(self, controller: Any, name: str) -> None:
        def listed() -> bool:
            self._check_running()
            return name in controller.list_models()

        wait_until(listed, START_WITHIN, f"the controller to list {name}", interval=0.2)

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = requests.post(self.url + "/worker_get_status", timeout=10).json()
        return answer

    def wait_exit(self) -> int:
        """The exit status; fails if the process outlives EXIT_WITHIN."""
        try:
            return self.process.wait(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not exit within {EXIT_WITHIN} s:\n{self.stderr()}") from None

    def stop(self, sig: signal.Signals) -> int:
        """Sends `sig` and returns the exit status."""
        self.process.send_signal(sig)
        return self.wait_exit()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
