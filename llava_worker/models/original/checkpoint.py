"""Checkpoints in the original LLaVA layout (haotian-liu/LLaVA): recognising them, reading their
fields, refusing what transformers cannot represent, and the equivalent transformers config."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from transformers import (
    CONFIG_MAPPING,
    LlavaConfig,
    LlavaNextConfig,
    PretrainedConfig,
)

from llava_worker.errors import StartupError
from llava_worker.models.files import has_weights
from llava_worker.models.original.towers import VisionTower

#: The original's language-model families by `model_type`; plain "llava" is what some liuhaotian
#: repos wrote for their Llama models.
_LANGUAGE_BY_MODEL_TYPE = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral"}
_LANGUAGE_BY_ARCHITECTURE = {
    "llavallamaforcausallm": "llama",
    "llavamistralforcausallm": "mistral",
    "llavamptforcausallm": "mpt",
}
#: Fields only the original's multimodal code reads; a config with one of them is a LLaVA config.
_MULTIMODAL_FIELDS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")
#: Fields of the original config that are not language-model settings.
_NON_LANGUAGE_PREFIXES = ("mm_", "image_", "tokenizer_", "tune_", "freeze_", "unfreeze_", "use_mm_", "s2")
_NON_LANGUAGE_FIELDS = {"model_type", "architectures", "transformers_version", "vision_tower", "mm_resampler_type"}
_PROJECTOR_PATTERN = re.compile(r"^(linear|identity|mlp(\d+)x_gelu)$")

#: What the original adds to every LLaVA tokenizer (mm_use_im_patch_token, mm_use_im_start_end).
IMAGE_PATCH_TOKEN = "<im_patch>"
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"


class Layout(Enum):
    """How the checkpoint's weights are split between its directory and `--model-base`."""

    FULL = "full"
    LORA = "LoRA"
    PROJECTOR_ONLY = "projector-only"


def is_original_config(raw: Mapping[str, Any]) -> bool:
    """Whether a raw `config.json` is the original's: no sub-configs, and multimodal fields or an
    original architecture name (spelled `LLava...` in some repos, hence the lower-casing)."""
    if "text_config" in raw or "vision_config" in raw:
        return False
    architectures = [str(name).lower() for name in raw.get("architectures") or []]
    return any(field in raw for field in _MULTIMODAL_FIELDS) or any(
        name in _LANGUAGE_BY_ARCHITECTURE for name in architectures
    )


@dataclass(frozen=True)
class OriginalCheckpoint:
    """The settings of an original-format checkpoint that decide how it is built and fed."""

    directory: Path
    raw: Mapping[str, Any]
    layout: Layout
    language: str
    """`llama` or `mistral`: the transformers model type of the language model."""
    vision_tower: str
    """Hub id or directory of the vision tower: CLIP, or InternViT-6B for InternVL-Chat-1.0."""
    ships_vision_tower: bool
    """The checkpoint's own tower weights replace the tower's (`unfreeze_mm_vision_tower`)."""
    projector_type: str
    select_layer: int
    keeps_cls: bool
    """`mm_vision_select_feature` `cls_patch`: the CLS embedding is an image token too."""
    anyres: bool
    """`anyres` + `spatial_unpad` (LLaVA-1.6); otherwise one square view per image."""
    pads_to_square: bool
    """`image_aspect_ratio` `pad`; otherwise the tower's own resize and centre crop."""
    grid_pinpoints_hw: list[list[int]]
    """The anyres resolutions as (height, width), the order transformers reads them in."""
    use_im_start_end: bool
    use_im_patch_token: bool

    @property
    def added_tokens(self) -> list[str]:
        """Tokens the original adds to the tokenizer at load time, in its order."""
        tokens = [IMAGE_PATCH_TOKEN] if self.use_im_patch_token else []
        if self.use_im_start_end:
            tokens += [IMAGE_START_TOKEN, IMAGE_END_TOKEN]
        return tokens


def describe_checkpoint(directory: Path, raw: Mapping[str, Any], vision_tower: str | None) -> OriginalCheckpoint:
    """Reads an original-format checkpoint's settings, refusing every layout that transformers'
    Llava and LlavaNext classes cannot reproduce exactly; each refusal names the field and value."""
    name = directory.name
    _refuse_onevision(raw, name)
    language = _language_of(raw, name)
    for field in ("s2", "mm_resampler_type"):
        if raw.get(field):
            raise StartupError(f"{name}: {field} = {raw[field]!r} (S2 / resampler towers) cannot be served")

    tower = vision_tower or raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not tower:
        raise StartupError(f"{name}: config.json names no mm_vision_tower; give one with --vision-tower")
    projector_type = str(raw.get("mm_projector_type", "linear"))
    if not _PROJECTOR_PATTERN.match(projector_type):
        raise StartupError(f"{name}: mm_projector_type = {projector_type!r} cannot be served")
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise StartupError(f"{name}: mm_vision_select_feature = {select_feature!r} cannot be served")
    aspect = raw.get("image_aspect_ratio")
    anyres = _is_anyres(raw, name, select_feature)
    pinpoints = _grid_pinpoints(raw, name) if anyres else []

    return OriginalCheckpoint(
        directory=directory,
        raw=raw,
        layout=_layout_of(directory),
        language=language,
        vision_tower=str(tower),
        ships_vision_tower=bool(raw.get("unfreeze_mm_vision_tower", False)),
        projector_type=projector_type,
        select_layer=int(raw.get("mm_vision_select_layer", -1)),
        keeps_cls=select_feature == "cls_patch",
        anyres=anyres,
        pads_to_square=aspect == "pad",
        grid_pinpoints_hw=[[height, width] for width, height in pinpoints],
        use_im_start_end=bool(raw.get("mm_use_im_start_end", False)),
        use_im_patch_token=bool(raw.get("mm_use_im_patch_token", True)),
    )


def language_config(raw: Mapping[str, Any], language: str) -> PretrainedConfig:
    """The language model's transformers config, from the fields the original config shares with it."""
    fields = {
        key: value
        for key, value in raw.items()
        if key not in _NON_LANGUAGE_FIELDS and not key.startswith(_NON_LANGUAGE_PREFIXES) and not key.startswith("_")
    }
    config: PretrainedConfig = CONFIG_MAPPING[language](**fields)
    return config


def llava_config(
    checkpoint: OriginalCheckpoint, text_config: PretrainedConfig, tower: VisionTower, image_token_id: int
) -> LlavaConfig | LlavaNextConfig:
    """The transformers config of the equivalent model: LlavaNext for anyres, Llava otherwise."""
    patches = tower.patches_per_side**2
    fields: dict[str, Any] = {
        "vision_config": tower.config,
        "text_config": text_config,
        "image_token_index": image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": checkpoint.select_layer,
        "vision_feature_select_strategy": "full" if checkpoint.keeps_cls else "default",
        "image_seq_length": patches + (1 if checkpoint.keeps_cls else 0),
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
    }
    if checkpoint.anyres:
        return LlavaNextConfig(**fields, image_grid_pinpoints=checkpoint.grid_pinpoints_hw)
    return LlavaConfig(**fields)


def _layout_of(directory: Path) -> Layout:
    """Decided by the files: an adapter is a LoRA; a projector without model weights is projector-only."""
    if (directory / "adapter_config.json").is_file():
        return Layout.LORA
    if (directory / "mm_projector.bin").is_file() and not has_weights(directory):
        return Layout.PROJECTOR_ONLY
    return Layout.FULL


def _is_anyres(raw: Mapping[str, Any], name: str, select_feature: str) -> bool:
    """Whether images are tiled LLaVA-1.6 style; refuses the tilings transformers has no equivalent of."""
    aspect = raw.get("image_aspect_ratio")
    merge = raw.get("mm_patch_merge_type", "flat")
    anyres = aspect == "anyres"
    if anyres and merge != "spatial_unpad":
        raise StartupError(
            f"{name}: image_aspect_ratio 'anyres' with mm_patch_merge_type = {merge!r} cannot be served "
            "(only 'spatial_unpad', the LLaVA-1.6 layout, has a transformers equivalent)"
        )
    if isinstance(aspect, str) and aspect.startswith("anyres") and not anyres:
        raise StartupError(f"{name}: image_aspect_ratio = {aspect!r} cannot be served")
    if not anyres and merge != "flat":
        raise StartupError(
            f"{name}: mm_patch_merge_type = {merge!r} needs image_aspect_ratio 'anyres', "
            f"but image_aspect_ratio is {aspect!r}"
        )
    if anyres and select_feature != "patch":
        raise StartupError(f"{name}: image_aspect_ratio 'anyres' with mm_vision_select_feature = 'cls_patch'")
    return anyres


def _refuse_onevision(raw: Mapping[str, Any], name: str) -> None:
    """LLaVA-OneVision in the original layout (`llava_qwen`, `anyres_max_N`) is served through its
    transformers port: no mapping of the original's weights and tiling onto transformers' OneVision
    class has been checked against an independent reference yet, so the refusal says where to go."""
    aspect = str(raw.get("image_aspect_ratio") or "")
    architectures = [str(arch).lower() for arch in raw.get("architectures") or []]
    if (
        raw.get("model_type") == "llava_qwen"
        or "llavaqwenforcausallm" in architectures
        or aspect.startswith("anyres_max")
    ):
        raise StartupError(
            f"{name} is a LLaVA-OneVision checkpoint in the original layout (model_type = "
            f"{raw.get('model_type')!r}, image_aspect_ratio = {aspect or None!r}), which the worker does not "
            "load; serve its transformers port instead, e.g. --model-path "
            "llava-hf/llava-onevision-qwen2-7b-ov-hf (for lmms-lab/llava-onevision-qwen2-7b-ov)"
        )


def _language_of(raw: Mapping[str, Any], name: str) -> str:
    model_type = str(raw.get("model_type", ""))
    architectures = [str(arch).lower() for arch in raw.get("architectures") or []]
    by_architecture = [_LANGUAGE_BY_ARCHITECTURE[arch] for arch in architectures if arch in _LANGUAGE_BY_ARCHITECTURE]
    # The architecture is the more specific of the two: a plain "llava" model type says nothing more.
    language = by_architecture[0] if by_architecture else _LANGUAGE_BY_MODEL_TYPE.get(model_type)
    if model_type == "llava_mpt" or language == "mpt":
        raise StartupError(f"{name}: model_type = {model_type!r} (LLaVA on MPT) cannot be served")
    if language is None:
        raise StartupError(f"{name}: model_type = {model_type!r} is not a LLaVA language model the worker knows")
    return language


def _grid_pinpoints(raw: Mapping[str, Any], name: str) -> list[tuple[int, int]]:
    value = raw.get("image_grid_pinpoints")
    if isinstance(value, str):
        # Some configs store the list as its Python text, which the original parses the same way.
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise StartupError(f"{name}: image_grid_pinpoints = {value!r} is not a list of sizes") from None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in value)
    ):
        raise StartupError(f"{name}: image_grid_pinpoints = {value!r} is not a list of (width, height) sizes")
    return [(int(width), int(height)) for width, height in value]
