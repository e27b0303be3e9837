"""Images of a prompt one by one: where each one's tokens sit, what identifies its content, and how a
batch of them goes through the vision tower. This lets the engine run the tower once for the images of
several requests, keep features per image, and splice them into the prompt's embeddings piece by piece.

Four layouts of the tower's inputs are known; any other model has no `ImageSpan`s and the engine
runs its prompts through the model's own forward, whole.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches


class TowerLayout(enum.Enum):
    """How a model's `pixel_values` hold its images."""

    ROWS = enum.auto()
    """One row per image (LLaVA-1.5, InternVL-Chat-1.0): (images, C, H, W)."""
    VIEWS = enum.auto()
    """LLaVA-NeXT: (images, views, C, H, W), zero-padded views, with `image_sizes`."""
    TILES = enum.auto()
    """InternVL: (tiles, C, H, W), each image a run of consecutive tiles."""
    ONEVISION = enum.auto()
    """LLaVA-OneVision: as VIEWS, except that an image that shares its prompt with others is read at
    its base view only (`batch_num_images`)."""


def tower_layout(model: PreTrainedModel) -> TowerLayout | None:
    """The layout of the model's tower inputs; None for a model the engine cannot drive piecewise."""
    if isinstance(model, LlavaOnevisionForConditionalGeneration):
        return TowerLayout.ONEVISION
    if isinstance(model, LlavaNextForConditionalGeneration | LlavaNextVideoForConditionalGeneration):
        return TowerLayout.VIEWS
    if isinstance(model, LlavaForConditionalGeneration):
        return TowerLayout.ROWS
    if isinstance(model, InternVLForConditionalGeneration):
        return TowerLayout.TILES
    return None


def tower_share(model: PreTrainedModel) -> float:
    """What an image token costs in the vision tower and projector, as a share of what a prompt token
    costs in the language model (their parameter counts: the work per token is about proportional)."""
    inner: Any = model.model
    parts: list[Any] = [
        getattr(inner, name, None) for name in ("vision_tower", "multi_modal_projector", "language_model")
    ]
    if any(part is None for part in parts):
        return 1.0
    tower, projector, language = parts
    vision_parameters = sum(p.numel() for module in (tower, projector) for p in module.parameters())
    language_parameters = sum(p.numel() for p in language.parameters())
    return float(min(1.0, vision_parameters / max(language_parameters, 1)))


def image_token_id(model: PreTrainedModel) -> int | None:
    config = model.config
    value = getattr(config, "image_token_id", None)
    if value is None:
        value = getattr(config, "image_token_index", None)
    return None if value is None else int(value)


@dataclass(frozen=True)
class ImageSpan:
    """One image of a prompt: its run of image tokens and the tower inputs that fill it."""

    start: int
    """Position of its first image token in `input_ids`."""
    length: int
    """How many image tokens it fills."""
    key: bytes
    """Hash of exactly what the tower reads for it (preprocessed pixels, sizes): two spans with the
    same key get the same features, whoever sent the image and however it was encoded."""
    pixels: dict[str, torch.Tensor]
    """The tower's inputs for this image alone, on the model's device."""

    @property
    def end(self) -> int:
        return self.start + self.length


def image_spans(model: PreTrainedModel, tensors: dict[str, Any]) -> tuple[ImageSpan, ...] | None:
    """The prompt's images in order, or None when they cannot be told apart (a model of unknown
    layout, or two images with no token between them): such a prompt goes through the model whole.

    `tensors` are the processor's outputs, still on the CPU; the spans' pixels stay there too."""
    if "pixel_values_videos" in tensors:
        return None  # videos go through the model's own forward, with the prompt whole
    pixel_values = tensors.get("pixel_values")
    if pixel_values is None:
        return ()
    layout, token_id = tower_layout(model), image_token_id(model)
    if layout is None or token_id is None:
        return None
    runs = _runs(tensors["input_ids"][0], token_id)
    pieces = _pixels_per_image(model, layout, tensors, runs)
    if pieces is None:
        return None
    return tuple(
        ImageSpan(start=start, length=length, key=_content_key(pixels), pixels=pixels)
        for (start, length), pixels in zip(runs, pieces, strict=True)
    )


def encode_images(model: PreTrainedModel, layout: TowerLayout, spans: list[ImageSpan]) -> list[torch.Tensor]:
    """Projected features of each span, (length, hidden), from one pass of the vision tower (two for
    OneVision when images read whole and images read at their base view come together)."""
    if layout is TowerLayout.ONEVISION:
        return _encode_onevision(model, spans)
    return _encode(model, _batched(layout, spans), [span.length for span in spans])


def _encode(model: PreTrainedModel, inputs: dict[str, Any], lengths: list[int]) -> list[torch.Tensor]:
    inner: Any = model.model
    outputs = inner.get_image_features(**inputs, return_dict=True)
    features = outputs.pooler_output
    parts = features if isinstance(features, list | tuple) else [features]
    flat = torch.cat([part.reshape(-1, part.shape[-1]) for part in parts])
    if flat.shape[0] != sum(lengths):
        raise ValueError(f"the vision tower gave {flat.shape[0]} features for {sum(lengths)} image tokens")
    return list(torch.split(flat, lengths))


def _encode_onevision(model: PreTrainedModel, spans: list[ImageSpan]) -> list[torch.Tensor]:
    """OneVision reads an image at all its views when it is alone in its prompt, at its base view when
    it is one of several; `batch_num_images` is how the model is told, per call, so each kind gets
    its own call. A lone base-view image is sent twice (one count of 1 would mean "all views")."""
    features: list[torch.Tensor | None] = [None] * len(spans)
    for whole in (True, False):
        chosen = [index for index, span in enumerate(spans) if _reads_all_views(span) == whole]
        if not chosen:
            continue
        group = [spans[index] for index in chosen]
        if not whole and len(group) == 1:
            group = group * 2
        inputs = _batched(TowerLayout.VIEWS, group)
        if not whole:
            inputs["batch_num_images"] = torch.tensor([len(group)])
        encoded = _encode(model, inputs, [span.length for span in group])
        for index, feature in zip(chosen, encoded, strict=False):
            features[index] = feature
    return [feature for feature in features if feature is not None]


def _reads_all_views(span: ImageSpan) -> bool:
    return "base_view_only" not in span.pixels


def _runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token_id` in `ids`."""
    marks = (ids == token_id).to(torch.int8)
    edges = torch.diff(marks, prepend=marks.new_zeros(1), append=marks.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return [(start, end - start) for start, end in zip(starts, ends, strict=True)]


def _pixels_per_image(
    model: PreTrainedModel, layout: TowerLayout, tensors: dict[str, Any], runs: list[tuple[int, int]]
) -> list[dict[str, torch.Tensor]] | None:
    pixel_values: torch.Tensor = tensors["pixel_values"]
    if layout is TowerLayout.ROWS:
        if pixel_values.shape[0] != len(runs):
            return None
        return [{"pixel_values": pixel_values[index : index + 1]} for index in range(len(runs))]
    if layout in (TowerLayout.VIEWS, TowerLayout.ONEVISION):
        sizes: torch.Tensor = tensors["image_sizes"]
        if pixel_values.shape[0] != len(runs):
            return None
        if layout is TowerLayout.ONEVISION and len(runs) > 1:
            # Several images in one prompt: OneVision reads each at its base view only. The marker
            # keeps these features apart, in the caches too, from the same picture read whole.
            marker = torch.ones(1, dtype=torch.uint8)
            return [
                {
                    "pixel_values": pixel_values[index : index + 1, :1],
                    "image_sizes": size[None],
                    "base_view_only": marker,
                }
                for index, size in enumerate(sizes)
            ]
        return [
            {"pixel_values": pixel_values[index : index + 1, : _views(model, size)], "image_sizes": size[None]}
            for index, size in enumerate(sizes)
        ]
    # TILES: every tile gives the same number of tokens, so a run's share of the tokens is its share of the tiles.
    total = sum(length for _, length in runs)
    if not runs or total % pixel_values.shape[0]:
        return None
    per_tile = total // pixel_values.shape[0]
    pieces, first = [], 0
    for _, length in runs:
        if length % per_tile:
            return None
        pieces.append({"pixel_values": pixel_values[first : first + length // per_tile]})
        first += length // per_tile
    return pieces


def _views(model: PreTrainedModel, size: torch.Tensor) -> int:
    """Views LLaVA-NeXT reads for an image of `size` (the processor pads to the most in the request)."""
    config: Any = model.config
    return int(
        image_size_to_num_patches(
            image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
        )
    )


def _content_key(pixels: dict[str, torch.Tensor]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(pixels):
        value = pixels[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.digest()


def _batched(layout: TowerLayout, spans: list[ImageSpan]) -> dict[str, torch.Tensor]:
    """The tower's inputs for several images at once, as the model's own processor would lay them out."""
    if layout is TowerLayout.VIEWS:
        most = max(span.pixels["pixel_values"].shape[1] for span in spans)
        padded = [
            torch.nn.functional.pad(
                span.pixels["pixel_values"], (0, 0, 0, 0, 0, 0, 0, most - span.pixels["pixel_values"].shape[1])
            )
            for span in spans
        ]
        return {
            "pixel_values": torch.cat(padded),
            "image_sizes": torch.cat([span.pixels["image_sizes"] for span in spans]),
        }
    return {"pixel_values": torch.cat([span.pixels["pixel_values"] for span in spans])}
