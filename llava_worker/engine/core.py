"""Engine: owns the model and runs one decode loop for every active request (iteration-level batching)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from llava_worker.engine.batch import DecodeBatch, is_mergeable, left_padded
from llava_worker.engine.detokenizer import TextAccumulator
from llava_worker.engine.requests import GenerationRequest
from llava_worker.engine.sampling import SamplingParams, next_tokens
from llava_worker.engine.streams import GenerationOutput, RequestStream
from llava_worker.errors import GenerationError, OutOfMemoryError, WorkerError
from llava_worker.models.inputs import PreparedInputs
from llava_worker.models.loaded import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    """A submitted request and its decoding state, owned by the engine thread once submitted."""

    inputs: PreparedInputs
    sampling: SamplingParams
    max_new_tokens: int
    stream_interval: int
    accumulator: TextAccumulator
    stream: RequestStream
    on_done: Callable[[GenerationOutput], None] | None
    loop: asyncio.AbstractEventLoop
    stop_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    """The request's own random stream when it asked for a seed."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    last_token: int = -1
    generated: int = 0
    finish_reason: str | None = None
    """Set once the request has ended by itself (`stop` or `length`)."""


class RequestHandle:
    """The asyncio side of one submitted request: its outputs, and a way to stop it."""

    def __init__(self, request: _Request, engine: Engine) -> None:
        self._request = request
        self._engine = engine

    def cancel(self) -> None:
        """Stops the request at the next token boundary; safe to call any number of times."""
        self._request.cancelled.set()
        self._engine.wake()

    def outputs(self) -> AsyncIterator[GenerationOutput]:
        """Snapshots of the request's progress, ending with the one that has a finish reason or an error."""
        return self._request.stream.outputs()


class Engine:
    """Runs every admitted request in one decode loop on a dedicated thread.

    Each loop iteration (1) takes newly submitted requests and prefills them one by one, images
    included, merging each into the running batch, (2) drops requests that finished or were cancelled,
    freeing their cache rows, and (3) runs one forward pass that gives every remaining request its
    next token. Requests thus join and leave at token boundaries while the others keep decoding.
    """

    def __init__(self, loaded: LoadedModel, max_batch: int) -> None:
        self._loaded = loaded
        self._model: Any = loaded.model
        self._max_batch = max_batch
        self._submitted: queue.SimpleQueue[_Submission] = queue.SimpleQueue()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._eos = _eos_token_ids(loaded)
        self.default_top_k = int(getattr(self._model.generation_config, "top_k", 0) or 0)
        """top-k that `generate` would apply when sampling (from the model's generation config)."""
        self._mergeable: bool | None = None
        pad_id = loaded.tokenizer.pad_token_id
        self._pad_id = int(pad_id if pad_id is not None else loaded.tokenizer.eos_token_id or 0)
        self.steps = 0
        """Decode steps run so far (for tests and metrics)."""
        self.peak_batch = 0
        """Most requests that have decoded together in one step."""

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Ends the loop after the current step; requests still running get an error."""
        if self._thread is not None:
            self._submitted.put(_Signal.STOP)
            self._thread.join(timeout)
            self._thread = None

    def probe(self) -> asyncio.Future[None]:
        """A future the engine loop resolves at its next turn: proof that it is alive and answering."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        self._submitted.put(_Probe(loop, answered))
        return answered

    def abort_all(self) -> None:
        """Fails every request in the engine (at the next token boundary) with a shutdown error."""
        self._abort.set()
        self.wake()

    def wake(self) -> None:
        """Nudges an idle loop (e.g. to notice a cancellation); harmless when busy."""
        self._submitted.put(_Signal.WAKE)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues a request; call from the event loop, where its `on_done` will run."""
        if not self.alive:
            raise GenerationError("the generation engine is not running")
        loop = asyncio.get_running_loop()
        running = _Request(
            inputs=request.inputs,
            sampling=request.sampling,
            max_new_tokens=request.max_new_tokens,
            stream_interval=request.stream_interval,
            accumulator=TextAccumulator(self._loaded.tokenizer, request.stop),
            stream=RequestStream(loop),
            on_done=request.on_done,
            loop=loop,
            stop_token_ids=frozenset(request.stop_token_ids),
            generator=_seeded(request.sampling.seed, self._loaded.device),
        )
        self._submitted.put(running)
        return RequestHandle(running, self)

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        waiting: deque[_Request] = deque()
        active: list[_Request] = []
        batch = DecodeBatch(self._loaded.device)
        with torch.inference_mode():
            while True:
                try:
                    if not self._iterate(waiting, active, batch):
                        break
                except Exception as exc:
                    # A bug here must not strand requests: fail the ones in hand and keep serving.
                    logger.exception("the engine loop failed; failing its current requests")
                    self._fail_all(active, GenerationError(f"internal engine error: {type(exc).__name__}: {exc}"))
                    batch.reset()
        self._fail_all([*active, *waiting], GenerationError("the worker is shutting down"))

    def _iterate(self, waiting: deque[_Request], active: list[_Request], batch: DecodeBatch) -> bool:
        """One turn of the loop; False when the engine is asked to stop."""
        # 1. Collect submissions; block only when there is nothing else to do.
        if not self._collect(waiting, block=not active and not waiting):
            return False
        if self._abort.is_set():
            self._abort.clear()
            self._fail_all(active, GenerationError("the worker is shutting down"))
            self._fail_all(list(waiting), GenerationError("the worker is shutting down"))
            waiting.clear()
            batch.reset()
            return True
        # 2. Prefill newcomers while there is room; each joins the batch with its first token.
        newcomers: list[_Request] = []
        while waiting and len(active) + len(newcomers) < self._room():
            request = waiting.popleft()
            if request.cancelled.is_set():
                self._finish(request, GenerationOutput(finish_reason="cancelled"))
            elif self._mergeable is None and not newcomers:
                # The first prefill tells whether caches can be merged; until then, one at a time.
                active.extend(self._prefill([request], batch))
            else:
                newcomers.append(request)
        for group in self._prefill_groups(newcomers):
            active.extend(self._prefill(group, batch))
        # 3. Drop requests that are done; their cache rows go with them.
        keep = [row for row, request in enumerate(active) if not self._settle(request)]
        if len(keep) != len(active):
            batch.keep(keep)
            active[:] = [active[row] for row in keep]
        # 4. One forward pass: the next token of every active request.
        if active:
            self._decode_step(active, batch)
        return True

    def _fail_all(self, requests: list[_Request], error: WorkerError) -> None:
        for request in requests:
            self._finish(request, GenerationOutput(completion_tokens=request.generated, error=error))
        requests.clear()

    def _room(self) -> int:
        return 1 if self._mergeable is False else self._max_batch

    def _collect(self, waiting: deque[_Request], block: bool) -> bool:
        """Moves submitted requests into `waiting`; False when the engine is asked to stop."""
        try:
            item = self._submitted.get() if block else self._submitted.get_nowait()
            while True:
                if item is _Signal.STOP:
                    return False
                if isinstance(item, _Probe):
                    item.answer()
                elif isinstance(item, _Request):
                    waiting.append(item)
                item = self._submitted.get_nowait()
        except queue.Empty:
            return True

    def _prefill(self, requests: list[_Request], batch: DecodeBatch) -> list[_Request]:
        """Runs the prompts of `requests` (one with images, or several without) in one forward pass,
        picks each one's first token and merges them into the batch; returns those that joined."""
        try:
            cache = DynamicCache(config=self._model.config)
            if len(requests) == 1:
                tensors = requests[0].inputs.tensors
                mask = tensors.get("attention_mask", torch.ones_like(tensors["input_ids"]))
                output = self._model(**tensors, cache=cache, use_cache=True, logits_to_keep=1)
            else:
                ids, mask, positions = left_padded([r.inputs.input_ids for r in requests], self._pad_id)
                output = self._model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            if self._mergeable is None:
                self._mergeable = is_mergeable(cache)
                if not self._mergeable:
                    logger.warning(
                        "this model's KV cache (%s) cannot be batched; requests will run one at a time",
                        ", ".join(sorted({type(layer).__name__ for layer in cache.layers})),
                    )
            tokens = self._choose(output.logits[:, -1, :], requests)
        except Exception as exc:
            error = _as_worker_error(exc)
            for request in requests:
                self._finish(request, GenerationOutput(error=error))
            return []
        batch.add(cache, mask)
        for request, token in zip(requests, tokens, strict=True):
            self._accept(request, token)
        return requests

    def _prefill_groups(self, newcomers: list[_Request]) -> list[list[_Request]]:
        """Requests with images are prefilled alone; text-only prompts share one padded forward pass
        once the cache is known to merge (until then nothing is batched)."""
        if not self._mergeable:
            return [[request] for request in newcomers]
        text_only = [r for r in newcomers if set(r.inputs.tensors) <= {"input_ids", "attention_mask"}]
        groups = [[r] for r in newcomers if r not in text_only]
        return [text_only, *groups] if text_only else groups

    def _decode_step(self, active: list[_Request], batch: DecodeBatch) -> None:
        try:
            output = self._model(**batch.step_inputs([r.last_token for r in active]), logits_to_keep=1)
            tokens = self._choose(output.logits[:, -1, :], active)
        except Exception as exc:
            # A failed step leaves the shared cache in an unknown state: every request in it fails.
            self._fail_all(active, _as_worker_error(exc))
            batch.reset()
            return
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(active))
        for request, token in zip(active, tokens, strict=True):
            self._accept(request, token)

    def _choose(self, logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        return next_tokens(
            logits.float(),
            [r.sampling for r in requests],
            [r.generator for r in requests],
            [r.accumulator.token_ids for r in requests],
        )

    def _accept(self, request: _Request, token: int) -> None:
        """Records one generated token; publishes text every `stream_interval` tokens."""
        request.last_token = token
        if token in self._eos or token in request.stop_token_ids:
            request.finish_reason = "stop"
            return
        request.generated += 1
        request.accumulator.add([token])
        if request.accumulator.stopped:
            request.finish_reason = "stop"
        elif request.generated >= request.max_new_tokens:
            request.finish_reason = "length"
        elif request.generated % request.stream_interval == 0:
            request.stream.publish(
                GenerationOutput(text=request.accumulator.visible_text(), completion_tokens=request.generated)
            )

    def _settle(self, request: _Request) -> bool:
        """Finishes the request if it is done or cancelled; True when it must leave the batch."""
        reason = request.finish_reason or ("cancelled" if request.cancelled.is_set() else None)
        if reason is None:
            return False
        text = request.accumulator.final_text()
        self._finish(request, GenerationOutput(text=text, completion_tokens=request.generated, finish_reason=reason))
        return True

    def _finish(self, request: _Request, final: GenerationOutput) -> None:
        # `on_done` is queued on the event loop before the final output, so the slot is free (and
        # `queue_length` down) by the time the client reads its last chunk.
        if request.on_done is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is gone
                request.loop.call_soon_threadsafe(request.on_done, final)
        request.stream.publish(final)


class _Signal(enum.Enum):
    """Control items on the submission queue."""

    WAKE = enum.auto()
    """Only wakes an idle engine (to notice a cancellation or an abort)."""
    STOP = enum.auto()
    """Ends the loop."""


@dataclass(frozen=True)
class _Probe:
    """A readiness question for the engine loop, answered on the asker's event loop."""

    loop: asyncio.AbstractEventLoop
    answered: asyncio.Future[None]

    def answer(self) -> None:
        def resolve() -> None:
            if not self.answered.done():
                self.answered.set_result(None)

        with contextlib.suppress(RuntimeError):  # the asker's loop is gone
            self.loop.call_soon_threadsafe(resolve)


#: What the submission queue carries from the event loop to the engine thread.
_Submission = _Request | _Probe | _Signal


def _seeded(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = loaded.tokenizer.eos_token_id
    if configured is None:
        return frozenset()
    return frozenset([configured] if isinstance(configured, int) else configured)


def _as_worker_error(exc: Exception) -> WorkerError:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        # Free the cached blocks now so the next request does not inherit a full device.
        torch.cuda.empty_cache()
        return OutOfMemoryError("the GPU ran out of memory while generating")
    if isinstance(exc, WorkerError):
        return exc
    logger.exception("generation failed")
    return GenerationError(f"generation failed: {type(exc).__name__}: {exc}")
