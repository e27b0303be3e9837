"""ModelWorker: admission, generation streams, status and the controller link for one model."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llava_worker.admission import AdmissionGate, Slot
from llava_worker.config import MAX_NEW_TOKENS_CAP, WorkerConfig
from llava_worker.controller import ControllerLink
from llava_worker.engine import Engine, RequestHandle
from llava_worker.errors import WorkerError
from llava_worker.generation import GenerationOutput
from llava_worker.inputs import prepare_inputs
from llava_worker.loader import LoadedModel
from llava_worker.protocol import EXCEEDS_CONTEXT_TEXT, GenerateParams, encode_chunk, worker_status
from llava_worker.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamChunk:
    """One step of a request's answer: the text so far (prompt included), cumulative."""

    text: str
    completion_tokens: int = 0
    finish_reason: str | None = None


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


class ModelWorker:
    """Serves one loaded model: the original worker's public methods, without its blocking calls."""

    def __init__(self, config: WorkerConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.loaded = loaded
        self.worker_addr = config.worker_address
        self.model_name = config.served_model_name
        self.gate = AdmissionGate(config.limit_model_concurrency)
        # The gate lets at most `limit` requests into the engine, so they all decode in one batch.
        self.engine = Engine(loaded, max_batch=config.limit_model_concurrency)
        self.controller: ControllerLink | None = None
        if not config.no_register:
            self.controller = ControllerLink(
                config.controller_address,
                config.worker_address,
                self.get_status,
                multimodal=loaded.takes_images,
                heartbeat_interval=config.heartbeat_interval,
                timeout=config.controller_timeout,
            )

    async def start(self) -> None:
        """Starts the engine, and registration and heartbeats in the background (unless `--no-register`)."""
        self.engine.start()
        if self.controller is not None:
            await self.controller.start()

    async def stop(self) -> None:
        if self.controller is not None:
            await self.controller.stop()
        await asyncio.to_thread(self.engine.stop)

    async def register_to_controller(self) -> bool:
        """Registers once now; the background task keeps it registered afterwards."""
        return self.controller is not None and await self.controller.register()

    async def send_heart_beat(self) -> bool:
        """Sends one heartbeat now (re-registering if the controller forgot this worker)."""
        return self.controller is not None and await self.controller.heartbeat()

    def get_queue_length(self) -> int:
        return self.gate.queue_length

    def get_status(self) -> dict[str, Any]:
        return worker_status(self.model_name, self.get_queue_length())

    async def generate_stream(self, params: GenerateParams, request_id: str) -> AsyncIterator[StreamChunk]:
        """Streams one request's answer; raises WorkerError (or anything else) on failure.

        The request takes a slot only once its inputs are ready, so a bad image is refused without
        waiting in line; the slot goes back when generation has really stopped, on every path.
        """
        started = time.perf_counter()
        inputs = await asyncio.to_thread(prepare_inputs, self.loaded, params.prompt, params.images)
        room = self.loaded.context_length - inputs.prompt_tokens
        max_new_tokens = min(params.max_new_tokens, MAX_NEW_TOKENS_CAP, room)
        if max_new_tokens < 1:
            logger.info("request %s: prompt of %d tokens leaves no room", request_id, inputs.prompt_tokens)
            yield StreamChunk(params.prompt + EXCEEDS_CONTEXT_TEXT, finish_reason="length")
            return

        # The queue grows now; tell the controller soon (the heartbeat runs on its own task).
        self._notify_controller()
        try:
            slot = await self.gate.acquire()
        except asyncio.CancelledError:
            self._notify_controller()  # gave up while waiting: the queue shrank again
            raise
        handle: RequestHandle | None = None
        try:
            handle = self.engine.submit(
                inputs,
                self._sampling(params),
                params.stop,
                max_new_tokens,
                self.config.stream_interval,
                on_done=lambda final: self._finish(slot, request_id, inputs.prompt_tokens, started, final),
            )
            sent = None
            async for output in handle.outputs():
                if output.error is not None:
                    raise output.error
                text = params.prompt + output.text
                # The final output always goes out, even with no new text, for its finish reason.
                if text != sent or output.finished:
                    sent = text
                    yield StreamChunk(text, output.completion_tokens, output.finish_reason)
        finally:
            if handle is None:
                slot.release()
            else:
                # On disconnect this takes the request out of the batch at the next token boundary;
                # the engine then frees the slot.
                handle.cancel()

    def _sampling(self, params: GenerateParams) -> SamplingParams:
        if params.greedy:
            return SamplingParams()
        return SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=self.engine.default_top_k)

    async def generate_stream_gate(self, params: GenerateParams, request_id: str) -> AsyncIterator[bytes]:
        """The wire bytes of `generate_stream`; any failure becomes one final error chunk."""
        previous = None
        try:
            async for chunk in self.generate_stream(params, request_id):
                # The wire carries only text, so a final chunk that adds none would be a repeat.
                if chunk.text != previous:
                    previous = chunk.text
                    yield encode_chunk(chunk.text)
        except Exception as exc:
            yield encode_chunk(describe_failure(exc, request_id), error_code=1)

    def _finish(self, slot: Slot, request_id: str, prompt_tokens: int, started: float, final: GenerationOutput) -> None:
        """Runs when a request has left the engine, however it ended: frees its slot and logs it."""
        slot.release()
        self._notify_controller()
        outcome = "error" if final.error is not None else final.finish_reason
        logger.info(
            "request %s: %s, %d prompt tokens, %d new tokens, %.2f s",
            request_id,
            outcome,
            prompt_tokens,
            final.completion_tokens,
            time.perf_counter() - started,
        )

    def _notify_controller(self) -> None:
        if self.controller is not None:
            self.controller.notify()


def describe_failure(exc: BaseException, request_id: str) -> str:
    """The user-facing text of a failure, logged with the request id; the one place errors meet the wire."""
    if isinstance(exc, WorkerError):
        logger.warning("request %s failed: %s", request_id, exc)
        return str(exc)
    logger.error("request %s failed unexpectedly", request_id, exc_info=exc)
    return f"internal error ({type(exc).__name__}: {exc}); request id {request_id}"
