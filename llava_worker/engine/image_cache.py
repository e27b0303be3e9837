"""ImageFeatureCache: projected image features by the content of the image, so the vision tower runs
once per image however many turns or clients send it."""

from __future__ import annotations

import torch

from llava_worker.engine.lru import CountedCache


class ImageFeatureCache(CountedCache[bytes, torch.Tensor]):
    """Features (image tokens, hidden) keyed by `ImageSpan.key`, least recently used out first."""

    def get(self, key: bytes) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
        else:
            self.hits += 1
        return features

    def put(self, key: bytes, features: torch.Tensor) -> None:
        self._entries.put(key, features, features.numel() * features.element_size())
