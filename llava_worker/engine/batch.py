"""DecodeBatch: the KV cache, attention mask and positions of every request decoding together."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llava_worker.engine.kv_layer import MARGIN, GrowingLayer, growing_layers


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    # Only caches that passed `is_mergeable` get here, so every layer is a plain DynamicLayer.
    return cast(list[DynamicLayer], cache.layers)


def is_mergeable(cache: Any) -> bool:
    """Whether rows of this cache can be joined and split along the batch (plain, unbounded layers)."""
    return isinstance(cache, DynamicCache) and all(
        type(layer) in (DynamicLayer, GrowingLayer) and cast(DynamicLayer, layer).is_initialized
        for layer in cache.layers
    )


class DecodeBatch:
    """Rows that decode in lockstep, each with its own prompt length.

    Rows are left-padded to a common cache length; the attention mask hides the padding and each row
    keeps its own position ids, so every row computes exactly what it would compute alone.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self.cache: DynamicCache | None = None
        self.attention_mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.positions: list[int] = []
        """Position id of each row's next token."""

    def __len__(self) -> int:
        return len(self.positions)

    def add(self, cache: DynamicCache, attention_mask: torch.Tensor) -> bool:
        """Adds prefilled requests: their cache and their (left-padded) mask. Returns True when
        their rows come first (their cache took in the running rows), False when they come last."""
        attention_mask = attention_mask.to(device=self._device, dtype=torch.long)
        positions = [int(length) for length in attention_mask.sum(dim=1).tolist()]
        if self.cache is None or len(self) == 0:
            self.cache, self.attention_mask, self.positions = _growing(cache), attention_mask, positions
            return False
        theirs = growing_layers(cache)
        length = self.attention_mask.shape[1]
        if theirs is not None and all(layer.can_absorb(len(self), length) for layer in theirs):
            for layer, mine in zip(theirs, _layers(self.cache), strict=True):
                layer.absorb(*_states(mine))
            self.cache = cache
            self.attention_mask = torch.cat(
                [attention_mask, _pad_left_2d(self.attention_mask, attention_mask.shape[1])]
            )
            self.positions = positions + self.positions
            return True
        total = max(length, attention_mask.shape[1])
        for mine_layer, their_layer in zip(cast(list[GrowingLayer], self.cache.layers), _layers(cache), strict=True):
            keys = _stacked(_states(mine_layer)[0], _states(their_layer)[0], total)
            values = _stacked(_states(mine_layer)[1], _states(their_layer)[1], total)
            mine_layer.adopt(keys, values, total)
        self.attention_mask = torch.cat([_pad_left_2d(self.attention_mask, total), _pad_left_2d(attention_mask, total)])
        self.positions.extend(positions)
        return False

    def reset(self) -> None:
        """Drops every row."""
        self.cache, self.positions = None, []
        self.attention_mask = self.attention_mask[:0, :0]

    def keep(self, rows: list[int]) -> None:
        """Keeps only `rows` (in that order) and drops padding columns no remaining row needs."""
        if not rows:
            self.reset()
            return
        assert self.cache is not None
        index = torch.tensor(rows, device=self._device)
        mask = self.attention_mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        first = int(used[0].item()) if used.numel() else 0
        for layer in cast(list[GrowingLayer], self.cache.layers):
            keys, values = _states(layer)
            layer.adopt(_gathered(keys, rows, first), _gathered(values, rows, first), keys.shape[2] - first)
        self.attention_mask = mask[:, first:]
        self.positions = [self.positions[row] for row in rows]

    def row_states(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The KV states of one row without its padding: per layer, (1, heads, tokens, head dim) each."""
        assert self.cache is not None
        real = self.attention_mask[row].bool()
        return [
            (keys[row : row + 1, :, real].clone(), values[row : row + 1, :, real].clone())
            for keys, values in map(_states, _layers(self.cache))
        ]

    def undo_step(self) -> None:
        """Forgets the last `step_inputs`, and whatever its forward pass wrote before it failed."""
        assert self.cache is not None
        self.attention_mask = self.attention_mask[:, :-1]
        self.positions = [position - 1 for position in self.positions]
        width = self.attention_mask.shape[1]
        for layer in _layers(self.cache):
            keys, values = _states(layer)
            if keys.shape[2] > width:
                # Views of the same buffers: the spare columns are written again by the next step.
                layer.keys, layer.values = keys[:, :, :width], values[:, :, :width]

    def step_inputs(self, last_tokens: list[int]) -> dict[str, Any]:
        """Forward arguments that feed each row's last token at its own position."""
        assert self.cache is not None
        ones = torch.ones((len(self), 1), dtype=torch.long, device=self._device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        inputs = {
            "input_ids": torch.tensor(last_tokens, device=self._device).unsqueeze(1),
            "attention_mask": self.attention_mask,
            "position_ids": torch.tensor(self.positions, device=self._device).unsqueeze(1),
            "cache": self.cache,
            "use_cache": True,
        }
        self.positions = [position + 1 for position in self.positions]
        return inputs


def _states(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None, "cache layer used before prefill"
    return layer.keys, layer.values


def _growing(cache: DynamicCache) -> DynamicCache:
    """The same states in GrowingLayers: the cache itself when it already has them."""
    if all(type(layer) is GrowingLayer for layer in cache.layers):
        return cache
    grown = DynamicCache()
    grown.layers = []
    for layer in _layers(cache):
        keys, values = _states(layer)
        growing = GrowingLayer()
        growing.adopt(keys, values, keys.shape[2])
        grown.layers.append(growing)
    return grown


def _stacked(mine: torch.Tensor, theirs: torch.Tensor, total: int) -> torch.Tensor:
    """Both row sets in one new buffer, each right-aligned to `total` columns, with spare columns after."""
    rows = mine.shape[0]
    merged = mine.new_empty((rows + theirs.shape[0], mine.shape[1], total + MARGIN, mine.shape[3]))
    for part, states in ((merged[:rows], mine), (merged[rows:], theirs)):
        length = states.shape[2]
        part[:, :, : total - length] = 0  # padding: masked, but never garbage
        part[:, :, total - length : total] = states
    return merged


def _gathered(states: torch.Tensor, rows: list[int], first: int) -> torch.Tensor:
    """`rows` of `states` from column `first` on, in one new buffer with spare columns after."""
    length = states.shape[2] - first
    kept = states.new_empty((len(rows), states.shape[1], length + MARGIN, states.shape[3]))
    for target, row in enumerate(rows):
        kept[target, :, :length] = states[row, :, first:]
    return kept


def left_padded(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch: input ids, attention mask and position ids."""
    length = max(row.shape[-1] for row in rows)
    ids = torch.stack([F.pad(row.reshape(-1), (length - row.shape[-1], 0), value=pad_id) for row in rows])
    mask = torch.stack([_pad_left_2d(torch.ones_like(row.reshape(1, -1)), length)[0] for row in rows])
    # Padding sits at positions before 0; clamping keeps the ids valid, and the mask hides them.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def _pad_left_2d(mask: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(mask, (length - mask.shape[1], 0))
