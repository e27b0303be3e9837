"""The vision towers original-format checkpoints name: CLIP (haotian-liu/LLaVA) and InternViT-6B
(InternVL-Chat-1.0), each made into its transformers config, weights and image processor.

A tower's config is always read as JSON first: InternViT's names remote code, and reading it through
AutoConfig would ask for `trust_remote_code` (on a terminal, with an interactive prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    InternVLVisionConfig,
    InternVLVisionModel,
)
from transformers.image_utils import PILImageResampling

from llava_worker.errors import StartupError, plural
from llava_worker.models.files import local_directory, looks_local, one_line, read_raw_config, read_weights

TowerKind = Literal["clip", "internvit"]

#: InternVL's copy of the worker tells towers apart by these substrings of the tower's name, in this
#: order (its clip_encoder.py); the EVA test is a plain substring test, hence "eva" in any case. Here
#: they only name the towers whose config cannot say (or refuse what it cannot serve).
_EVA_NAMES = ("EVA", "eva")
_INTERNVIT_6B_NAMES = ("intern_vit_6b", "internvit_6b", "InternViT-6B", "internvit6b")
_INTERNVL_14B_NAMES = ("internvl_14b", "intern_vl_14b", "InternVL-14B", "internvl14b")
_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
#: The preprocessing InternVL's copy builds in code for InternViT-6B (its repo's preprocessor
#: config is not read): ImageNet statistics, and a crop of 448 for 448 px towers, 336 otherwise.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionTower:
    """A tower as the equivalent transformers model sees it, and how images are prepared for it."""

    source: str
    """Hub id or directory: `mm_vision_tower`, or `--vision-tower`."""
    kind: TowerKind
    config: Any
    """CLIPVisionConfig, or InternVLVisionConfig (which expresses InternViT-6B exactly)."""
    crop_size: int
    """The side, in pixels, of the square each image (or anyres tile) is prepared at."""
    patch_size: int

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def patches_per_side(self) -> int:
        return self.crop_size // self.patch_size

    def image_processor(self) -> CLIPImageProcessorPil:
        """The PIL image processor: the one that reproduces the original's pixels exactly."""
        if self.kind == "internvit":
            side = self.crop_size
            return CLIPImageProcessorPil(
                size={"shortest_edge": side},
                crop_size={"height": side, "width": side},
                resample=PILImageResampling.BICUBIC,
                image_mean=list(_IMAGENET_MEAN),
                image_std=list(_IMAGENET_STD),
            )
        try:
            processor: CLIPImageProcessorPil = CLIPImageProcessorPil.from_pretrained(self.source)
        except Exception as exc:  # hub and parsing errors come in many types; all mean "unusable"
            raise StartupError(
                f"the vision tower {self.source} has no usable image processor: {one_line(exc)}"
            ) from exc
        return processor

    def weights(self, shipped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tower's weights under the Llava model's names (`model.vision_tower.…`): the tower's own,
        with those the checkpoint ships (`unfreeze_mm_vision_tower`, already without their prefix) on top.

        Refuses to start when any weight the model needs is missing, naming one.
        """
        expected = self._expected_keys()
        weights: dict[str, torch.Tensor] = {}
        if not expected <= set(self._renamed(shipped)):
            weights = self._renamed(read_weights(local_directory(self.source, "the vision tower")))
        weights.update(self._renamed(shipped))
        absent = expected - set(weights)
        if absent:
            what = "CLIP weight" if self.kind == "clip" else "InternViT weight"
            raise StartupError(f"the vision tower {self.source} lacks {plural(len(absent), what)}, e.g. {min(absent)}")
        return {f"model.vision_tower.{key}": value for key, value in weights.items() if key in expected}

    def _expected_keys(self) -> set[str]:
        with torch.device("meta"):
            model: nn.Module = CLIPVisionModel(self.config) if self.kind == "clip" else InternVLVisionModel(self.config)
        return set(model.state_dict())

    def _renamed(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kind == "internvit":
            return internvit_to_transformers(weights)
        # A full CLIP checkpoint names its vision half vision_model.*; a CLIPVisionModel's own save may not.
        return {key.removeprefix("vision_model."): value for key, value in weights.items()}


def describe_tower(source: str) -> VisionTower:
    """The tower named by `mm_vision_tower` (or `--vision-tower`), refused with a message naming the
    field and value when transformers cannot reproduce it (EVA-CLIP, InternVL-14B, anything else)."""
    if looks_local(source) and not Path(source).expanduser().is_dir():
        raise StartupError(
            f"the vision tower {source} does not exist (mm_vision_tower in config.json; "
            "point --vision-tower at a local copy)"
        )
    raw, unreadable = _raw_config(source)
    kind = tower_kind(source, raw)
    if unreadable is not None:
        raise unreadable
    if kind == "internvit":
        assert raw is not None
        internvit = internvit_config(raw, source)
        side = 448 if "448" in _tower_name(source) else 336
        return VisionTower(source, kind, internvit, crop_size=side, patch_size=_square(internvit.patch_size, source))
    clip = _clip_config(source)
    return VisionTower(
        source, kind, clip, crop_size=_square(clip.image_size, source), patch_size=_square(clip.patch_size, source)
    )


def tower_kind(source: str, raw: dict[str, Any] | None) -> TowerKind:
    """CLIP or InternViT-6B, decided by the tower's config (`raw`, None when it cannot be read); the
    names InternVL's copy of the worker gives EVA-CLIP and InternVL-14B towers are refused, as is any
    other kind of model."""
    model_type = str((raw or {}).get("model_type", ""))
    name = _tower_name(source)
    if model_type in _CLIP_MODEL_TYPES:
        return "clip"
    if model_type == "intern_vit_6b":
        return "internvit"
    if any(part in name for part in _EVA_NAMES):
        raise StartupError(
            f"mm_vision_tower = {source!r} is an EVA-CLIP tower, which the worker cannot serve "
            "(no released InternVL-Chat checkpoint uses one)"
        )
    if any(part in name for part in _INTERNVL_14B_NAMES):
        raise StartupError(
            f"mm_vision_tower = {source!r} is an InternVL-14B tower (QLLaMA queries), which the worker "
            "cannot serve (no released InternVL-Chat checkpoint uses one)"
        )
    if raw is not None and model_type:
        raise StartupError(
            f"the vision tower {source} is a {model_type!r} model (mm_vision_tower in config.json); original "
            "LLaVA checkpoints use CLIP, InternVL-Chat-1.0 checkpoints InternViT-6B"
        )
    # No model_type to go by: InternViT by its names, as the original decides; else CLIP, whose loading
    # then says what is wrong.
    return "internvit" if raw is not None and any(part in name for part in _INTERNVIT_6B_NAMES) else "clip"


def internvit_config(raw: dict[str, Any], source: str) -> InternVLVisionConfig:
    """InternViT-6B's config (`intern_vit_6b`) as transformers' InternVLVisionConfig.

    The field names differ: passing the original's (`qk_normalization`, `qkv_bias`) would be
    accepted silently and leave QK-norm off, so each field is translated by name.
    """
    try:
        return InternVLVisionConfig(
            hidden_size=int(raw["hidden_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            attention_bias=bool(raw.get("qkv_bias", False)),
            use_qk_norm=bool(raw.get("qk_normalization", True)),
            hidden_act=str(raw.get("hidden_act", "gelu")),
            norm_type="rms_norm",
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-6)),
            # The native size sizes the position table; other sizes interpolate it on every forward.
            image_size=int(raw.get("image_size", 224)),
            patch_size=int(raw.get("patch_size", 14)),
            num_channels=int(raw.get("num_channels", 3)),
            layer_scale_init_value=float(raw.get("initializer_factor", 0.1)),
            # Mean pooling instead of a final LayerNorm, which InternViT-6B does not have.
            use_mean_pooling=True,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StartupError(f"the vision tower {source} has an unusable InternViT config.json: {exc!r}") from None


def internvit_to_transformers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """InternViT-6B's weight names as InternVLVisionModel's; the fused qkv projection is split into
    its three equal row blocks (q, k, v in that order). Names of neither kind are dropped."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key in _EMBEDDING_NAMES:
            renamed[_EMBEDDING_NAMES[key]] = value
        elif key.startswith("encoder.layers."):
            _, _, index, rest = key.split(".", 3)
            renamed.update({f"encoder.layer.{index}.{name}": tensor for name, tensor in _layer_weight(rest, value)})
    return renamed


def _layer_weight(name: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    if name.startswith("attn.qkv."):
        suffix = name.removeprefix("attn.qkv.")
        blocks = value.chunk(3, dim=0)
        return [(f"attention.{proj}.{suffix}", block) for proj, block in zip(_QKV, blocks, strict=True)]
    if name in _LAYER_NAMES:
        return [(_LAYER_NAMES[name], value)]
    for old, new in _LAYER_PREFIXES.items():
        if name.startswith(old):
            return [(new + name.removeprefix(old), value)]
    return []


_QKV = ("q_proj", "k_proj", "v_proj")
_EMBEDDING_NAMES = {
    "embeddings.class_embedding": "embeddings.cls_token",
    "embeddings.position_embedding": "embeddings.position_embeddings",
    "embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias",
}
_LAYER_NAMES = {
    "norm1.weight": "layernorm_before.weight",
    "norm2.weight": "layernorm_after.weight",
    "ls1": "lambda_1",
    "ls2": "lambda_2",
}
_LAYER_PREFIXES = {
    "attn.proj.": "attention.projection_layer.",
    "attn.q_norm.": "attention.q_norm.",
    "attn.k_norm.": "attention.k_norm.",
    "mlp.": "mlp.",
}


def interpolate_positions_in_float32(tower: nn.Module) -> None:
    """Makes an InternVLVisionModel interpolate its position table as InternViT-6B does: in float32,
    then cast. transformers interpolates in the table's own dtype (float16 on a GPU), which rounds
    differently from the original; in float32 both are the same bicubic resize."""
    embeddings: Any = tower.embeddings
    patch_height, patch_width = embeddings.patch_size

    def interpolate(hidden: torch.Tensor, height: int, width: int) -> torch.Tensor:
        table: torch.Tensor = embeddings.position_embeddings
        side = math.isqrt(table.shape[1] - 1)
        rows, columns = height // patch_height, width // patch_width
        if (rows, columns) == (side, side):
            return table
        grid = table[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, columns), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * columns, -1).to(table.dtype)
        return torch.cat([table[:, :1], grid], dim=1)

    # An instance attribute: the embeddings module looks it up before its class's method.
    embeddings.interpolate_pos_encoding = interpolate


def _raw_config(source: str) -> tuple[dict[str, Any] | None, StartupError | None]:
    """The tower's config.json as JSON, or None and the error that says why it cannot be read."""
    hint = "mm_vision_tower in config.json; without network, point --vision-tower at a local copy"
    try:
        raw = read_raw_config(source, "the vision tower")
    except StartupError as exc:
        return None, StartupError(f"{exc} ({hint})")
    if raw is None:
        # Offline, the hub client reports a tower it has never downloaded as having no config.json.
        return None, StartupError(f"the vision tower {source} has no config.json to be found ({hint})")
    return raw, None


def _clip_config(source: str) -> CLIPVisionConfig:
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # hub and parsing errors come in many types; all mean "unusable tower"
        raise StartupError(
            f"the vision tower {source} cannot be loaded (mm_vision_tower in config.json; without network, "
            f"point --vision-tower at a local copy): {one_line(exc)}"
        ) from exc
    # openai's towers are whole CLIP models; only their vision half is used.
    vision = config.vision_config if config.model_type == "clip" else config
    if not isinstance(vision, CLIPVisionConfig):
        raise StartupError(f"the vision tower {source} is a {config.model_type!r} model; expected CLIP")
    return vision


def _tower_name(source: str) -> str:
    """The tower's own name: a hub id's repository or a directory's last component. InternVL's copy
    tests its rules on the whole string; a parent directory's name says nothing of the tower."""
    return Path(source.rstrip("/")).name


def _square(value: Any, source: str) -> int:
    """A size given as one int, or as a square (height, width) pair."""
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise StartupError(f"the vision tower {source} has a size of {value!r}; square images are expected")
