"""ModelWorker: admission, generation streams, status, draining and the controller link for one model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from llava_worker.admission import AdmissionGate, Slot
from llava_worker.chunks import KEEPALIVE, StreamChunk
from llava_worker.config import MAX_NEW_TOKENS_CAP, WorkerConfig
from llava_worker.controller import ControllerLink
from llava_worker.engine.core import Engine, PrefillSettings, kv_bytes_per_token
from llava_worker.engine.requests import GenerationRequest
from llava_worker.engine.sampling import SamplingParams
from llava_worker.engine.streams import GenerationOutput
from llava_worker.errors import (
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    ShuttingDownError,
    outcome_of,
)
from llava_worker.host_memory import IdleTrimmer
from llava_worker.metrics import WorkerMetrics
from llava_worker.models.chat_prompt import chat_family, render_prompt
from llava_worker.models.images import ImageLimits
from llava_worker.models.inputs import PreparedInputs, longest_token_chars, prepare_inputs
from llava_worker.models.loaded import LoadedModel
from llava_worker.models.videos import VideoLimits
from llava_worker.protocol import EXCEEDS_CONTEXT_TEXT, GenerateParams, worker_status

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Prompts up to this many characters, without images, are light input work (see `--input-threads`).
LIGHT_PROMPT_CHARS = 16_384
#: Threads for light input work: tokenizing a short prompt takes a millisecond.
LIGHT_INPUT_THREADS = 2

#: How long a readiness probe may wait for the engine loop to answer.
READY_PROBE_TIMEOUT = 5.0


@dataclass
class _RequestRecord:
    """What the request's log line and latency metrics need, gathered along the way."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    first_text_at: float | None = None
    last_text_at: float = 0.0
    last_tokens: int = 0

    def observe(self, completion_tokens: int, metrics: WorkerMetrics) -> None:
        """Time to first token once, then the time per token between chunks."""
        if completion_tokens <= self.last_tokens:
            return
        now = time.perf_counter()
        if self.first_text_at is None:
            self.first_text_at = now
            metrics.time_to_first_token.observe(now - self.started)
        else:
            metrics.time_between_tokens.observe((now - self.last_text_at) / (completion_tokens - self.last_tokens))
        self.last_text_at, self.last_tokens = now, completion_tokens


class ModelWorker:
    """Serves one loaded model: the original worker's public methods, without its blocking calls."""

    def __init__(self, config: WorkerConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.loaded = loaded
        self.worker_addr = config.worker_address
        self.model_name = config.served_model_name
        self.gate = AdmissionGate(config.limit_model_concurrency)
        self.metrics = WorkerMetrics(self.get_queue_length, lambda: self.gate.running)
        # The gate lets at most `limit` requests into the engine, so they all decode in one batch.
        self.engine = Engine(
            loaded,
            max_batch=config.limit_model_concurrency,
            settings=prefill_settings(config, loaded),
            observer=self.metrics,
        )
        self.metrics.watch_caches(self.engine.image_cache, self.engine.prefix_cache)
        self.image_limits = ImageLimits(
            config.max_image_bytes, config.max_image_pixels, config.max_request_pixels, config.image_format_names
        )
        self.video_limits = VideoLimits(
            max_bytes=config.max_video_bytes,
            max_seconds=config.max_video_seconds,
            max_frame_pixels=config.max_image_pixels,
            frames=config.video_frames,
            max_total_pixels=config.max_request_pixels,
            max_file_frames=config.max_video_file_frames,
        )
        self.image_decoders = threading.BoundedSemaphore(config.image_decoders)
        self._longest_token_chars = longest_token_chars(loaded.tokenizer)
        # Input work runs in pools of its own, not asyncio's default one: heavy work (images, long
        # prompts) is bounded in threads, and cannot make short text requests wait behind it.
        self._light_inputs = ThreadPoolExecutor(LIGHT_INPUT_THREADS, thread_name_prefix="inputs-light")
        self._heavy_inputs = ThreadPoolExecutor(config.input_threads, thread_name_prefix="inputs-heavy")
        self._input_work_running = 0
        # What large requests freed goes back to the system once nothing runs (see host_memory.py).
        self.memory_trimmer = IdleTrimmer(self._is_idle)
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

    # What the HTTP edge may know of the model, without touching it.

    @property
    def takes_images(self) -> bool:
        return self.loaded.takes_images

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    @property
    def takes_videos(self) -> bool:
        return self.loaded.takes_videos

    @property
    def chat_family(self) -> str | None:
        """The prompt style of the checkpoint's chat template (`llama3`, `chatml`), if it has one of those."""
        return chat_family(self.loaded)

    @property
    def end_token_ids(self) -> list[int]:
        """The tokens that end the model's turn (every eos, and the template's end-of-turn token)."""
        return sorted(self.engine.end_token_ids)

    @property
    def text_model_type(self) -> str:
        """The language model's `model_type` (`llama`, `mistral`, `qwen2`, ...)."""
        return str(self.loaded.model.config.get_text_config().model_type)

    # Lifecycle.

    async def start(self) -> None:
        """Starts the engine, and registration and heartbeats in the background (unless `--no-register`)."""
        self._log_prefill_settings()
        self.engine.start()
        if self.controller is not None:
            await self.controller.start()

    def _log_prefill_settings(self) -> None:
        if not self.engine.piecewise:
            logger.info("prefill: each prompt whole, one request at a time (this model's cache cannot be batched)")
            return
        per_token = kv_bytes_per_token(self.loaded)
        logger.info(
            "prefill: pieces of %s tokens while others decode; image cache %d MiB; prefix cache %d MiB "
            "(a token's KV states take %.1f KiB: about %d tokens)",
            self.engine.chunk_tokens or "unlimited",
            self.config.image_cache_mb,
            self.config.prefix_cache_mb,
            per_token / 1024,
            (self.config.prefix_cache_mb << 20) // per_token,
        )

    async def stop(self) -> None:
        self.memory_trimmer.cancel()
        if self.controller is not None:
            await self.controller.stop()
        await asyncio.to_thread(self.engine.stop)
        for pool in (self._light_inputs, self._heavy_inputs):
            pool.shutdown(wait=False, cancel_futures=True)

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

    # The controller's view.

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

    # Requests.

    async def count_tokens(self, prompt: str) -> int:
        """FastChat's `/count_token`: tokens of the prompt text (image tokens not expanded)."""
        return await self._run_input_work(len(prompt), False, lambda: len(self.loaded.tokenizer(prompt)["input_ids"]))

    async def render_chat_prompt(self, messages: list[dict[str, Any]], images: int, videos: int = 0) -> str:
        """The prompt the model's own chat template makes of `messages` (raises InvalidRequestError)."""
        size = sum(len(str(message.get("content", ""))) for message in messages)
        render = partial(render_prompt, self.loaded, messages, images, videos)
        return await self._run_input_work(size, images + videos > 0, render)

    async def generate_stream(self, params: GenerateParams, request_id: str) -> AsyncGenerator[StreamChunk, None]:
        """Streams one request's answer and counts its outcome; raises WorkerError (or anything else)
        on failure. Yields KEEPALIVE while the request waits for a slot."""
        outcome = "cancelled"
        try:
            async with contextlib.aclosing(self._answer(params, request_id)) as chunks:
                async for chunk in chunks:
                    outcome = chunk.finish_reason or outcome
                    yield chunk
        except Exception as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            self.metrics.count(outcome)

    async def _answer(self, params: GenerateParams, request_id: str) -> AsyncGenerator[StreamChunk, None]:
        # 1. Refuse new work while draining, or while too many requests wait already.
        if self.draining:
            raise ShuttingDownError()
        self.check_queue()
        # 2. Decode images and tokenize before taking a slot, so a bad image is refused without
        #    waiting in line (and stop strings are checked first, as they cost nothing to check).
        self._check_stops(params)
        record = _RequestRecord(request_id)
        inputs = await self._prepare(params)
        record.prompt_tokens = inputs.prompt_tokens
        # 3. The token budget: what the request asked for, within the cap and the context left.
        max_new_tokens = min(params.max_new_tokens, MAX_NEW_TOKENS_CAP, self.context_length - inputs.prompt_tokens)
        if max_new_tokens < 1:
            yield self._exceeds_context(params, inputs, request_id)
            return
        self._check_kv_budget(inputs.prompt_tokens, max_new_tokens)
        # 4. Wait for a slot, with a keepalive at once and then every `keepalive_interval` seconds, so
        #    the client gets a byte (and, with servers that hold headers back, its headers) meanwhile.
        self.check_queue()  # again: the queue may have grown while this request was prepared
        self._notify_controller()  # the queue grows now; the heartbeat runs on its own task
        acquiring = asyncio.ensure_future(self.gate.acquire())
        try:
            timeout = 0.0
            while not (await asyncio.wait({acquiring}, timeout=timeout))[0]:
                yield KEEPALIVE
                timeout = self.config.keepalive_interval
            slot = acquiring.result()
        except BaseException:
            self._abandon(acquiring)
            raise
        # 5. Generate; the slot goes back when the request has really left the engine.
        async with contextlib.aclosing(self._generate(slot, params, inputs, max_new_tokens, record)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _prepare(self, params: GenerateParams) -> PreparedInputs:
        self._check_prompt_length(params.prompt)
        work = partial(
            prepare_inputs,
            self.loaded,
            params.prompt,
            params.images,
            self.image_limits,
            self.config.max_prompt_tokens,
            self.image_decoders,
            params.videos,
            self.video_limits,
        )
        return await self._run_input_work(len(params.prompt), bool(params.images or params.videos), work)

    async def _run_input_work(self, characters: int, images: bool, work: Callable[[], T]) -> T:
        heavy = images or characters > LIGHT_PROMPT_CHARS
        pool = self._heavy_inputs if heavy else self._light_inputs
        self._input_work_running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, work)
        finally:
            self._input_work_running -= 1
            if heavy:
                self.memory_trimmer.poke()

    def _is_idle(self) -> bool:
        return self.gate.queue_length == 0 and self._input_work_running == 0

    def _check_prompt_length(self, prompt: str) -> None:
        """No token is longer than `longest_token_chars` characters, so a prompt longer than the
        context times that (twice, for tokenizers that normalise text away) cannot fit: it is
        refused before paying for its tokenisation (tens of seconds for tens of megabytes)."""
        most = 2 * self.context_length * self._longest_token_chars
        if len(prompt) > most:
            raise PromptTooLongError(
                f"the prompt is {len(prompt)} characters long: it cannot fit the model's context of "
                f"{self.context_length} tokens (at most {most} characters accepted)"
            )

    def _check_kv_budget(self, prompt_tokens: int, max_new_tokens: int) -> None:
        budget = self.engine.max_batch_tokens
        if budget is not None and prompt_tokens + max_new_tokens > budget:
            raise InvalidRequestError(
                f"the request needs room for {prompt_tokens + max_new_tokens} tokens ({prompt_tokens} of prompt, "
                f"image tokens included, and {max_new_tokens} new), more than the {budget} the batch may hold "
                "(--max-batch-tokens); ask for fewer new tokens or send a shorter prompt"
            )

    def check_queue(self) -> None:
        """Refuses a request when `--max-queue` requests already wait for a slot."""
        if self.gate.waiting >= self.config.max_queue:
            raise QueueFullError(self.gate.waiting, self.config.max_queue)

    def _check_stops(self, params: GenerateParams) -> None:
        """Stop strings are matched on the engine thread at every token: their number and length are bounded."""
        limit, longest = self.config.max_stop_strings, self.config.max_stop_length
        if len(params.stop) > limit:
            raise InvalidRequestError(
                f"too many stop strings: {len(params.stop)} given, at most {limit} accepted (--max-stop-strings)"
            )
        over = next((stop for stop in params.stop if len(stop) > longest), None)
        if over is not None:
            raise InvalidRequestError(
                f"a stop string is {len(over)} characters long; at most {longest} accepted (--max-stop-length)"
            )

    def _exceeds_context(self, params: GenerateParams, inputs: PreparedInputs, request_id: str) -> StreamChunk:
        """The original's answer to a prompt that leaves no room for new tokens (not an error)."""
        logger.info("request %s: prompt of %d tokens leaves no room", request_id, inputs.prompt_tokens)
        return StreamChunk(
            (params.prompt if params.echo else "") + EXCEEDS_CONTEXT_TEXT,
            finish_reason="exceeds_context",
            prompt_tokens=inputs.prompt_tokens,
        )

    def _abandon(self, acquiring: asyncio.Future[Slot]) -> None:
        """The request left (or was refused) while waiting for a slot."""
        acquiring.cancel()
        if acquiring.done() and not acquiring.cancelled() and acquiring.exception() is None:
            acquiring.result().release()  # granted just as the client left: pass it on
        self._notify_controller()  # the queue shrank again

    async def _generate(
        self, slot: Slot, params: GenerateParams, inputs: PreparedInputs, max_new_tokens: int, record: _RequestRecord
    ) -> AsyncGenerator[StreamChunk, None]:
        """Runs the request in the engine, yielding a chunk whenever its visible text grows."""
        handle = None
        try:
            handle = self.engine.submit(
                GenerationRequest(
                    inputs=inputs,
                    sampling=self._sampling(params),
                    max_new_tokens=max_new_tokens,
                    stop=params.stop,
                    stop_token_ids=params.stop_token_ids,
                    stream_interval=self.config.stream_interval,
                    on_done=lambda final: self._finish(slot, record, final),
                )
            )
            echo = params.prompt if params.echo else ""
            sent = None
            async for output in handle.outputs():
                if output.error is not None:
                    raise output.error
                record.observe(output.completion_tokens, self.metrics)
                # The final output always goes out, even with no new text, for its finish reason.
                if echo + output.text != sent or output.finished:
                    sent = echo + output.text
                    yield StreamChunk(sent, output.completion_tokens, output.finish_reason, inputs.prompt_tokens)
        finally:
            if handle is None:
                slot.release()
            else:
                # On disconnect this takes the request out of the batch at the next token boundary;
                # the engine then frees the slot.
                handle.cancel()

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
        self.memory_trimmer.poke()
        self._notify_controller()
        self.metrics.generated_tokens.inc(final.completion_tokens)
        outcome = "error" if final.error is not None else final.finish_reason
        ttft = "-" if record.first_text_at is None else f"{record.first_text_at - record.started:.3f} s"
        logger.info(
            "request %s: %s, %d prompt tokens (%d reused), %d new tokens, first text after %s, %.3f s in all",
            record.request_id,
            outcome,
            record.prompt_tokens,
            final.reused_prompt_tokens,
            final.completion_tokens,
            ttft,
            time.perf_counter() - record.started,
        )

    def _notify_controller(self) -> None:
        if self.controller is not None:
            self.controller.notify()


#: Prompt tokens per decode step and waiting request when `--prefill-chunk-tokens` is not given.
DEFAULT_CHUNK_TOKENS = {"cpu": 24, "accelerator": 512}


def prefill_settings(config: WorkerConfig, loaded: LoadedModel) -> PrefillSettings:
    """The engine's prefill and admission settings from the worker's flags, for the loaded model."""
    chunk = config.prefill_chunk_tokens
    if chunk is None:
        chunk = DEFAULT_CHUNK_TOKENS["cpu" if loaded.device.type == "cpu" else "accelerator"]
    mib = 1 << 20
    settings = PrefillSettings(
        chunk_tokens=chunk or None,
        image_cache_bytes=config.image_cache_mb * mib,
        prefix_cache_bytes=config.prefix_cache_mb * mib,
        max_batch_tokens=config.max_batch_tokens,
    )
    if settings.max_batch_tokens is None and loaded.device.type == "cuda":
        settings = replace(settings, max_batch_tokens=_tokens_free_memory_holds(loaded, settings))
    return settings


def _tokens_free_memory_holds(loaded: LoadedModel, settings: PrefillSettings) -> int:
    """KV tokens the GPU's free memory holds now, less the caches and a tenth for activations."""
    import torch

    free, _ = torch.cuda.mem_get_info(loaded.device)
    spare = int(free * 0.9) - settings.image_cache_bytes - settings.prefix_cache_bytes
    tokens = max(spare, 0) // kv_bytes_per_token(loaded)
    logger.info("the batch may hold %d KV tokens (%.1f GiB free on the GPU)", tokens, free / (1 << 30))
    return max(tokens, 1)
