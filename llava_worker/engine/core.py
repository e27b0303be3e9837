"""Engine: owns the model and runs one decode loop for every active request (iteration-level batching)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llava_worker.engine.batch import DecodeBatch, is_mergeable, left_padded
from llava_worker.engine.detokenizer import TextAccumulator
from llava_worker.engine.image_cache import ImageFeatureCache
from llava_worker.engine.prefill import PrefillGroup, PrefillRow
from llava_worker.engine.prefix_cache import ImageMark, PrefixCache, SequenceKey
from llava_worker.engine.requests import GenerationRequest
from llava_worker.engine.sampling import SamplingParams, next_tokens
from llava_worker.engine.streams import GenerationOutput, RequestStream
from llava_worker.errors import GenerationError, OutOfMemoryError, WorkerError
from llava_worker.models.chat_prompt import turn_end_token_ids
from llava_worker.models.inputs import PreparedInputs
from llava_worker.models.loaded import LoadedModel
from llava_worker.models.vision import tower_layout, tower_share

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
    submitted_at: float = field(default_factory=time.perf_counter)
    key: SequenceKey | None = None
    """What its prompt's KV states depend on; None for a prompt prefilled whole (not cacheable)."""
    fed: list[int] = field(default_factory=list)
    """Generated tokens fed back to the model: with the prompt, what its cache rows hold."""
    reused: int = 0
    """Prompt tokens whose KV states came from the prefix cache."""
    resumed: bool = False
    """Preempted after running out of memory: its prompt and the tokens fed so far are prefilled
    again, and it goes on with the token it had already chosen."""


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


@dataclass(frozen=True)
class PrefillSettings:
    """How the engine prefills; the defaults turn chunking and both caches off."""

    chunk_tokens: int | None = None
    """Most prompt tokens (image tokens included, per row) prefilled between two decode steps while
    other requests decode; None: each prompt at once."""
    image_cache_bytes: int = 0
    """Budget of the image-feature cache; 0 keeps nothing."""
    prefix_cache_bytes: int = 0
    """Budget of the prefix (KV state) cache; 0 keeps nothing."""
    max_batch_tokens: int | None = None
    """KV tokens the running requests may hold together, each counting its prompt (image tokens
    included) and its `max_new_tokens`; requests wait in order until theirs fit. None: no limit."""


class EngineObserver(Protocol):
    """What the engine reports as it works (the worker's metrics implement it); called on the engine thread."""

    def prefill_chunk(self, tokens: int) -> None: ...

    def queued(self, seconds: float) -> None: ...


class Engine:
    """Runs every admitted request in one decode loop on a dedicated thread.

    Each loop iteration (1) admits newly submitted requests as a prefill group, reusing cached prefix
    states and image features, (2) advances the groups being prefilled, by at most
    `chunk_tokens` while other requests decode, and merges each finished group into the running
    batch, (3) drops requests that finished or were cancelled, keeping their states in the prefix
    cache, and (4) runs one forward pass that gives every decoding request its next token. Requests
    thus join and leave at token boundaries while the others keep decoding.

    A model whose cache cannot be split and merged (sliding windows, ...) or whose images cannot be
    taken apart is prefilled the safe way instead: each such prompt whole, through the model's own
    forward, not cached.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int,
        settings: PrefillSettings | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self._loaded = loaded
        self._model: Any = loaded.model
        self._max_batch = max_batch
        self._settings = settings or PrefillSettings()
        self._observer = observer
        self._submitted: queue.SimpleQueue[_Submission] = queue.SimpleQueue()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        # The turn ends at any eos the checkpoint names, and at its chat template's end-of-turn token.
        self.end_token_ids = _eos_token_ids(loaded) | turn_end_token_ids(loaded)
        self.default_top_k = int(getattr(self._model.generation_config, "top_k", 0) or 0)
        """top-k that `generate` would apply when sampling (from the model's generation config)."""
        pad_id = loaded.tokenizer.pad_token_id
        self._pad_id = int(pad_id if pad_id is not None else loaded.tokenizer.eos_token_id or 0)
        self._layout = tower_layout(self._model)
        self._tower_share = tower_share(self._model) if self._layout is not None else 1.0
        self.piecewise = _plain_cache(self._model)
        """Whether prompts are prefilled in groups and chunks, with caches (else one by one, whole)."""
        self._mergeable: bool | None = True if self.piecewise else None
        self._groups: list[PrefillGroup] = []
        self._preempted: list[_Request] = []
        """Requests taken out of the batch to free memory; they are admitted again first."""
        self._group_requests: dict[int, list[_Request]] = {}
        self.image_cache = ImageFeatureCache(self._settings.image_cache_bytes)
        self.prefix_cache = PrefixCache(self._settings.prefix_cache_bytes if self.piecewise else 0)
        self.steps = 0
        """Decode steps run so far (for tests and metrics)."""
        self.peak_batch = 0
        """Most requests that have decoded together in one step."""
        self.prefill_chunks = 0
        """Pieces of prefill work run so far (tower passes and language-model chunks)."""

    @property
    def max_batch_tokens(self) -> int | None:
        """KV tokens the running requests may hold together (None: no limit)."""
        return self._settings.max_batch_tokens

    @property
    def chunk_tokens(self) -> int | None:
        """Prompt tokens per decode step and waiting request while others decode (None: no limit)."""
        return self._settings.chunk_tokens

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
                    error = GenerationError(f"internal engine error: {type(exc).__name__}: {exc}")
                    self._fail_all(active, error)
                    self._fail_groups(error)
                    batch.reset()
        self._fail_groups(GenerationError("the worker is shutting down"))
        self._fail_all([*active, *waiting], GenerationError("the worker is shutting down"))

    def _iterate(self, waiting: deque[_Request], active: list[_Request], batch: DecodeBatch) -> bool:
        """One turn of the loop; False when the engine is asked to stop."""
        # 1. Collect submissions; block only when there is nothing else to do.
        if not self._collect(waiting, block=not active and not waiting and not self._groups):
            return False
        if self._abort.is_set():
            self._abort.clear()
            error = GenerationError("the worker is shutting down")
            self._fail_all(active, error)
            self._fail_all(list(waiting), error)
            self._fail_groups(error)
            waiting.clear()
            batch.reset()
            return True
        # 2. Admit newcomers while there is room (preempted requests first), then advance the prefills.
        waiting.extendleft(reversed(self._preempted))
        self._preempted.clear()
        if self.piecewise:
            self._admit(waiting, active, batch)
            self._advance_prefills(active, batch)
        else:
            self._prefill_whole(waiting, active, batch)
        # 3. Drop requests that are done; their cache rows go with them (into the prefix cache).
        keep = [row for row, request in enumerate(active) if not self._settle(request)]
        if len(keep) != len(active):
            self._remember(active, batch, set(keep))
            batch.keep(keep)
            active[:] = [active[row] for row in keep]
        # 4. One forward pass: the next token of every active request.
        if active:
            self._decode_step(active, batch)
        return True

    def _prefill_whole(self, waiting: deque[_Request], active: list[_Request], batch: DecodeBatch) -> None:
        """The safe way: each newcomer's prompt through the model's forward, whole, before the next step."""
        newcomers: list[_Request] = []
        held = self._tokens_held(active)
        while waiting and len(active) + len(newcomers) < self._room():
            if not waiting[0].cancelled.is_set() and not self._fits(waiting[0], held):
                break
            request = waiting.popleft()
            held += 0 if request.cancelled.is_set() else _kv_need(request)
            if request.cancelled.is_set():
                self._finish(request, GenerationOutput(finish_reason="cancelled"))
            elif not self._move_to_device(request):
                continue
            elif self._mergeable is None and not newcomers:
                # The first prefill tells whether caches can be merged; until then, one at a time.
                active.extend(self._prefill([request], batch))
            else:
                newcomers.append(request)
        for group in self._prefill_groups(newcomers):
            active.extend(self._prefill(group, batch))

    def _admit(self, waiting: deque[_Request], active: list[_Request], batch: DecodeBatch) -> None:
        """Starts a prefill group with the newcomers that fit in the batch (and in its KV budget)."""
        prefilling = sum(len(group.rows) for group in self._groups)
        held = self._tokens_held(active)
        newcomers: list[_Request] = []
        while waiting and len(active) + prefilling + len(newcomers) < self._max_batch:
            request = waiting[0]
            if not request.cancelled.is_set() and not self._fits(request, held):
                break  # in arrival order: the head waits until enough running requests finish
            waiting.popleft()
            held += 0 if request.cancelled.is_set() else _kv_need(request)
            if request.cancelled.is_set():
                self._finish(request, GenerationOutput(finish_reason="cancelled"))
            elif not self._move_to_device(request):
                continue
            elif request.inputs.images is None:
                # Images the engine cannot take apart: this prompt goes through the forward whole.
                active.extend(self._prefill([request], batch))
            else:
                newcomers.append(request)
        if not newcomers:
            return
        now = time.perf_counter()
        try:
            rows = [self._prefill_row(request) for request in newcomers]
            group = PrefillGroup(
                self._model,
                self._layout,
                rows,
                self._pad_id,
                self.image_cache,
                spare_rows=len(active),
                tower_share=self._tower_share,
            )
        except Exception as exc:
            self._fail_all(newcomers, _as_worker_error(exc))
            return
        for request in newcomers:
            if self._observer is not None:
                self._observer.queued(now - request.submitted_at)
        self._groups.append(group)
        self._group_requests[id(group)] = newcomers

    def _move_to_device(self, request: _Request) -> bool:
        """Admission is when a request's inputs reach the device: waiting, they take host memory only.
        False (and the request failed) when they cannot."""
        try:
            request.inputs = request.inputs.on_device(self._loaded.device)
        except Exception as exc:
            self._fail_all([request], _as_worker_error(exc))
            return False
        return True

    def _tokens_held(self, active: list[_Request]) -> int:
        prefilling = [request for requests in self._group_requests.values() for request in requests]
        return sum(_kv_need(request) for request in [*active, *prefilling])

    def _fits(self, request: _Request, held: int) -> bool:
        budget = self._settings.max_batch_tokens
        # Alone, a request always runs: one that could never fit is refused before it is submitted.
        return budget is None or held == 0 or held + _kv_need(request) <= budget

    def _prefill_row(self, request: _Request) -> PrefillRow:
        ids = request.inputs.input_ids.reshape(-1)
        if request.resumed:
            # Its cache rows held the prompt and the tokens fed back: they are computed again.
            ids = torch.cat([ids, torch.tensor(request.fed, dtype=ids.dtype, device=ids.device)])
        images = request.inputs.images or ()
        request.key = SequenceKey(
            ids.detach().cpu(), tuple(ImageMark(span.start, span.length, span.key) for span in images)
        )
        # At least the last prompt token is computed: its logits give the first new token.
        reused, prefix = self.prefix_cache.lookup(request.key, limit=len(request.key) - 1)
        if not request.resumed:
            request.reused = reused
        return PrefillRow(ids=ids, images=images, reused=reused, prefix=prefix)

    def _advance_prefills(self, active: list[_Request], batch: DecodeBatch) -> None:
        """Runs prefill pieces, oldest group first, within the step's budget; merges finished groups.

        The budget protects the streams already decoding, weighed against the requests still waiting
        for their first token: `chunk_tokens` while they are no more than the decoding rows, growing
        with the square of their ratio beyond (a stall slows few streams and starts many), and none
        when nothing decodes."""
        budget = self._step_budget(len(active))
        first = True
        for group in list(self._groups):
            while not group.finished:
                try:
                    used = group.step(budget, first)
                except Exception as exc:
                    self._drop_group(group, _as_worker_error(exc))
                    break
                if used == 0:
                    return
                first = False
                self.prefill_chunks += 1
                if self._observer is not None:
                    self._observer.prefill_chunk(used)
                if budget is not None:
                    budget -= used
                    if budget <= 0 and not group.finished:
                        return
            if group.finished:
                self._join(group, active, batch)
            if budget is not None and budget <= 0:
                return

    def _step_budget(self, decoding: int) -> int | None:
        chunk = self._settings.chunk_tokens
        if chunk is None or decoding == 0:
            return None
        prefilling = sum(len(group.rows) for group in self._groups)
        return chunk * max(1, -(-(prefilling**2) // decoding**2))

    def _join(self, group: PrefillGroup, active: list[_Request], batch: DecodeBatch) -> None:
        """A prefilled group joins the decode batch, each row with its first token."""
        requests = self._group_requests[id(group)]
        self._forget(group)
        assert group.first_logits is not None
        # A resumed request already chose its next token before it was preempted.
        fresh = [row for row, request in enumerate(requests) if not request.resumed]
        try:
            tokens = self._choose(group.first_logits[fresh], [requests[row] for row in fresh])
        except Exception as exc:
            self._fail_all(list(requests), _as_worker_error(exc))
            return
        if batch.add(group.cache, group.attention_mask):
            active[:0] = requests
        else:
            active.extend(requests)
        for row, token in zip(fresh, tokens, strict=True):
            self._accept(requests[row], token)
        for request in requests:
            request.resumed = False

    def _drop_group(self, group: PrefillGroup, error: WorkerError) -> None:
        requests = self._group_requests[id(group)]
        self._forget(group)
        self._fail_all(list(requests), error)

    def _forget(self, group: PrefillGroup) -> None:
        self._groups.remove(group)
        del self._group_requests[id(group)]

    def _fail_groups(self, error: WorkerError) -> None:
        for group in list(self._groups):
            self._drop_group(group, error)

    def _remember(self, active: list[_Request], batch: DecodeBatch, staying: set[int]) -> None:
        """Keeps the KV states of the requests leaving the batch in the prefix cache."""
        if self.prefix_cache.budget == 0:
            return
        for row, request in enumerate(active):
            if row in staying or request.key is None:
                continue
            self.prefix_cache.store(request.key.extended(request.fed), batch.row_states(row))

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
        # A plain DynamicCache never takes in the running rows: these rows come last.
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
        for request in active:
            request.fed.append(request.last_token)
        try:
            output = self._model(**batch.step_inputs([r.last_token for r in active]), logits_to_keep=1)
            tokens = self._choose(output.logits[:, -1, :], active)
        except torch.cuda.OutOfMemoryError as exc:
            if not self.piecewise or len(active) == 1:
                self._fail_all(active, _as_worker_error(exc))
                batch.reset()
            else:
                self._preempt_newest(active, batch)
            return
        except Exception as exc:
            # A failed step leaves the shared cache in an unknown state: every request in it fails.
            self._fail_all(active, _as_worker_error(exc))
            batch.reset()
            return
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(active))
        for request, token in zip(active, tokens, strict=True):
            self._accept(request, token)

    def _preempt_newest(self, active: list[_Request], batch: DecodeBatch) -> None:
        """Out of memory in a step: the newest request leaves the batch, freeing its rows, and will
        be prefilled again (prompt and tokens so far) once there is room; the others step again."""
        torch.cuda.empty_cache()
        batch.undo_step()
        for request in active:
            request.fed.pop()  # the token fed in the failed step is fed again
        newest = max(range(len(active)), key=lambda row: active[row].submitted_at)
        request = active[newest]
        logger.warning(
            "out of memory with %d requests decoding: the newest leaves the batch and will be recomputed", len(active)
        )
        batch.keep([row for row in range(len(active)) if row != newest])
        del active[newest]
        request.resumed = True
        request.inputs = request.inputs.on_device(torch.device("cpu"))  # its wait holds no device memory
        self._preempted.append(request)
        # What the others hold is what fits: the newest comes back once enough of them have left.
        held = max(self._tokens_held(active), 1)
        if self._settings.max_batch_tokens is None or held < self._settings.max_batch_tokens:
            self._settings = replace(self._settings, max_batch_tokens=held)
            logger.warning("the batch may now hold %d KV tokens (learned from running out of memory)", held)

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
        if token in self.end_token_ids or token in request.stop_token_ids:
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
        self._finish(
            request,
            GenerationOutput(
                text=text,
                completion_tokens=request.generated,
                finish_reason=reason,
                reused_prompt_tokens=request.reused,
            ),
        )
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


def _kv_need(request: _Request) -> int:
    """KV tokens a request may come to hold: its prompt and every token it may generate."""
    return request.inputs.prompt_tokens + request.max_new_tokens


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Bytes one token's KV states take in the cache, all layers together."""
    config: Any = loaded.model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    value_bytes = torch.finfo(loaded.dtype).bits // 8 if loaded.dtype.is_floating_point else 2
    return int(2 * config.num_hidden_layers * heads * head_dim * value_bytes)


def _plain_cache(model: Any) -> bool:
    """Whether the model's cache is plain, unbounded layers, whose rows can be cut, kept and merged."""
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _seeded(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """Every eos of the generation config (an id or a list), and the tokenizer's."""
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if loaded.tokenizer.eos_token_id is not None:
        ids.append(loaded.tokenizer.eos_token_id)
    return frozenset(int(token) for token in ids)


def _as_worker_error(exc: Exception) -> WorkerError:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        # Free the cached blocks now so the next request does not inherit a full device.
        torch.cuda.empty_cache()
        return OutOfMemoryError("the GPU ran out of memory while generating")
    if isinstance(exc, WorkerError):
        return exc
    logger.exception("generation failed")
    return GenerationError(f"generation failed: {type(exc).__name__}: {exc}")
