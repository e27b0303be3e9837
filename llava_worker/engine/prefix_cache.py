"""PrefixCache: the KV state of finished sequences, so a request that starts the same way (the next
turn of a conversation, a shared system prompt) prefills only what is new."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from llava_worker.engine.lru import CountedCache

#: Per layer, (keys, values) of one sequence: (1, heads, tokens, head dim) each.
LayerStates = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ImageMark:
    """Which image fills the image tokens from `start`: its content key stands for them."""

    start: int
    length: int
    key: bytes


@dataclass(frozen=True)
class SequenceKey:
    """What a sequence's KV state depends on: its token ids, and the content of each image."""

    ids: torch.Tensor
    """1-D int64 on the CPU."""
    images: tuple[ImageMark, ...] = ()

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def extended(self, tokens: list[int]) -> SequenceKey:
        return SequenceKey(torch.cat([self.ids, torch.tensor(tokens, dtype=torch.long)]), self.images)


def common_prefix(a: SequenceKey, b: SequenceKey) -> int:
    """How many leading tokens the two sequences share, an image's tokens counting as shared only
    where both hold the same image there (its tokens carry the same id whatever the image)."""
    n = min(len(a), len(b))
    differ = (a.ids[:n] != b.ids[:n]).nonzero()
    length = int(differ[0].item()) if differ.numel() else n
    mine = {mark.start: mark for mark in a.images}
    theirs = {mark.start: mark for mark in b.images}
    for start in sorted(mine.keys() | theirs.keys()):
        if start >= length:
            break
        if mine.get(start) != theirs.get(start):
            return start
    return length


@dataclass
class _Stored:
    key: SequenceKey
    states: LayerStates


class PrefixCache(CountedCache[int, "_Stored"]):
    """Finished sequences' KV states within a byte budget, least recently used out first."""

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes)
        self._names = itertools.count()
        self.reused_tokens = 0

    def lookup(self, key: SequenceKey, limit: int) -> tuple[int, LayerStates | None]:
        """The longest stored prefix of `key`, at most `limit` tokens: its length and its states
        (cut to that length); (0, None) on a miss."""
        best, found = 0, None
        for name, stored in self._entries.items():
            shared = min(common_prefix(key, stored.key), limit)
            if shared > best:
                best, found = shared, name
        if found is None:
            self.misses += 1
            return 0, None
        chosen = self._entries.get(found)
        assert chosen is not None
        self.hits += 1
        self.reused_tokens += best
        return best, [(keys[:, :, :best], values[:, :, :best]) for keys, values in chosen.states]

    def store(self, key: SequenceKey, states: LayerStates) -> None:
        """Keeps the states of the sequence `key`; entries it extends are dropped, they add nothing."""
        for name, stored in self._entries.items():
            shared = common_prefix(key, stored.key)
            if shared == len(key):
                self._entries.get(name)  # already held by a longer entry: just mark it used
                return
            if shared == len(stored.key):
                self._entries.remove(name)
        size = sum(
            keys.numel() * keys.element_size() + values.numel() * values.element_size() for keys, values in states
        )
        self._entries.put(next(self._names), _Stored(key, states), size)
