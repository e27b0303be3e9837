"""Chunked prefill, batched image prefill and both caches change nothing in the answers: in float32,
every greedy answer is what bare `generate` gives that request alone.

Each scenario is a small web-UI session on one engine: a first turn with an image; while it decodes,
a second client sends the same image with another question and a third a text prompt; then the
first client's next turn (the history, its answer and a new question, the image again) and a
request with the same text as the first but another image. They run at several chunk sizes, with the
caches on, and with a prefix budget so small that entries are evicted mid-conversation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llava_worker.config import WorkerConfig
from llava_worker.engine.core import Engine, PrefillSettings, RequestHandle, kv_bytes_per_token
from llava_worker.engine.requests import GenerationRequest
from llava_worker.engine.sampling import SamplingParams
from llava_worker.engine.streams import GenerationOutput
from llava_worker.models.images import ImageLimits
from llava_worker.models.inputs import prepare_inputs
from llava_worker.models.loaded import LoadedModel
from tests.support.kinds import KINDS
from tests.support.payloads import encode_image
from tests.support.reference import reference_text
from tests.support.servers import ModelCache

WAIT = 60.0
MiB = 1 << 20


@dataclass(frozen=True)
class Turn:
    prompt: str
    images: tuple[str, ...]
    new_tokens: int


def first_turn(kind: str, question: str, image: str) -> Turn:
    if kind == "text-only":
        return Turn(f"A chat between a user and an assistant. USER: {question} ASSISTANT:", (), 14)
    return Turn(f"A chat between a user and an assistant. USER: <image>\n{question} ASSISTANT:", (image,), 14)


def next_turn(turn: Turn, answer: str, question: str) -> Turn:
    return Turn(f"{turn.prompt} {answer.strip()}</s>USER: {question} ASSISTANT:", turn.images, 12)


def loaded_model(checkpoints: dict[str, Path], models: ModelCache, kind: str) -> LoadedModel:
    return models.get(WorkerConfig(model_path=str(checkpoints[kind]), device="cpu", no_register=True))


def submit(engine: Engine, loaded: LoadedModel, turn: Turn) -> RequestHandle:
    inputs = prepare_inputs(loaded, turn.prompt, turn.images, ImageLimits())
    return engine.submit(GenerationRequest(inputs=inputs, sampling=SamplingParams(), max_new_tokens=turn.new_tokens))


async def final_of(handle: RequestHandle) -> GenerationOutput:
    async def read() -> list[GenerationOutput]:
        return [output async for output in handle.outputs()]

    final = (await asyncio.wait_for(read(), WAIT))[-1]
    assert final.error is None, final.error
    return final


async def first_chunk(handle: RequestHandle) -> None:
    async def read() -> None:
        async for output in handle.outputs():
            if output.completion_tokens or output.finished:
                return

    await asyncio.wait_for(read(), WAIT)


def run_session(loaded: LoadedModel, kind: str, settings: PrefillSettings) -> dict[str, Any]:
    """Runs the session; returns each request's turn, final output, and the engine."""
    image, other_image = encode_image(1), encode_image(2, (30, 70) if kind != "llava-next" else (64, 40))
    engine = Engine(loaded, max_batch=4, settings=settings)
    engine.start()
    turns: dict[str, Turn] = {}
    finals: dict[str, GenerationOutput] = {}

    async def scenario() -> None:
        turns["first"] = first_turn(kind, "What is shown here?", image)
        first = submit(engine, loaded, turns["first"])
        await first_chunk(first)
        # Two newcomers join while the first decodes: the same image, and a text-only prompt.
        turns["same image"] = first_turn(kind, "Describe the colours please.", image)
        turns["text"] = Turn("USER: Tell me a story about the sea. ASSISTANT:", (), 9)
        joined = {name: submit(engine, loaded, turns[name]) for name in ("same image", "text")}
        finals["first"] = await final_of(first)
        for name, handle in joined.items():
            finals[name] = await final_of(handle)
        # While a long text stream decodes (so that prefills go in chunks), the next turn re-sends
        # everything, and another image comes under the first turn's very text.
        turns["background"] = Turn("USER: Count the stars. ASSISTANT:", (), 40)
        background = submit(engine, loaded, turns["background"])
        await first_chunk(background)
        turns["next turn"] = next_turn(turns["first"], finals["first"].text, "And what else?")
        turns["other image"] = Turn(turns["first"].prompt, (other_image,) if turns["first"].images else (), 10)
        later = {name: submit(engine, loaded, turns[name]) for name in ("next turn", "other image")}
        for name, handle in later.items():
            finals[name] = await final_of(handle)
        finals["background"] = await final_of(background)

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()
    return {"turns": turns, "finals": finals, "engine": engine}


#: Each setting from the size of one token's KV states and the first turn's length in tokens.
SETTINGS = {
    "whole prompts, caches on": lambda per_token, first: PrefillSettings(None, 64 * MiB, 64 * MiB),
    "chunks of 3": lambda per_token, first: PrefillSettings(3, 64 * MiB, 64 * MiB),
    "chunks of 16": lambda per_token, first: PrefillSettings(16, 64 * MiB, 64 * MiB),
    # Room for one first turn and its answer, not two: every new entry evicts the one before.
    "chunks of 5, evicting": lambda per_token, first: PrefillSettings(5, 0, (first + 30) * per_token),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_answer_is_what_generate_gives_alone(
    checkpoints: dict[str, Path], models: ModelCache, kind: str, setting: str
) -> None:
    loaded = loaded_model(checkpoints, models, kind)
    assert Engine(loaded, max_batch=1).piecewise, "these models prefill piecewise"
    opening = first_turn(kind, "What is shown here?", encode_image(1))
    first_prompt = prepare_inputs(loaded, opening.prompt, opening.images, ImageLimits())
    settings = SETTINGS[setting](kv_bytes_per_token(loaded), first_prompt.prompt_tokens)
    session = run_session(loaded, kind, settings)
    turns, finals, engine = session["turns"], session["finals"], session["engine"]
    for name, turn in turns.items():
        expected = reference_text(loaded, turn.prompt, list(turn.images), turn.new_tokens)
        assert finals[name].text == expected, f"{name}: {finals[name].text!r} != generate's {expected!r}"
        assert finals[name].finish_reason == "length"
    # At most two requests wait while one decodes here, so a piece is at most 4 chunks' worth of
    # tokens: a prompt that computes more (what the prefix cache did not cover) went in several.
    computed = [
        prepare_inputs(loaded, turn.prompt, turn.images, ImageLimits()).prompt_tokens
        - finals[name].reused_prompt_tokens
        for name, turn in turns.items()
        if name not in ("first", "background")
    ]
    if settings.chunk_tokens is not None and max(computed) > 4 * settings.chunk_tokens:
        assert engine.prefill_chunks > len(turns), "prompts went in several chunks"

    # The caches were really used (or, with the small budget, really evicted).
    if settings.prefix_cache_bytes >= MiB:
        assert finals["next turn"].reused_prompt_tokens >= first_prompt.prompt_tokens
    else:
        assert engine.prefix_cache.evictions > 0
    if turns["first"].images:
        # The other image's KV is never reused: at most the text before the image is.
        (span,) = first_prompt.images or ()
        assert finals["other image"].reused_prompt_tokens <= span.start
        if settings.image_cache_bytes:
            assert engine.image_cache.hits >= 1


def test_images_that_cannot_be_told_apart_go_whole_with_the_same_output(
    checkpoints: dict[str, Path], models: ModelCache
) -> None:
    """Two images with nothing between them run through the model's own forward (the safe way),
    beside a request that goes in chunks, and both answer as `generate` does alone."""
    loaded = loaded_model(checkpoints, models, "llava-1.5")
    adjacent = Turn("USER: <image><image>\nCompare them. ASSISTANT:", (encode_image(1), encode_image(2)), 12)
    chunked = first_turn("llava-1.5", "What is shown here?", encode_image(3))
    assert prepare_inputs(loaded, adjacent.prompt, adjacent.images, ImageLimits()).images is None
    engine = Engine(loaded, max_batch=4, settings=PrefillSettings(3, 64 * MiB, 64 * MiB))
    engine.start()
    finals: list[GenerationOutput] = []

    async def scenario() -> None:
        running = submit(engine, loaded, chunked)
        await first_chunk(running)
        finals.append(await final_of(submit(engine, loaded, adjacent)))
        finals.append(await final_of(running))

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()
    for turn, final in zip((adjacent, chunked), finals, strict=True):
        assert final.text == reference_text(loaded, turn.prompt, list(turn.images), turn.new_tokens)
    assert finals[0].reused_prompt_tokens == 0
