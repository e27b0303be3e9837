"""GrowingLayer: a KV cache layer that appends in place.

transformers' DynamicLayer appends by concatenation, which copies every state of every row at each
decode step: on a batch of long image prompts that copy costs as much as the step's arithmetic. This
layer keeps its states in the first rows and columns of larger buffers and writes new ones into the
spare columns, so a step copies only what it adds; the buffers grow by a margin when full.

A prefill group's layers also keep spare rows for the requests already decoding: when the group
joins them, their (shorter) states are copied into those rows instead of both being copied into new
memory. Fresh memory is slow to touch (page faults), so the group zeroes those rows bit by bit while
it prefills (`zero_spare_rows`), and the join itself only copies.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: Spare columns a buffer gets when it is (re)allocated: how many decode steps run without a copy.
MARGIN = 128


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `keys` and `values` are views of the first rows and columns of buffers."""

    def __init__(self, planned: int = 0, spare_rows: int = 0) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.planned = planned
        """Columns the first buffer gets at least (a prefill that knows its length asks for it)."""
        self.spare_rows = spare_rows
        """Rows beyond its own that a newly allocated buffer gets (see `absorb`)."""
        self._zeroed = 0
        """Columns of the spare rows zeroed so far."""
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not self._fits(needed, key_states):
            spare = max(needed - length + MARGIN, self.planned - length)
            self.adopt(*self._current(key_states, value_states), length, spare=spare)
        assert self._key_buffer is not None and self._value_buffer is not None
        rows = key_states.shape[0]
        self._key_buffer[:rows, :, length:needed] = key_states
        self._value_buffer[:rows, :, length:needed] = value_states
        self.keys, self.values = self._key_buffer[:rows, :, :needed], self._value_buffer[:rows, :, :needed]
        return self.keys, self.values

    def adopt(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        length: int,
        spare: int = MARGIN,
        rows: int | None = None,
    ) -> None:
        """Takes the first `rows` rows (all by default) and `length` columns of `keys`/`values` as this
        layer's states. With `rows`, the buffers are used as they are and their other rows are spare
        rows (zeroed later, see `zero_spare_rows`). Otherwise buffers with at least `spare` more columns
        are used as they are; smaller ones are copied into new ones, with `spare_rows` more rows."""
        if rows is not None:
            self._key_buffer, self._value_buffer, self._zeroed = keys, values, 0
            keys, values = keys[:rows], values[:rows]
        elif keys.shape[2] < length + spare or not keys.is_contiguous() or not values.is_contiguous():
            rows = keys.shape[0]
            shape = (rows + self.spare_rows, keys.shape[1], length + spare, keys.shape[3])
            key_buffer, value_buffer = keys.new_empty(shape), values.new_empty(shape)
            key_buffer[:rows, :, :length] = keys[:, :, :length]
            value_buffer[:rows, :, :length] = values[:, :, :length]
            self._key_buffer, self._value_buffer, self._zeroed = key_buffer, value_buffer, 0
            keys, values = key_buffer[:rows], value_buffer[:rows]
        else:
            self._key_buffer, self._value_buffer = keys, values
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True
        self.device = keys.device

    def zero_spare_rows(self, columns: int) -> None:
        """Zeroes the spare rows up to `columns` (a piece at a time, while the prefill runs)."""
        if self._key_buffer is None or self.keys is None:
            return
        rows, columns = self.keys.shape[0], min(columns, self._key_buffer.shape[2])
        if columns > self._zeroed:
            self._key_buffer[rows:, :, self._zeroed : columns] = 0
            self._value_buffer[rows:, :, self._zeroed : columns] = 0  # type: ignore[index]
            self._zeroed = columns

    def can_absorb(self, rows: int, length: int) -> bool:
        """Whether `rows` rows of `length` columns fit in the spare rows, right-aligned to our length."""
        buffer, keys = self._key_buffer, self.keys
        return (
            buffer is not None
            and keys is not None
            and keys.data_ptr() == buffer.data_ptr()
            and buffer.shape[0] - keys.shape[0] >= rows
            and keys.shape[2] >= length
        )

    def absorb(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Appends the rows of `keys`/`values` after ours, right-aligned to our length, zero-padded."""
        assert self._key_buffer is not None and self._value_buffer is not None and self.keys is not None
        mine, length = self.keys.shape[0], self.keys.shape[2]
        self.zero_spare_rows(length - keys.shape[2])
        rows = slice(mine, mine + keys.shape[0])
        self._key_buffer[rows, :, length - keys.shape[2] : length] = keys
        self._value_buffer[rows, :, length - keys.shape[2] : length] = values
        total = mine + keys.shape[0]
        self.keys, self.values = self._key_buffer[:total, :, :length], self._value_buffer[:total, :, :length]
        self.spare_rows = 0

    def _fits(self, needed: int, key_states: torch.Tensor) -> bool:
        """Whether `keys` is still the view of our buffer (nobody replaced it) with room for `needed`."""
        buffer, keys = self._key_buffer, self.keys
        return (
            buffer is not None
            and keys is not None
            and keys.data_ptr() == buffer.data_ptr()
            and keys.shape[0] == key_states.shape[0] <= buffer.shape[0]
            and buffer.shape[2] >= needed
        )

    def _current(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        if self.keys.numel() == 0:  # fresh from lazy_initialization
            empty = (*key_states.shape[:2], 0, *key_states.shape[3:])
            return key_states.new_empty(empty), value_states.new_empty(empty)
        return self.keys, self.values


def growing_cache(config: Any, planned: int = 0, spare_rows: int = 0) -> DynamicCache:
    """A DynamicCache for `config` made of GrowingLayers (the caller checked its layers are plain)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(planned, spare_rows) for _ in cache.layers]
    return cache


def growing_layers(cache: DynamicCache) -> list[GrowingLayer] | None:
    """The cache's layers when they are all GrowingLayers, else None."""
    layers = cache.layers
    if all(type(layer) is GrowingLayer for layer in layers):
        return [layer for layer in layers if isinstance(layer, GrowingLayer)]
    return None
