"""ModelWorker: admission, generation streams, status, draining and the controller link for one model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from llava_worker.admission import AdmissionGate, Slot
from llava_worker.config import MAX_NEW_TOKENS_CAP, WorkerConfig
from llava_worker.controller import ControllerLink
from llava_worker.engine.core import Engine, RequestHandle
from llava_worker.engine.sampling import SamplingParams
from llava_worker.engine.streams import GenerationOutput
from llava_worker.errors import GenerationError, WorkerError
from llava_worker.metrics import WorkerMetrics
from llava_worker.models.images import ImageLimits
from llava_worker.models.inputs import prepare_inputs
from llava_worker.models.loader import LoadedModel
from llava_worker.protocol import (
    EXCEEDS_CONTEXT_TEXT,
    GenerateParams,
    chunk_body,
    encode_chunk,
    usage,
    worker_status,
)

logger = logging.getLogger(__name__)

#: How long a readiness probe may wait for the engine loop to answer.
READY_PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class StreamChunk:
    """One step of a request's answer: the text so far (prompt included), cumulative."""

    text: str
    completion_tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int = 0


#: Yielded by `generate_stream` while the request waits for a slot; sent as a lone `\0`.
KEEPALIVE = StreamChunk("")


@dataclass
class _RequestRecord:
    """What the request's log line and metrics need, gathered along the way."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    first_text_at: float | None = None


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


class ShuttingDownError(GenerationError):
    """The worker is draining for shutdown and admits no new work."""

    def __init__(self) -> None:
        super().__init__("the worker is shutting down; send the request again (to another worker)")


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
        self.metrics = WorkerMetrics(self.get_queue_length, lambda: self.gate.running)
        self.image_limits = ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
        self.draining = False
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

    async def drain(self, grace: float) -> None:
        """Stops admitting, lets running requests finish for `grace` seconds, then cancels the rest.

        Heartbeats stop at once, so the controller stops routing here; requests still waiting for a
        slot, and any that arrive from now on, get a shutdown error.
        """
        self.draining = True
        logger.info("draining: %d running, %d waiting; grace %.0f s", self.gate.running, self.gate.waiting, grace)
        if self.controller is not None:
            await self.controller.stop()
        self.gate.close(ShuttingDownError())
        try:
            async with asyncio.timeout(grace):
                await self.gate.wait_idle()
        except TimeoutError:
            logger.warning("%d requests still running after %.0f s; cancelling them", self.gate.running, grace)
            self.engine.abort_all()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    await self.gate.wait_idle()

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

    async def readiness(self) -> str | None:
        """None when the worker can serve (engine loop alive and answering); else the reason it cannot."""
        if self.draining:
            return "shutting down"
        if not self.engine.alive:
            return "the generation engine is not running"
        try:
            await asyncio.wait_for(self.engine.probe(), READY_PROBE_TIMEOUT)
        except TimeoutError:
            return f"the generation engine did not answer within {READY_PROBE_TIMEOUT:.0f} s"
        return None

    async def generate_stream(self, params: GenerateParams, request_id: str) -> AsyncIterator[StreamChunk]:
        """Streams one request's answer; raises WorkerError (or anything else) on failure.

        The request takes a slot only once its inputs are ready, so a bad image is refused without
        waiting in line; while it waits it yields KEEPALIVE every `keepalive_interval` seconds; its
        slot goes back when it has really left the engine, on every path.
        """
        if self.draining:
            raise ShuttingDownError()
        record = _RequestRecord(request_id)
        inputs = await asyncio.to_thread(
            prepare_inputs,
            self.loaded,
            params.prompt,
            params.images,
            self.image_limits,
            self.config.max_prompt_tokens,
        )
        record.prompt_tokens = inputs.prompt_tokens
        room = self.loaded.context_length - inputs.prompt_tokens
        max_new_tokens = min(params.max_new_tokens, MAX_NEW_TOKENS_CAP, room)
        if max_new_tokens < 1:
            logger.info("request %s: prompt of %d tokens leaves no room", request_id, inputs.prompt_tokens)
            yield StreamChunk(
                (params.prompt if params.echo else "") + EXCEEDS_CONTEXT_TEXT,
                finish_reason="exceeds_context",
                prompt_tokens=inputs.prompt_tokens,
            )
            return

        # The queue grows now; tell the controller soon (the heartbeat runs on its own task).
        self._notify_controller()
        acquiring = asyncio.ensure_future(self.gate.acquire())
        try:
            # The first keepalive goes out at once when the request has to wait, so the client gets
            # a byte (and, with servers that hold headers back until the first body chunk, its
            # headers) without waiting for a slot.
            timeout = 0.0
            while not (await asyncio.wait({acquiring}, timeout=timeout))[0]:
                yield KEEPALIVE
                timeout = self.config.keepalive_interval
            slot = acquiring.result()
        except BaseException:
            self._abandon(acquiring)
            raise
        handle: RequestHandle | None = None
        try:
            handle = self.engine.submit(
                inputs,
                self._sampling(params),
                params.stop,
                max_new_tokens,
                self.config.stream_interval,
                on_done=lambda final: self._finish(slot, record, final),
                stop_token_ids=params.stop_token_ids,
            )
            sent = None
            last_at, last_tokens = record.started, 0
            async for output in handle.outputs():
                if output.error is not None:
                    raise output.error
                now = time.perf_counter()
                if output.completion_tokens > last_tokens:
                    if record.first_text_at is None:
                        record.first_text_at = now
                        self.metrics.time_to_first_token.observe(now - record.started)
                    else:
                        gap = (now - last_at) / (output.completion_tokens - last_tokens)
                        self.metrics.time_between_tokens.observe(gap)
                    last_at, last_tokens = now, output.completion_tokens
                text = (params.prompt if params.echo else "") + output.text
                # The final output always goes out, even with no new text, for its finish reason.
                if text != sent or output.finished:
                    sent = text
                    yield StreamChunk(text, output.completion_tokens, output.finish_reason, inputs.prompt_tokens)
        finally:
            if handle is None:
                slot.release()
            else:
                # On disconnect this takes the request out of the batch at the next token boundary;
                # the engine then frees the slot.
                handle.cancel()

    def _abandon(self, acquiring: asyncio.Future[Slot]) -> None:
        """The request left (or was refused) while waiting for a slot."""
        acquiring.cancel()
        if acquiring.done() and not acquiring.cancelled() and acquiring.exception() is None:
            acquiring.result().release()  # granted just as the client left: pass it on
        self._notify_controller()  # the queue shrank again

    async def generate_stream_gate(self, params: GenerateParams, request_id: str) -> AsyncIterator[bytes]:
        """The wire bytes of `generate_stream`; any failure becomes one final error chunk."""
        previous = None
        async for chunk in self._chunks_or_error(params, request_id):
            if chunk is KEEPALIVE:
                yield b"\0"  # clients skip empty chunks; it keeps their read timeouts at bay
                continue
            # The last chunk is sent even without new text when it carries FastChat's finish reason;
            # otherwise a chunk that adds no text would be a repeat.
            if chunk.text != previous or (params.extended and chunk.finish_reason):
                previous = chunk.text
                yield encode_chunk(*self._wire(chunk, params))

    async def generate(self, params: GenerateParams, request_id: str) -> dict[str, Any]:
        """FastChat's `/worker_generate`: the final chunk of the stream, as one JSON object."""
        last = StreamChunk("")
        async for chunk in self._chunks_or_error(params, request_id):
            if chunk is not KEEPALIVE:
                last = chunk
        text, error_code, extra = self._wire(last, replace(params, extended=True))
        return chunk_body(text, error_code, extra)

    async def _chunks_or_error(self, params: GenerateParams, request_id: str) -> AsyncIterator[StreamChunk]:
        """`generate_stream`, with any failure turned into a final chunk whose error code is 1."""
        outcome = "cancelled"
        try:
            async for chunk in self.generate_stream(params, request_id):
                outcome = chunk.finish_reason or outcome
                yield chunk
        except Exception as exc:
            outcome = "rejected" if isinstance(exc, ShuttingDownError) else "error"
            yield StreamChunk(describe_failure(exc, request_id), finish_reason="error")
        finally:
            self.metrics.count(outcome)

    @staticmethod
    def _wire(chunk: StreamChunk, params: GenerateParams) -> tuple[str, int, dict[str, Any] | None]:
        """Text, error code and (for FastChat) the extra fields of one chunk."""
        error_code = 1 if chunk.finish_reason == "error" else 0
        if not params.extended:
            return chunk.text, error_code, None
        # FastChat knows "stop" and "length"; running out of context is a length limit too.
        reason = {"exceeds_context": "length", "cancelled": "stop"}.get(chunk.finish_reason or "", chunk.finish_reason)
        extra = {"usage": usage(chunk.prompt_tokens, chunk.completion_tokens), "finish_reason": reason}
        return chunk.text, error_code, extra

    def count_tokens(self, prompt: str) -> int:
        """FastChat's `/count_token`: tokens of the prompt text (image tokens not expanded)."""
        return len(self.loaded.tokenizer(prompt)["input_ids"])

    def _sampling(self, params: GenerateParams) -> SamplingParams:
        if params.greedy:
            return SamplingParams(presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)
        return SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=self.engine.default_top_k if params.top_k is None else params.top_k,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            seed=params.seed,
        )

    def _finish(self, slot: Slot, record: _RequestRecord, final: GenerationOutput) -> None:
        """Runs when a request has left the engine, however it ended: frees its slot and logs it."""
        slot.release()
        self._notify_controller()
        self.metrics.generated_tokens.inc(final.completion_tokens)
        outcome = "error" if final.error is not None else final.finish_reason
        ttft = "-" if record.first_text_at is None else f"{record.first_text_at - record.started:.3f} s"
        logger.info(
            "request %s: %s, %d prompt tokens, %d new tokens, first text after %s, %.3f s in all",
            record.request_id,
            outcome,
            record.prompt_tokens,
            final.completion_tokens,
            ttft,
            time.perf_counter() - record.started,
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
