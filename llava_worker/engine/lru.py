"""ByteBudgetLru: entries kept in least-recently-used order within a budget of bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


@dataclass
class _Entry(Generic[Value]):
    value: Value
    size: int


class ByteBudgetLru(Generic[Key, Value]):
    """A mapping that never holds more than `budget` bytes: adding an entry evicts the least recently
    used ones first, and an entry larger than the whole budget is not kept at all.

    Used from the engine thread only; readers on other threads look at `size` and the counters, which
    are plain ints."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        """Bytes held now."""
        self.evictions = 0
        self._entries: OrderedDict[Key, _Entry[Value]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def get(self, key: Key) -> Value | None:
        """The value, now the most recently used; None when absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: Key, value: Value, size: int) -> bool:
        """Keeps `value` as the most recently used entry; False when it alone exceeds the budget."""
        self.remove(key)
        if size > self.budget:
            return False
        while self._entries and self.size + size > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.size -= evicted.size
            self.evictions += 1
        self._entries[key] = _Entry(value, size)
        self.size += size
        return True

    def remove(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= entry.size

    def items(self) -> Iterator[tuple[Key, Value]]:
        """Entries from the least to the most recently used, without touching their order."""
        return ((key, entry.value) for key, entry in list(self._entries.items()))


class CountedCache(Generic[Key, Value]):
    """A cache over a ByteBudgetLru with the figures `/metrics` reads: hits, misses, bytes, evictions."""

    def __init__(self, budget_bytes: int) -> None:
        self._entries: ByteBudgetLru[Key, Value] = ByteBudgetLru(budget_bytes)
        self.hits = 0
        self.misses = 0

    @property
    def budget(self) -> int:
        return self._entries.budget

    @property
    def size(self) -> int:
        """Bytes held now."""
        return self._entries.size

    @property
    def evictions(self) -> int:
        return self._entries.evictions
