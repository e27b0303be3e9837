"""DecodeBatch on the tiny text-only model (float32, CPU), with exact tensors.

Text Generation Inference's `generate_token` / `filter` / `concatenate` tests, for this worker's batch:
each row of the shared, left-padded cache must compute what its request computes alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

from llava_worker.config import WorkerConfig
from llava_worker.engine.batch import DecodeBatch, is_mergeable, left_padded
from llava_worker.engine.kv_layer import growing_cache
from llava_worker.models.loaded import LoadedModel
from tests.support.servers import ModelCache

CPU = torch.device("cpu")
#: Prompts of different lengths (in tokens of the tiny tokenizer, BOS included).
PROMPTS = {
    "long": "USER: Tell me a story about the sea. ASSISTANT:",
    "short": "USER: Hi. ASSISTANT:",
    "longest": "USER: Write a long story about a little boat that sails across the sea at night. ASSISTANT:",
    "mid": "USER: Count the stars. ASSISTANT:",
}
#: Batched and lone float32 forward passes differ only by summation order.
ATOL = 1e-5


def _config(checkpoints: dict[str, Path], kind: str) -> WorkerConfig:
    return WorkerConfig(model_path=str(checkpoints[kind]), device="cpu", no_register=True)


@pytest.fixture(scope="module")
def loaded(checkpoints: dict[str, Path], models: ModelCache) -> LoadedModel:
    loaded = models.get(_config(checkpoints, "text-only"))
    assert loaded.dtype == torch.float32 and loaded.device == CPU
    return loaded


@pytest.fixture
def model(loaded: LoadedModel) -> Iterator[Any]:
    with torch.inference_mode():
        yield loaded.model


@pytest.fixture(scope="module")
def ids(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Each prompt's input ids, [1, length]."""
    tokens = {name: loaded.tokenizer(prompt, return_tensors="pt")["input_ids"] for name, prompt in PROMPTS.items()}
    lengths = [t.shape[1] for t in tokens.values()]
    assert len(set(lengths)) == len(lengths), "the prompts should all differ in length"
    assert tokens["short"].shape[1] < tokens["mid"].shape[1] < tokens["long"].shape[1] < tokens["longest"].shape[1]
    return tokens


class Solo:
    """One request decoded alone (its own cache, no padding): what its batch row must reproduce."""

    def __init__(self, model: Any, ids: torch.Tensor) -> None:
        self._model = model
        self.cache = DynamicCache(config=model.config)
        self.length = ids.shape[1]
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=self.cache, use_cache=True)
        self.logits: torch.Tensor = output.logits[0, -1]

    @property
    def next_token(self) -> int:
        return int(self.logits.argmax())

    def step(self, token: int) -> torch.Tensor:
        self.length += 1
        output = self._model(
            input_ids=torch.tensor([[token]]),
            attention_mask=torch.ones((1, self.length), dtype=torch.long),
            cache=self.cache,
            use_cache=True,
        )
        self.logits = output.logits[0, -1]
        return self.logits


def prefill(model: Any, ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """A lone prompt run as `Engine._prefill` runs it: its cache, its attention mask, its last logits."""
    cache = DynamicCache(config=model.config)
    mask = torch.ones_like(ids)
    output = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    return cache, mask, output.logits[:, -1]


def add(model: Any, batch: DecodeBatch, ids: torch.Tensor) -> Solo:
    """Prefills `ids` on its own, appends it to the batch, and returns its lone twin."""
    cache, mask, logits = prefill(model, ids)
    batch.add(cache, mask)
    solo = Solo(model, ids)
    torch.testing.assert_close(logits[0], solo.logits, rtol=0, atol=ATOL)
    return solo


def step_and_compare(model: Any, batch: DecodeBatch, solos: list[Solo]) -> torch.Tensor:
    """One decode step of the batch (each row fed its greedy token); every row's logits must equal
    its request's alone. Returns the batch's logits."""
    tokens = [solo.next_token for solo in solos]
    output = model(**batch.step_inputs(tokens), logits_to_keep=1)
    logits: torch.Tensor = output.logits[:, -1]
    assert logits.shape[0] == len(solos)
    for row, solo in enumerate(solos):
        torch.testing.assert_close(logits[row], solo.step(tokens[row]), rtol=0, atol=ATOL)
    assert batch.positions == [solo.length for solo in solos]
    return logits


def key_values(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a filled cache of plain layers."""
    pairs = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        pairs.append((layer.keys, layer.values))
    return pairs


def left_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[0] * (width - n) + [1] * n for n in lengths])


def test_left_padded_gives_ids_mask_and_positions_exactly() -> None:
    rows = [torch.tensor([[11, 12, 13]]), torch.tensor([21, 22, 23, 24, 25]), torch.tensor([[31]])]
    ids, mask, positions = left_padded(rows, pad_id=3)
    assert torch.equal(ids, torch.tensor([[3, 3, 11, 12, 13], [21, 22, 23, 24, 25], [3, 3, 3, 3, 31]]))
    assert torch.equal(mask, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]))
    # Each row counts from 0 at its first real token; padding gets a valid (clamped) position.
    assert torch.equal(positions, torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]))
    assert ids.dtype == mask.dtype == positions.dtype == torch.long


def test_a_left_padded_prefill_gives_every_row_its_alone_logits(model: Any, ids: dict[str, torch.Tensor]) -> None:
    """Text-only newcomers share one padded prefill; their rows then decode like lone requests."""
    names = ["short", "long", "mid"]
    padded_ids, mask, positions = left_padded([ids[name] for name in names], pad_id=3)
    cache = DynamicCache(config=model.config)
    output = model(
        input_ids=padded_ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    solos = [Solo(model, ids[name]) for name in names]
    for row, solo in enumerate(solos):
        torch.testing.assert_close(output.logits[row, -1], solo.logits, rtol=0, atol=ATOL)
    batch = DecodeBatch(CPU)
    batch.add(cache, mask)
    assert len(batch) == 3
    assert batch.positions == [ids[name].shape[1] for name in names]
    for _ in range(3):
        step_and_compare(model, batch, solos)


@pytest.mark.parametrize("order", [("long", "short"), ("short", "long")], ids=["longer-first", "shorter-first"])
def test_add_left_pads_each_request_cache_and_mask(
    model: Any, ids: dict[str, torch.Tensor], order: tuple[str, str]
) -> None:
    batch = DecodeBatch(CPU)
    assert len(batch) == 0
    lengths = [ids[name].shape[1] for name in order]
    width = max(lengths)
    own: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for count, name in enumerate(order, start=1):
        cache, mask, _ = prefill(model, ids[name])
        # The batch adopts (and later extends) the first cache it gets: keep copies of the rows.
        own.append([(keys.clone(), values.clone()) for keys, values in key_values(cache)])
        batch.add(cache, mask)
        assert len(batch) == count
    assert torch.equal(batch.attention_mask, left_padded_mask(lengths, width))
    assert batch.positions == lengths
    for index, (batch_keys, batch_values) in enumerate(key_values(batch.cache)):
        assert batch_keys.shape[:3] == (2, model.config.num_key_value_heads, width)
        for row, length in enumerate(lengths):
            keys, values = own[row][index]
            padding = torch.zeros_like(batch_keys[row, :, : width - length])
            assert torch.equal(batch_keys[row], torch.cat([padding, keys[0]], dim=1))
            assert torch.equal(batch_values[row], torch.cat([padding, values[0]], dim=1))


def test_generate_token_steps_every_row_as_if_alone(model: Any, ids: dict[str, torch.Tensor]) -> None:
    batch = DecodeBatch(CPU)
    solos = [add(model, batch, ids["long"]), add(model, batch, ids["short"])]
    long_length, short_length = ids["long"].shape[1], ids["short"].shape[1]
    width = long_length
    for done in range(3):
        tokens = [solo.next_token for solo in solos]
        inputs = batch.step_inputs(tokens)
        # Each row is fed its last token at its own position; the mask grows by one real column.
        assert inputs["input_ids"].tolist() == [[tokens[0]], [tokens[1]]]
        assert inputs["position_ids"].tolist() == [[long_length + done], [short_length + done]]
        width += 1
        assert torch.equal(inputs["attention_mask"], left_padded_mask([width, short_length + done + 1], width))
        assert inputs["cache"] is batch.cache and inputs["use_cache"] is True
        assert batch.positions == [long_length + done + 1, short_length + done + 1]
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        for row, solo in enumerate(solos):
            torch.testing.assert_close(logits[row], solo.step(tokens[row]), rtol=0, atol=ATOL)
        assert batch.cache is not None and batch.cache.get_seq_length() == width


@pytest.mark.parametrize("kept", [0, 1], ids=["longer-row", "padded-row"])
def test_keep_one_row_drops_the_padding_it_no_longer_needs(model: Any, ids: dict[str, torch.Tensor], kept: int) -> None:
    """TGI's `filter`: the kept request decodes on exactly as alone, with no leftover padding."""
    batch = DecodeBatch(CPU)
    solos = [add(model, batch, ids["long"]), add(model, batch, ids["short"])]
    for _ in range(2):
        step_and_compare(model, batch, solos)
    batch.keep([kept])
    solo = solos[kept]
    assert len(batch) == 1
    assert batch.positions == [solo.length]
    assert torch.equal(batch.attention_mask, torch.ones((1, solo.length), dtype=torch.long))
    for (keys, values), (own_keys, own_values) in zip(key_values(batch.cache), key_values(solo.cache), strict=True):
        assert keys.shape == own_keys.shape
        torch.testing.assert_close(keys, own_keys, rtol=0, atol=ATOL)
        torch.testing.assert_close(values, own_values, rtol=0, atol=ATOL)
    for _ in range(2):
        step_and_compare(model, batch, [solo])


def test_keep_nothing_resets_the_batch(model: Any, ids: dict[str, torch.Tensor]) -> None:
    batch = DecodeBatch(CPU)
    solos = [add(model, batch, ids["long"]), add(model, batch, ids["short"])]
    step_and_compare(model, batch, solos)
    batch.keep([])
    assert len(batch) == 0
    assert batch.cache is None
    assert batch.positions == []
    assert batch.attention_mask.shape == (0, 0)
    # An emptied batch starts afresh with the next request.
    solo = add(model, batch, ids["mid"])
    assert torch.equal(batch.attention_mask, torch.ones_like(ids["mid"]))
    step_and_compare(model, batch, [solo])


def test_keep_reorders_rows(model: Any, ids: dict[str, torch.Tensor]) -> None:
    batch = DecodeBatch(CPU)
    solos = [add(model, batch, ids["long"]), add(model, batch, ids["short"])]
    step_and_compare(model, batch, solos)
    mask = batch.attention_mask.clone()
    positions = list(batch.positions)
    batch.keep([1, 0])
    assert batch.positions == [positions[1], positions[0]]
    # The longer row (now row 1) has no padding, so no column is dropped.
    assert torch.equal(batch.attention_mask, mask[[1, 0]])
    solos.reverse()
    for _ in range(2):
        step_and_compare(model, batch, solos)


def test_concatenate_requests_into_a_running_batch(model: Any, ids: dict[str, torch.Tensor]) -> None:
    """TGI's `concatenate`: requests join between steps, longer or shorter than the batch; then some leave."""
    batch = DecodeBatch(CPU)
    solos = [add(model, batch, ids["long"]), add(model, batch, ids["short"])]
    for _ in range(2):
        step_and_compare(model, batch, solos)
    # Longer than the batch so far: the running rows get more padding.
    assert ids["longest"].shape[1] > batch.attention_mask.shape[1]
    solos.append(add(model, batch, ids["longest"]))
    assert batch.positions == [solo.length for solo in solos]
    width = ids["longest"].shape[1]
    assert torch.equal(batch.attention_mask, left_padded_mask(batch.positions, width))
    for _ in range(2):
        step_and_compare(model, batch, solos)
    # Shorter than the batch: the newcomer is the padded one.
    solos.append(add(model, batch, ids["mid"]))
    width += 2
    assert torch.equal(batch.attention_mask, left_padded_mask(batch.positions, width))
    for _ in range(2):
        step_and_compare(model, batch, solos)
    # The two longest leave; what the two others do not need of the padding goes with them.
    batch.keep([1, 3])
    solos = [solos[1], solos[3]]
    assert torch.equal(batch.attention_mask, left_padded_mask(batch.positions, max(batch.positions)))
    for _ in range(2):
        step_and_compare(model, batch, solos)


def test_is_mergeable_only_for_plain_dynamic_caches(
    model: Any, ids: dict[str, torch.Tensor], checkpoints: dict[str, Path], models: ModelCache
) -> None:
    cache, _, _ = prefill(model, ids["short"])
    assert is_mergeable(cache)
    # Layers are filled lazily: an empty cache has nothing to join yet.
    assert not is_mergeable(DynamicCache(config=model.config))
    keys_and_values = key_values(cache)
    for other in (None, object(), keys_and_values, tuple(keys_and_values)):
        assert not is_mergeable(other)
    static = StaticCache(config=model.config, max_cache_len=32)
    model(input_ids=ids["short"], cache=static, use_cache=True)
    assert not is_mergeable(static)
    # A sliding-window model's DynamicCache holds sliding layers, whose rows cannot be joined.
    sliding = models.get(_config(checkpoints, "sliding-window")).model
    sliding_cache, _, _ = prefill(sliding, ids["short"])
    assert isinstance(sliding_cache, DynamicCache)
    assert not is_mergeable(sliding_cache)


def test_a_group_with_spare_rows_takes_in_the_running_rows_and_every_row_stays_exact(
    model: Any, ids: dict[str, torch.Tensor]
) -> None:
    """The join without copying the newcomer: its cache was allocated with rows for the running
    requests, which are copied in (right-aligned, zero-padded); the newcomer's rows come first."""
    batch = DecodeBatch(CPU)
    solos = [add(model, batch, ids["short"]), add(model, batch, ids["mid"])]
    step_and_compare(model, batch, solos)
    # The newcomer is longer than the running rows, as an image prompt is, with two spare rows.
    newcomer = ids["longest"]
    cache = growing_cache(model.config, planned=newcomer.shape[1] + 4, spare_rows=2)
    mask = torch.ones_like(newcomer)
    output = model(input_ids=newcomer, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    alone = Solo(model, newcomer)
    torch.testing.assert_close(output.logits[0, -1], alone.logits, rtol=0, atol=ATOL)
    assert batch.cache is not None
    running = [keys.clone() for keys, _ in key_values(batch.cache)]
    assert batch.add(cache, mask), "the newcomer's cache took in the running rows"
    assert batch.cache is cache
    solos.insert(0, alone)
    assert batch.positions == [solo.length for solo in solos]
    width = newcomer.shape[1]
    assert torch.equal(batch.attention_mask, left_padded_mask(batch.positions, width))
    for (keys, _), before in zip(key_values(cache), running, strict=True):
        assert keys.shape[0] == 3
        # The running rows, right-aligned; their new padding is zeros.
        torch.testing.assert_close(keys[1:, :, width - before.shape[2] :], before, rtol=0, atol=0)
        assert not keys[1:, :, : width - before.shape[2]].any()
    for _ in range(3):
        step_and_compare(model, batch, solos)
    # Without room (more running rows than spare rows) the newcomer's rows come last, as before.
    other = growing_cache(model.config, spare_rows=1)
    mask = torch.ones_like(ids["long"])
    model(input_ids=ids["long"], attention_mask=mask, cache=other, use_cache=True, logits_to_keep=1)
    assert not batch.add(other, mask)
    solos.append(Solo(model, ids["long"]))
    for _ in range(2):
        step_and_compare(model, batch, solos)
