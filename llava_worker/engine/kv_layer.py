"""GrowingLayer: a KV cache layer that appends in place.

transformers' DynamicLayer appends by concatenation, which copies every state of every row at each
decode step: on a batch of long image prompts that copy costs as much as the step's arithmetic. This
layer keeps its states at the start of a larger buffer and writes new ones into the spare columns,
so a step copies only what it adds; the buffer grows by a margin when full.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: Spare columns a buffer gets when it is (re)allocated: how many decode steps run without a copy.
MARGIN = 128


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `keys` and `values` are views of the first columns of larger buffers."""

    def __init__(self, planned: int = 0) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.planned = planned
        """Columns the first buffer gets at least (a prefill that knows its length asks for it)."""
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
        self._key_buffer[:, :, length:needed] = key_states
        self._value_buffer[:, :, length:needed] = value_states
        self.keys, self.values = self._key_buffer[:, :, :needed], self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int, spare: int = MARGIN) -> None:
        """Takes the first `length` columns of `keys`/`values` as this layer's states; buffers with
        at least `spare` more columns are used as they are, smaller ones are copied into new ones."""
        if keys.shape[2] < length + spare or not keys.is_contiguous() or not values.is_contiguous():
            shape = (keys.shape[0], keys.shape[1], length + spare, keys.shape[3])
            key_buffer, value_buffer = keys.new_empty(shape), values.new_empty(shape)
            key_buffer[:, :, :length] = keys[:, :, :length]
            value_buffer[:, :, :length] = values[:, :, :length]
            keys, values = key_buffer, value_buffer
        self._key_buffer, self._value_buffer = keys, values
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True
        self.device = keys.device

    def _fits(self, needed: int, key_states: torch.Tensor) -> bool:
        """Whether `keys` is still the view of our buffer (nobody replaced it) with room for `needed`."""
        buffer = self._key_buffer
        return (
            buffer is not None
            and self.keys is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.shape[0] == buffer.shape[0] == key_states.shape[0]
            and buffer.shape[2] >= needed
        )

    def _current(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        if self.keys.numel() == 0:  # fresh from lazy_initialization
            empty = (*key_states.shape[:2], 0, *key_states.shape[3:])
            return key_states.new_empty(empty), value_states.new_empty(empty)
        return self.keys, self.values


def growing_cache(config: Any, planned: int = 0) -> DynamicCache:
    """A DynamicCache for `config` made of GrowingLayers (the caller checked its layers are plain)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(planned) for _ in cache.layers]
    return cache


def is_growing(layer: Any) -> bool:
    return type(layer) is GrowingLayer
