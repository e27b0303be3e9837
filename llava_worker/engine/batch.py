"""DecodeBatch: the KV cache, attention mask and positions of every request decoding together."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    # Only caches that passed `is_mergeable` get here, so every layer is a plain DynamicLayer.
    return cast(list[DynamicLayer], cache.layers)


def is_mergeable(cache: Any) -> bool:
    """Whether rows of this cache can be joined and split along the batch (plain, unbounded layers)."""
    return isinstance(cache, DynamicCache) and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers
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

    def add(self, cache: DynamicCache, attention_mask: torch.Tensor) -> None:
        """Appends prefilled requests as the last rows: their cache and their (left-padded) mask."""
        attention_mask = attention_mask.to(device=self._device, dtype=torch.long)
        if self.cache is None or len(self) == 0:
            self.cache, self.attention_mask = cache, attention_mask
        else:
            total = max(self.attention_mask.shape[1], attention_mask.shape[1])
            for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
                (my_keys, my_values), (their_keys, their_values) = _states(mine), _states(theirs)
                mine.keys = torch.cat([_pad_left(my_keys, total), _pad_left(their_keys, total)])
                mine.values = torch.cat([_pad_left(my_values, total), _pad_left(their_values, total)])
            self.attention_mask = torch.cat(
                [_pad_left_2d(self.attention_mask, total), _pad_left_2d(attention_mask, total)]
            )
        self.positions.extend(int(length) for length in attention_mask.sum(dim=1).tolist())

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
        for layer in _layers(self.cache):
            keys, values = _states(layer)
            layer.keys = keys.index_select(0, index)[:, :, first:]
            layer.values = values.index_select(0, index)[:, :, first:]
        self.attention_mask = mask[:, first:]
        self.positions = [self.positions[row] for row in rows]

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


def left_padded(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch: input ids, attention mask and position ids."""
    length = max(row.shape[-1] for row in rows)
    ids = torch.stack([F.pad(row.reshape(-1), (length - row.shape[-1], 0), value=pad_id) for row in rows])
    mask = torch.stack([_pad_left_2d(torch.ones_like(row.reshape(1, -1)), length)[0] for row in rows])
    # Padding sits at positions before 0; clamping keeps the ids valid, and the mask hides them.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def _pad_left(states: torch.Tensor, length: int) -> torch.Tensor:
    """[batch, heads, seq, dim] padded with zeros at the start of `seq` up to `length`."""
    return F.pad(states, (0, 0, length - states.shape[2], 0))


def _pad_left_2d(mask: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(mask, (length - mask.shape[1], 0))
