"""PrefillGroup: the prompts of newly admitted requests, prefilled together piece by piece.

One group is one cache that later joins the decode batch. Each row may start from KV states reused
from the prefix cache; the rest of its prompt (the remainder) is what the group computes:

    columns:  [ prefixes, left-padded to P ][ remainders, left-aligned, R wide ]
    row 0:     0 0 0 p p p p                  r r r r r . .
    row 1:     p p p p p p p                  r r . . . . .

Rows shorter than R leave holes at the end of the remainder region; the attention mask hides holes
and padding, and every token gets its own position, so each row computes what it would alone.

The work comes in pieces the engine interleaves with decode steps: first the vision tower for the
images not yet cached (several images in one pass), then chunks of remainder columns. A chunk that
holds image tokens is fed as embeddings with the image features spliced in; otherwise as token ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch

from llava_worker.engine.image_cache import ImageFeatureCache
from llava_worker.engine.kv_layer import MARGIN, GrowingLayer, growing_cache
from llava_worker.engine.prefix_cache import LayerStates
from llava_worker.models.vision import ImageSpan, TowerLayout, encode_images


@dataclass
class PrefillRow:
    """One request's prompt, as the group sees it."""

    ids: torch.Tensor
    """The whole prompt's token ids, 1-D, on the model's device."""
    images: tuple[ImageSpan, ...]
    reused: int = 0
    """Leading tokens whose KV states come from the prefix cache."""
    prefix: LayerStates | None = None

    @property
    def remainder(self) -> int:
        return int(self.ids.shape[0]) - self.reused

    def images_to_compute(self) -> list[ImageSpan]:
        """Images with tokens in the remainder (those wholly inside the prefix need no features)."""
        return [span for span in self.images if span.end > self.reused]


class PrefillGroup:
    """Prefills `rows` together; `step` does the next piece of work, `finished` says when it is all done."""

    def __init__(
        self,
        model: Any,
        layout: TowerLayout | None,
        rows: list[PrefillRow],
        pad_id: int,
        image_cache: ImageFeatureCache,
        spare_rows: int = 0,
        tower_share: float = 1.0,
    ) -> None:
        self._model = model
        self._layout = layout
        self.rows = rows
        self._image_cache = image_cache
        self._tower_share = tower_share
        """An image token's tower cost in prompt tokens (the budget counts prompt tokens)."""
        device = rows[0].ids.device
        self._prefix_width = max(row.reused for row in rows)
        self._width = max(row.remainder for row in rows)
        # Room for the whole prompt and some decode steps: no copy while the group prefills.
        # and rows for the requests decoding now, which join this cache when it is done (see kv_layer).
        self._spare_rows = spare_rows
        self.cache = growing_cache(
            model.config, planned=self._prefix_width + self._width + MARGIN, spare_rows=spare_rows
        )
        self.attention_mask = torch.zeros(
            (len(rows), self._prefix_width + self._width), dtype=torch.long, device=device
        )
        self._ids = torch.full((len(rows), self._width), pad_id, dtype=torch.long, device=device)
        self._positions = torch.zeros((len(rows), self._width), dtype=torch.long, device=device)
        for index, row in enumerate(rows):
            self.attention_mask[index, self._prefix_width - row.reused : self._prefix_width + row.remainder] = 1
            self._ids[index, : row.remainder] = row.ids[row.reused :]
            # Holes repeat the row's last position: always a valid position, and masked anyway.
            self._positions[index] = (row.reused + torch.arange(self._width, device=device)).clamp(
                max=row.reused + row.remainder - 1
            )
        self._load_prefixes()
        self._features: dict[bytes, torch.Tensor] = {}
        self._pending: list[ImageSpan] = self._images_to_encode()
        self._done = 0
        """Remainder columns computed so far."""
        self.first_logits: torch.Tensor | None = None
        """Each row's logits for its first new token, (rows, vocab), once the group is finished."""

    @property
    def finished(self) -> bool:
        return self._done == self._width

    def step(self, budget: int | None, first: bool) -> int:
        """Runs the next piece within `budget` tokens (None: everything left, in one piece each for the
        tower and the language model); `first` lets one piece exceed the budget when nothing smaller
        exists. Returns the tokens the piece took; 0 when nothing fitted."""
        if self._pending:
            return self._encode_images(budget, first)
        return self._chunk(budget, first)

    def _encode_images(self, budget: int | None, first: bool) -> int:
        assert self._layout is not None
        batch: list[ImageSpan] = []
        cost = 0
        for span in self._pending:
            span_cost = max(1, math.ceil(span.length * self._tower_share))
            if budget is not None and batch and cost + span_cost > budget:
                break
            batch.append(span)
            cost += span_cost
        if budget is not None and cost > budget and not first:
            return 0
        for span, features in zip(batch, encode_images(self._model, self._layout, batch), strict=True):
            self._features[span.key] = features
            self._image_cache.put(span.key, features)
        self._pending = self._pending[len(batch) :]
        return cost

    def _chunk(self, budget: int | None, first: bool) -> int:
        rows = len(self.rows)
        columns = self._width - self._done
        if budget is not None:
            if budget < rows and not first:
                return 0
            columns = min(columns, max(1, budget // rows))
        start, end = self._done, self._done + columns
        # Each row's last prompt token gives its first new token: keep the logits there when it is in this chunk.
        last = [row.remainder - 1 for row in self.rows]
        keep = torch.tensor([[min(max(p - start, 0), columns - 1)] for p in last], device=self._ids.device)
        inputs = self._embeds(start, end)
        output = self._model(
            **inputs,
            attention_mask=self.attention_mask[:, : self._prefix_width + end],
            position_ids=self._positions[:, start:end],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        logits = output.logits[:, -1, :]
        ending = torch.tensor([start <= p < end for p in last], device=logits.device)
        if self.first_logits is None:
            self.first_logits = torch.zeros_like(logits)
        self.first_logits[ending] = logits[ending]
        self._done = end
        # Zero the spare rows in step with the prefill, so the join finds their memory ready.
        zeroed = (self._prefix_width + self._width) * end // self._width
        for layer in cast(list[GrowingLayer], self.cache.layers):
            layer.zero_spare_rows(zeroed)
        if self.finished:
            self._features.clear()
        return rows * columns

    def _embeds(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """The chunk's inputs: token ids, or embeddings when image tokens fall inside it."""
        ids = self._ids[:, start:end]
        overlapping = [
            (index, span)
            for index, row in enumerate(self.rows)
            for span in row.images_to_compute()
            if span.start - row.reused < end and span.end - row.reused > start
        ]
        if not overlapping:
            return {"input_ids": ids}
        embeds = self._model.get_input_embeddings()(ids)
        for index, span in overlapping:
            offset = span.start - self.rows[index].reused
            first, last = max(start, offset), min(end, offset + span.length)
            features = self._features[span.key]
            embeds[index, first - start : last - start] = features[first - offset : last - offset].to(embeds.dtype)
        return {"inputs_embeds": embeds}

    def _images_to_encode(self) -> list[ImageSpan]:
        """Unique images the remainders need, minus those the feature cache already holds."""
        pending: dict[bytes, ImageSpan] = {}
        for row in self.rows:
            for span in row.images_to_compute():
                if span.key in self._features or span.key in pending:
                    continue
                cached = self._image_cache.get(span.key)
                if cached is None:
                    pending[span.key] = span
                else:
                    self._features[span.key] = cached
        return list(pending.values())

    def _load_prefixes(self) -> None:
        """Seeds the cache with the reused states, each row right-aligned in the prefix columns."""
        if self._prefix_width == 0:
            return
        reference = next(row.prefix for row in self.rows if row.prefix is not None)
        spare = self._width + MARGIN
        # Only plain caches are prefilled piecewise (the engine checks), so every layer is a GrowingLayer.
        for index, layer in enumerate(cast(list[GrowingLayer], self.cache.layers)):
            keys, values = (self._seeded(reference[index][part], index, part, spare) for part in (0, 1))
            layer.adopt(keys, values, self._prefix_width, rows=len(self.rows))

    def _seeded(self, like: torch.Tensor, layer: int, part: int, spare: int) -> torch.Tensor:
        rows = len(self.rows) + self._spare_rows
        shape = (rows, like.shape[1], self._prefix_width + spare, like.shape[3])
        # Only the prefix columns of the group's rows are zeroed now: touching fresh memory is slow,
        # the chunks write the other columns and the spare rows are zeroed along the way.
        buffer = like.new_empty(shape)
        buffer[: len(self.rows), :, : self._prefix_width] = 0
        for index, row in enumerate(self.rows):
            if row.prefix is not None:
                buffer[index, :, self._prefix_width - row.reused : self._prefix_width] = row.prefix[layer][part][0]
        return buffer
