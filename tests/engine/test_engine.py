"""The Engine without HTTP: requests submitted on an event loop get exactly what bare `generate` gives.

The engine's model is wrapped in `Hooked`, which records every forward call and can hold one back
(a gate the test opens) or make it fail; gates make each interleaving deterministic, whatever the
speed of the machine. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from llava_worker.config import WorkerConfig
from llava_worker.engine.core import Engine, RequestHandle
from llava_worker.engine.requests import GenerationRequest
from llava_worker.engine.sampling import SamplingParams
from llava_worker.engine.streams import GenerationOutput
from llava_worker.errors import GenerationError
from llava_worker.models.images import ImageLimits
from llava_worker.models.inputs import PreparedInputs, prepare_inputs
from llava_worker.models.loaded import LoadedModel
from tests.support.reference import reference_tokens
from tests.support.servers import ModelCache

#: Seconds any single wait may take before the test fails instead of hanging.
WAIT = 30.0
PROMPTS = {
    "sea": "USER: Tell me a story about the sea. ASSISTANT:",
    "hi": "USER: Hi. ASSISTANT:",
    "stars": "USER: Count the stars. ASSISTANT:",
    "boat": "USER: Write a long story about a little boat that sails across the sea at night. ASSISTANT:",
}


@pytest.fixture(scope="module")
def loaded(checkpoints: dict[str, Path], models: ModelCache) -> LoadedModel:
    return models.get(WorkerConfig(model_path=str(checkpoints["text-only"]), device="cpu", no_register=True))


@pytest.fixture(scope="module")
def prompt_lengths(loaded: LoadedModel) -> dict[str, int]:
    lengths = {name: len(loaded.tokenizer(prompt)["input_ids"]) for name, prompt in PROMPTS.items()}
    assert len(set(lengths.values())) == len(lengths), "prompt lengths identify prefill calls"
    assert min(lengths.values()) > 1, "a forward call of one token per row is a decode step"
    return lengths


class Reference:
    """Bare `model.generate` (greedy), computed before any engine runs the same model."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self._tokens: dict[tuple[str, int], list[int]] = {}

    def tokens(self, name: str, max_new_tokens: int) -> list[int]:
        key = (name, max_new_tokens)
        if key not in self._tokens:
            self._tokens[key] = reference_tokens(self._loaded, PROMPTS[name], [], max_new_tokens)
            assert len(self._tokens[key]) == max_new_tokens, "the tiny model never stops by itself"
        return self._tokens[key]

    def text(self, name: str, max_new_tokens: int) -> str:
        return self.decode(self.tokens(name, max_new_tokens))

    def decode(self, tokens: list[int]) -> str:
        return str(self._loaded.tokenizer.decode(tokens, skip_special_tokens=True))


@pytest.fixture(scope="module")
def reference(loaded: LoadedModel) -> Reference:
    return Reference(loaded)


@dataclass(frozen=True)
class Call:
    """One forward call of the engine's model."""

    rows: int
    length: int
    """Tokens per row: 1 for a decode step, the (padded) prompt length for a prefill."""

    @property
    def decode(self) -> bool:
        return self.length == 1


class Gate:
    """Holds the engine thread in one forward call until the test releases it."""

    def __init__(self) -> None:
        self._arrived = threading.Event()
        self._released = threading.Event()

    def pass_through(self) -> None:
        self._arrived.set()
        # Bounded: a test that fails before releasing must not strand the engine thread.
        self._released.wait(WAIT)

    async def reached(self) -> None:
        """Waits (on the event loop) until the engine thread is held here."""
        for _ in range(int(WAIT / 0.005)):
            if self._arrived.is_set():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"the engine did not reach the gate within {WAIT} s")

    def release(self) -> None:
        self._released.set()


@dataclass
class _Trigger:
    rows: int | None
    decode: bool | None
    nth: int
    action: Callable[[], None]
    seen: int = 0

    def matches(self, call: Call) -> bool:
        if (self.rows is not None and call.rows != self.rows) or (
            self.decode is not None and call.decode != self.decode
        ):
            return False
        self.seen += 1
        return self.seen == self.nth


class Hooked:
    """The engine's model: records every forward call and delegates it, unless told to hold or fail it."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.calls: list[Call] = []
        self._triggers: list[_Trigger] = []
        self._gates: list[Gate] = []

    def hold(self, *, rows: int | None = None, decode: bool | None = None, nth: int = 1) -> Gate:
        """A gate at the `nth` forward call with that many rows / of that kind (counted from now)."""
        gate = Gate()
        self._gates.append(gate)
        self._triggers.append(_Trigger(rows, decode, nth, gate.pass_through))
        return gate

    def fail(self, error: Exception, *, rows: int | None = None, decode: bool | None = None, nth: int = 1) -> None:
        """Makes the `nth` matching forward call raise `error` instead of running."""

        def fail() -> None:
            raise error

        self._triggers.append(_Trigger(rows, decode, nth, fail))

    def release_all(self) -> None:
        for gate in self._gates:
            gate.release()

    def decode_rows(self) -> list[int]:
        """Rows of each decode step so far, in order."""
        return [call.rows for call in self.calls if call.decode]

    def __call__(self, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"]
        call = Call(rows=int(ids.shape[0]), length=int(ids.shape[1]))
        self.calls.append(call)
        for trigger in self._triggers:
            if trigger.matches(call):
                trigger.action()
        return self._model(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


StartEngine = Callable[..., tuple[Engine, Hooked]]


@pytest.fixture
def start_engine(loaded: LoadedModel) -> Iterator[StartEngine]:
    """Starts an engine on the tiny text-only model, its model wrapped in `Hooked`; stops it afterwards."""
    started: list[tuple[Engine, Hooked]] = []

    def start(max_batch: int = 4) -> tuple[Engine, Hooked]:
        engine = Engine(loaded, max_batch=max_batch)
        hooked = Hooked(engine._model)
        engine._model = hooked
        started.append((engine, hooked))
        engine.start()
        return engine, hooked

    try:
        yield start
    finally:
        for engine, hooked in started:
            hooked.release_all()
            engine.stop()
            assert not engine.alive


class Done:
    """An `on_done` callback that records each call and whether it ran on the event loop."""

    def __init__(self) -> None:
        self.outputs: list[GenerationOutput] = []
        self.loops: list[asyncio.AbstractEventLoop | None] = []

    def __call__(self, output: GenerationOutput) -> None:
        self.outputs.append(output)
        try:
            self.loops.append(asyncio.get_running_loop())
        except RuntimeError:  # not on an event loop
            self.loops.append(None)


def make_request(
    loaded: LoadedModel, name: str, max_new_tokens: int, on_done: Done | None = None, **extra: Any
) -> GenerationRequest:
    return GenerationRequest(
        inputs=prepare_inputs(loaded, PROMPTS[name], (), ImageLimits()),
        sampling=SamplingParams(),
        max_new_tokens=max_new_tokens,
        on_done=on_done,
        **extra,
    )


async def outputs_of(handle: RequestHandle) -> list[GenerationOutput]:
    """Every snapshot the request publishes, up to its final one (bounded)."""

    async def read() -> list[GenerationOutput]:
        return [output async for output in handle.outputs()]

    outputs = await asyncio.wait_for(read(), WAIT)
    assert outputs and outputs[-1].finished
    return outputs


async def final_of(handle: RequestHandle) -> GenerationOutput:
    return (await outputs_of(handle))[-1]


async def settle(engine: Engine) -> None:
    """Waits for the engine to take another turn, so anything it still had to deliver has been queued."""
    await asyncio.wait_for(engine.probe(), WAIT)
    await asyncio.sleep(0)


def assert_exact(final: GenerationOutput, reference: Reference, name: str, max_new_tokens: int) -> None:
    assert final.error is None
    assert final.finish_reason == "length"
    assert final.completion_tokens == max_new_tokens
    assert final.text == reference.text(name, max_new_tokens)


def assert_error(final: GenerationOutput, message: str) -> None:
    assert final.finish_reason is None
    assert isinstance(final.error, GenerationError)
    assert message in str(final.error)


def test_submit_gives_what_bare_generate_gives(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference
) -> None:
    expected = reference.text("sea", 10)
    engine, _ = start_engine()

    async def scenario() -> None:
        done = Done()
        outputs = await outputs_of(engine.submit(make_request(loaded, "sea", 10, done)))
        final = outputs[-1]
        assert final.text == expected
        assert final.finish_reason == "length"
        assert final.completion_tokens == 10
        assert final.error is None
        # The stream only grows: every earlier snapshot is unfinished and a prefix of the final text.
        for earlier, later in itertools.pairwise(outputs):
            assert earlier.finish_reason is None and earlier.error is None
            assert earlier.completion_tokens < later.completion_tokens
            assert later.text.startswith(earlier.text)
        # `on_done` ran once, on this event loop, with the final output, before the reader saw it.
        assert done.outputs == [final]
        await settle(engine)
        assert done.outputs == [final]
        assert done.loops == [asyncio.get_running_loop()]

    asyncio.run(scenario())


def test_requests_submitted_together_decode_in_one_batch(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference, prompt_lengths: dict[str, int]
) -> None:
    lengths = {"sea": 12, "hi": 8, "stars": 10}
    for name, n in lengths.items():
        reference.tokens(name, n)
    engine, hooked = start_engine()

    async def scenario() -> None:
        # Held in the first request's prefill, the engine finds the other two waiting together.
        first = hooked.hold(nth=1)
        handles = {"sea": engine.submit(make_request(loaded, "sea", lengths["sea"]))}
        await first.reached()
        for name in ("hi", "stars"):
            handles[name] = engine.submit(make_request(loaded, name, lengths[name]))
        first.release()
        finals = await asyncio.gather(*(final_of(handle) for handle in handles.values()))
        for name, final in zip(handles, finals, strict=True):
            assert_exact(final, reference, name, lengths[name])

    asyncio.run(scenario())
    assert engine.peak_batch == 3
    # The two that arrived together were prefilled in one (left-padded) forward pass.
    assert Call(rows=2, length=max(prompt_lengths["hi"], prompt_lengths["stars"])) in hooked.calls
    assert 3 in hooked.decode_rows()


def test_a_request_submitted_while_others_decode_joins_them_exactly(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference, prompt_lengths: dict[str, int]
) -> None:
    for name in ("sea", "hi", "boat"):
        reference.tokens(name, 12)
    engine, hooked = start_engine()

    async def scenario() -> None:
        first = hooked.hold(nth=1)
        third_pair_step = hooked.hold(rows=2, decode=True, nth=3)
        sea = engine.submit(make_request(loaded, "sea", 12))
        await first.reached()
        hi = engine.submit(make_request(loaded, "hi", 12))
        first.release()
        # The pair has decoded three steps together when the newcomer (a longer prompt) arrives.
        await third_pair_step.reached()
        boat = engine.submit(make_request(loaded, "boat", 12))
        third_pair_step.release()
        finals = await asyncio.gather(final_of(sea), final_of(hi), final_of(boat))
        for name, final in zip(("sea", "hi", "boat"), finals, strict=True):
            assert_exact(final, reference, name, 12)

    asyncio.run(scenario())
    assert engine.peak_batch == 3
    rows = hooked.decode_rows()
    joined = rows.index(3)
    assert rows[:joined].count(2) >= 3, "the newcomer should have joined a batch already decoding"
    boat_prefill = hooked.calls.index(Call(rows=1, length=prompt_lengths["boat"]))
    assert next(call.rows for call in hooked.calls[boat_prefill + 1 :] if call.decode) == 3


def test_max_batch_bounds_the_batch(start_engine: StartEngine, loaded: LoadedModel, reference: Reference) -> None:
    names = ("sea", "hi", "stars")
    for name in names:
        reference.tokens(name, 8)
    engine, hooked = start_engine(max_batch=2)

    async def scenario() -> None:
        first = hooked.hold(nth=1)
        handles = [engine.submit(make_request(loaded, "sea", 8))]
        await first.reached()
        handles += [engine.submit(make_request(loaded, name, 8)) for name in names[1:]]
        first.release()
        finals = await asyncio.gather(*(final_of(handle) for handle in handles))
        for name, final in zip(names, finals, strict=True):
            assert_exact(final, reference, name, 8)

    asyncio.run(scenario())
    # The third waited for a free row, then decoded with the others.
    assert engine.peak_batch == 2
    assert max(hooked.decode_rows()) == 2


def test_a_request_moves_its_inputs_to_the_device_only_when_admitted(
    start_engine: StartEngine, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved: list[int] = []
    original = PreparedInputs.on_device

    def recording(inputs: PreparedInputs, device: torch.device) -> PreparedInputs:
        moved.append(inputs.prompt_tokens)
        return original(inputs, device)

    monkeypatch.setattr(PreparedInputs, "on_device", recording)
    engine, hooked = start_engine(max_batch=1)
    first_request, second_request = make_request(loaded, "sea", 8), make_request(loaded, "hi", 8)
    assert first_request.inputs.prompt_tokens != second_request.inputs.prompt_tokens

    async def scenario() -> None:
        first = hooked.hold(nth=1)
        handles = [engine.submit(first_request)]
        await first.reached()
        handles.append(engine.submit(second_request))
        await asyncio.sleep(0.2)
        assert moved == [first_request.inputs.prompt_tokens], "the waiting request holds no device memory"
        first.release()
        await asyncio.gather(*(final_of(handle) for handle in handles))

    asyncio.run(scenario())
    assert moved == [first_request.inputs.prompt_tokens, second_request.inputs.prompt_tokens]


def test_stop_strings_and_stop_token_ids_end_a_request_with_stop(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference
) -> None:
    tokens = reference.tokens("sea", 12)
    text = reference.text("sea", 12)
    # A stop string from the middle of the answer, at its first occurrence.
    at = next(i for i in range(6, len(text) - 3) if text.find(text[i : i + 3]) == i)
    stop = text[at : at + 3]
    stop_after = next(k for k in range(1, 13) if stop in reference.decode(tokens[:k]))
    assert stop_after < 12
    # A stop token id: a generated token that did not occur before it.
    cut = next(i for i in range(3, 12) if tokens[i] not in tokens[:i])
    reference.tokens("stars", 12)
    engine, _ = start_engine()

    async def scenario() -> None:
        by_string = engine.submit(make_request(loaded, "sea", 12, stop=(stop,)))
        by_token = engine.submit(make_request(loaded, "sea", 12, stop_token_ids=(tokens[cut],)))
        plain = engine.submit(make_request(loaded, "stars", 12))
        string_outputs, token_final, plain_final = await asyncio.gather(
            outputs_of(by_string), final_of(by_token), final_of(plain)
        )
        final = string_outputs[-1]
        assert (final.finish_reason, final.error) == ("stop", None)
        assert final.text == text[:at]
        assert final.completion_tokens == stop_after
        # The stop string never reaches the stream, not even in part.
        assert all(output.text == final.text[: len(output.text)] for output in string_outputs)
        assert (token_final.finish_reason, token_final.error) == ("stop", None)
        assert token_final.completion_tokens == cut, "the stop token itself is not part of the answer"
        assert token_final.text == reference.decode(tokens[:cut])
        assert_exact(plain_final, reference, "stars", 12)

    asyncio.run(scenario())


def test_cancel_ends_one_request_and_leaves_the_others_exact(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference
) -> None:
    names = ("sea", "hi", "stars")
    for name in names:
        reference.tokens(name, 12)
    engine, hooked = start_engine()

    async def scenario() -> None:
        first = hooked.hold(nth=1)
        third_step = hooked.hold(rows=3, decode=True, nth=3)
        done = Done()
        sea = engine.submit(make_request(loaded, "sea", 12))
        await first.reached()
        hi = engine.submit(make_request(loaded, "hi", 12, done))
        stars = engine.submit(make_request(loaded, "stars", 12))
        first.release()
        await third_step.reached()
        # The middle row's client has had its first output; now it cancels (twice: harmless).
        hi_outputs = aiter(hi.outputs())
        first_output = await asyncio.wait_for(anext(hi_outputs), WAIT)
        assert first_output.completion_tokens >= 1 and not first_output.finished
        hi.cancel()
        hi.cancel()
        third_step.release()
        hi_final = await asyncio.wait_for(_last(hi_outputs), WAIT)
        sea_final, stars_final = await asyncio.gather(final_of(sea), final_of(stars))
        assert (hi_final.finish_reason, hi_final.error) == ("cancelled", None)
        assert 1 <= hi_final.completion_tokens < 12
        assert hi_final.text == reference.decode(reference.tokens("hi", 12)[: hi_final.completion_tokens])
        assert_exact(sea_final, reference, "sea", 12)
        assert_exact(stars_final, reference, "stars", 12)
        await settle(engine)
        assert done.outputs == [hi_final]

    asyncio.run(scenario())
    # The cancelled row left the batch at the next token boundary.
    rows = hooked.decode_rows()
    held = [i for i, n in enumerate(rows) if n == 3][2]
    assert 3 not in rows[held + 1 :]
    assert rows[held + 1] == 2


def test_cancel_before_prefill_never_runs_the_request(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference, prompt_lengths: dict[str, int]
) -> None:
    reference.tokens("sea", 6)
    engine, hooked = start_engine()

    async def scenario() -> None:
        first = hooked.hold(nth=1)
        sea = engine.submit(make_request(loaded, "sea", 6))
        await first.reached()
        done = Done()
        boat = engine.submit(make_request(loaded, "boat", 6, done))
        boat.cancel()
        first.release()
        boat_final, sea_final = await asyncio.gather(final_of(boat), final_of(sea))
        assert boat_final == GenerationOutput(finish_reason="cancelled")
        assert_exact(sea_final, reference, "sea", 6)
        await settle(engine)
        assert done.outputs == [boat_final]

    asyncio.run(scenario())
    assert all(call.length != prompt_lengths["boat"] for call in hooked.calls), "a cancelled request was prefilled"


def test_abort_all_fails_every_request_and_the_engine_serves_on(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference
) -> None:
    expected = reference.text("stars", 8)
    # Room for two: the third request is still waiting when the abort comes.
    engine, hooked = start_engine(max_batch=2)

    async def scenario() -> None:
        first = hooked.hold(nth=1)
        second_step = hooked.hold(rows=2, decode=True, nth=2)
        dones = [Done(), Done(), Done()]
        handles = [engine.submit(make_request(loaded, "sea", 12, dones[0]))]
        await first.reached()
        handles += [
            engine.submit(make_request(loaded, name, 12, done))
            for name, done in zip(("hi", "boat"), dones[1:], strict=True)
        ]
        first.release()
        await second_step.reached()
        engine.abort_all()
        second_step.release()
        finals = await asyncio.gather(*(final_of(handle) for handle in handles))
        for final in finals:
            assert_error(final, "the worker is shutting down")
        # The two that were decoding keep their count of tokens; the waiting one had none.
        assert [final.completion_tokens > 0 for final in finals] == [True, True, False]
        await settle(engine)
        assert [done.outputs for done in dones] == [[final] for final in finals]
        # The abort is over: the next request is served, exactly.
        assert engine.alive
        after = await final_of(engine.submit(make_request(loaded, "stars", 8)))
        assert after.error is None and after.text == expected

    asyncio.run(scenario())


def test_probe_answers_while_idle_and_while_busy_and_stop_ends_the_engine(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference
) -> None:
    reference.tokens("sea", 12)
    engine, hooked = start_engine()

    async def scenario() -> None:
        await asyncio.wait_for(engine.probe(), 5)
        second_step = hooked.hold(decode=True, nth=2)
        fifth_step = hooked.hold(decode=True, nth=5)
        sea = engine.submit(make_request(loaded, "sea", 12))
        await second_step.reached()
        # Asked mid-step, the probe is answered by the loop's next turn, not before.
        probe = engine.probe()
        await asyncio.sleep(0.05)
        assert not probe.done()
        second_step.release()
        # Answered while the request is still decoding (it is held at its fifth step).
        await asyncio.wait_for(probe, 5)
        fifth_step.release()
        assert_exact(await final_of(sea), reference, "sea", 12)
        await asyncio.wait_for(engine.probe(), 5)

    asyncio.run(scenario())
    engine.stop()
    assert not engine.alive

    async def after_stop() -> None:
        with pytest.raises(GenerationError, match="not running"):
            engine.submit(make_request(loaded, "sea", 4))

    asyncio.run(after_stop())


def test_stop_fails_the_requests_still_running(start_engine: StartEngine, loaded: LoadedModel) -> None:
    engine, hooked = start_engine()

    async def scenario() -> None:
        held = hooked.hold(decode=True, nth=2)
        handle = engine.submit(make_request(loaded, "sea", 12))
        await held.reached()
        # Asked to stop mid-step (without waiting for the thread), the loop ends after that step.
        engine.stop(timeout=0)
        assert not engine.alive
        held.release()
        final = await final_of(handle)
        assert_error(final, "the worker is shutting down")
        assert final.completion_tokens >= 2

    asyncio.run(scenario())


def test_a_failed_decode_step_fails_its_batch_and_the_engine_serves_on(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference
) -> None:
    expected = reference.text("boat", 8)
    engine, hooked = start_engine()

    async def scenario() -> None:
        first = hooked.hold(nth=1)
        hooked.fail(RuntimeError("boom in a decode step"), rows=2, decode=True, nth=3)
        dones = [Done(), Done()]
        sea = engine.submit(make_request(loaded, "sea", 12, dones[0]))
        await first.reached()
        hi = engine.submit(make_request(loaded, "hi", 12, dones[1]))
        first.release()
        finals = await asyncio.gather(final_of(sea), final_of(hi))
        for final in finals:
            assert_error(final, "RuntimeError: boom in a decode step")
            assert 0 < final.completion_tokens < 12
        await settle(engine)
        assert [done.outputs for done in dones] == [[final] for final in finals]
        # The failed batch's cache is gone; the next request starts a clean one and is exact.
        assert engine.alive
        after = await final_of(engine.submit(make_request(loaded, "boat", 8)))
        assert after.error is None and after.text == expected

    asyncio.run(scenario())


def test_a_failed_prefill_fails_only_the_newcomer(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference
) -> None:
    reference.tokens("sea", 12)
    reference.tokens("stars", 6)
    engine, hooked = start_engine()

    async def scenario() -> None:
        second_step = hooked.hold(decode=True, nth=2)
        # The first prefill is the running request's; the second is the newcomer's.
        hooked.fail(RuntimeError("boom in a prefill"), decode=False, nth=2)
        sea = engine.submit(make_request(loaded, "sea", 12))
        await second_step.reached()
        done = Done()
        newcomer = engine.submit(make_request(loaded, "boat", 12, done))
        second_step.release()
        newcomer_final, sea_final = await asyncio.gather(final_of(newcomer), final_of(sea))
        assert_error(newcomer_final, "RuntimeError: boom in a prefill")
        assert newcomer_final.completion_tokens == 0
        assert_exact(sea_final, reference, "sea", 12)
        await settle(engine)
        assert done.outputs == [newcomer_final]
        assert_exact(await final_of(engine.submit(make_request(loaded, "stars", 6))), reference, "stars", 6)

    asyncio.run(scenario())


async def _last(outputs: Any) -> GenerationOutput:
    last = None
    async for output in outputs:
        last = output
    assert isinstance(last, GenerationOutput) and last.finished
    return last


def test_out_of_memory_in_a_step_preempts_the_newest_and_every_answer_stays_exact(
    start_engine: StartEngine, loaded: LoadedModel, reference: Reference, prompt_lengths: dict[str, int]
) -> None:
    """Fault injection: the GPU's out-of-memory error in a decode step of three. The newest request
    leaves the batch and is recomputed (prompt and tokens so far) once another has finished; nobody
    fails, and every answer is what `generate` gives alone."""
    lengths = {"sea": 12, "hi": 16, "stars": 14}
    expected = {name: reference.text(name, n) for name, n in lengths.items()}
    engine, hooked = start_engine()

    async def scenario() -> None:
        first = hooked.hold(nth=1)
        hooked.fail(torch.cuda.OutOfMemoryError("CUDA out of memory (injected)"), rows=3, decode=True, nth=3)
        sea = engine.submit(make_request(loaded, "sea", lengths["sea"]))
        await first.reached()
        others = {name: engine.submit(make_request(loaded, name, lengths[name])) for name in ("hi", "stars")}
        first.release()
        finals = {"sea": await final_of(sea)} | {name: await final_of(handle) for name, handle in others.items()}
        for name, final in finals.items():
            assert final.error is None, (name, final.error)
            assert final.text == expected[name] and final.completion_tokens == lengths[name], name
        # The batch learnt what fits: two requests' worth.
        assert engine.max_batch_tokens is not None
        assert max(hooked.decode_rows()) == 3 and hooked.decode_rows()[-1] < 3
        # The preempted request was prefilled again: its prompt and the tokens it had, one row.
        prompts = {prompt_lengths[name] for name in lengths}
        recomputed = [c for c in hooked.calls if not c.decode and c.length not in prompts]
        assert [c.rows for c in recomputed] == [1], hooked.calls

    asyncio.run(scenario())
