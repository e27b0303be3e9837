"""The engine's caches on their own: byte budgets, LRU order, prefix matching with images, in-place KV growth."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from llava_worker.engine.image_cache import ImageFeatureCache
from llava_worker.engine.kv_layer import MARGIN, GrowingLayer
from llava_worker.engine.lru import ByteBudgetLru
from llava_worker.engine.prefix_cache import ImageMark, PrefixCache, SequenceKey, common_prefix

IMAGE = 99


def key(ids: list[int], *images: tuple[int, int, bytes]) -> SequenceKey:
    return SequenceKey(torch.tensor(ids), tuple(ImageMark(*image) for image in images))


def states(tokens: int, layers: int = 2, marker: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV states whose value at each token is its index (plus `marker`): slices can be checked."""
    column = torch.arange(tokens, dtype=torch.float32).reshape(1, 1, tokens, 1) + marker
    return [(column.clone(), column.clone() + 0.5) for _ in range(layers)]


def test_lru_evicts_the_least_recently_used_first_and_refuses_what_cannot_fit() -> None:
    lru: ByteBudgetLru[str, int] = ByteBudgetLru(100)
    assert lru.put("a", 1, 40) and lru.put("b", 2, 40)
    assert lru.get("a") == 1  # "b" is now the least recently used
    assert lru.put("c", 3, 40)
    assert "b" not in lru and lru.get("a") == 1 and lru.get("c") == 3
    assert lru.size == 80 and lru.evictions == 1
    assert not lru.put("huge", 4, 101)
    assert "huge" not in lru and lru.size == 80
    lru.remove("a")
    assert lru.size == 40 and len(lru) == 1


def test_image_cache_counts_hits_and_misses_and_keeps_within_its_budget() -> None:
    features = torch.zeros(10, 4)  # 160 bytes
    cache = ImageFeatureCache(budget_bytes=320)
    assert cache.get(b"x") is None
    cache.put(b"x", features)
    cache.put(b"y", features)
    assert cache.get(b"x") is features
    cache.put(b"z", features)  # evicts "y", the least recently used
    assert cache.get(b"y") is None
    assert (cache.hits, cache.misses, cache.size, cache.evictions) == (1, 2, 320, 1)
    assert ImageFeatureCache(0).get(b"x") is None


def test_common_prefix_counts_image_tokens_only_under_the_same_image() -> None:
    a = key([1, 2, IMAGE, IMAGE, 3, 4], (2, 2, b"cat"))
    assert common_prefix(a, key([1, 2, IMAGE, IMAGE, 3, 5], (2, 2, b"cat"))) == 5
    # Same ids, other image: only the text before the image is shared.
    assert common_prefix(a, key([1, 2, IMAGE, IMAGE, 3, 4], (2, 2, b"dog"))) == 2
    # An image where the other has none, and texts that differ at once.
    assert common_prefix(a, key([1, 2, IMAGE, IMAGE, 3, 4])) == 2
    assert common_prefix(a, key([7, 2])) == 0
    # One sequence a prefix of the other.
    assert common_prefix(a, key([1, 2, IMAGE], (2, 2, b"cat"))) == 3


def test_prefix_cache_gives_the_longest_stored_prefix_within_the_limit() -> None:
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.store(key([1, 2, 3, 4, 5]), states(5))
    cache.store(key([1, 2, 8, 9]), states(4, marker=100))
    reused, found = cache.lookup(key([1, 2, 3, 4, 6, 7]), limit=5)
    assert reused == 4 and found is not None
    assert found[0][0].flatten().tolist() == [0, 1, 2, 3]
    # The limit wins over a longer match: at least one prompt token is always computed.
    reused, found = cache.lookup(key([1, 2, 3, 4, 5]), limit=4)
    assert reused == 4
    reused, found = cache.lookup(key([1, 2, 8, 9, 1]), limit=4)
    assert reused == 4 and found is not None and found[0][0].flatten().tolist() == [100, 101, 102, 103]
    assert cache.lookup(key([5, 5]), limit=1) == (0, None)
    assert (cache.hits, cache.misses, cache.reused_tokens) == (3, 1, 12)


def test_prefix_cache_never_reuses_states_across_images() -> None:
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.store(key([1, IMAGE, IMAGE, 2, 3], (1, 2, b"cat")), states(5))
    assert cache.lookup(key([1, IMAGE, IMAGE, 2, 3, 4], (1, 2, b"dog")), limit=5)[0] == 1
    assert cache.lookup(key([1, IMAGE, IMAGE, 2, 3, 4], (1, 2, b"cat")), limit=5)[0] == 5


def test_a_longer_sequence_replaces_the_entries_it_extends_and_the_budget_evicts() -> None:
    per_entry = sum(k.numel() * 4 + v.numel() * 4 for k, v in states(4))
    cache = PrefixCache(budget_bytes=5 * per_entry // 2)
    cache.store(key([1, 2, 3, 4]), states(4))
    cache.store(key([1, 2, 3, 4, 5, 6, 7, 8]), states(8))  # extends the first: it goes
    assert cache.size == 2 * per_entry
    cache.store(key([1, 2]), states(2))  # already inside the longer entry: nothing added
    assert cache.size == 2 * per_entry
    cache.store(key([9, 9, 9, 9]), states(4))  # over budget: the least recently used goes
    assert cache.evictions == 1 and cache.size == per_entry
    assert cache.lookup(key([1, 2, 3, 4, 5]), limit=4)[0] == 0


def test_growing_layer_gives_what_dynamic_layer_gives_and_appends_in_place() -> None:
    growing, plain = GrowingLayer(), DynamicLayer()
    generator = torch.Generator().manual_seed(0)
    for length in (5, 1, 1, MARGIN + 3, 1):
        keys = torch.randn(2, 3, length, 4, generator=generator)
        values = torch.randn(2, 3, length, 4, generator=generator)
        grown, expected = growing.update(keys, values), plain.update(keys, values)
        assert torch.equal(grown[0], expected[0]) and torch.equal(grown[1], expected[1])
    # A one-token step writes into the spare columns: the states stay where they were.
    before = growing.update(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))[0]
    after = growing.update(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))[0]
    assert after.data_ptr() == before.data_ptr()
    # States replaced from outside (as the batch does when rows leave) are taken over on the next step.
    growing.keys, growing.values = after[:1].clone(), after[:1].clone()
    length = growing.get_seq_length()
    keys, values = growing.update(torch.ones(1, 3, 1, 4), torch.ones(1, 3, 1, 4))
    assert keys.shape == (1, 3, length + 1, 4) and torch.equal(keys[:, :, -1], torch.ones(1, 3, 4))
