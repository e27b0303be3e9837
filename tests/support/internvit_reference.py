"""InternViT-6B in plain torch, written from the facts of InternVL's copy of LLaVA (``internvl_chat_llava``)
to recompute what its model worker computes for InternVL-Chat-1.0 checkpoints.

Nothing here comes from transformers' InternVL classes or from the worker: independence is the
point. :mod:`tests.support.original_reference` uses it in place of CLIP when the tower's name says
InternViT-6B. Mutation variants (:data:`VARIANTS`) each change one detail of the computation, so
tests can show that a worker getting that detail wrong would give a different answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPImageProcessorPil

__all__ = [
    "CONTRAST_IMAGE",
    "CONTRAST_PROMPT",
    "CONTRAST_TOKENS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VARIANTS",
    "InternViT",
    "internvit_image_processor",
    "internvit_pad_colour",
    "tower_kind",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Deliberate mistakes, each a plausible misreading of the original; ``None`` is the original.
VARIANTS = frozenset(
    {
        "pad-colour-off-by-one",  # pad with (124, 116, 103) instead of int(255 · ImageNet mean)
        "per-head-qk-norm",  # QK-norm per head (weight split per head) instead of across all heads
        "layernorm",  # LayerNorm (same weight, zero bias) instead of RMSNorm in the blocks
        "select-layer-3",  # hidden state -3 instead of the config's -4
        "bilinear-interpolation",  # position table resized bilinearly instead of bicubically
    }
)

#: A request on the tiny ``internvl-chat-7b`` checkpoint (224 tower at 336 px, so the position table is
#: interpolated) whose greedy answer every variant changes within its first two tokens: a wide image
#: (``make_test_image(seed, size)`` arguments) leaves a large padded area, which the pad colour needs.
#: On ``internvl-chat-13b-448px`` (no interpolation) the bilinear variant changes nothing, as expected.
CONTRAST_PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"
CONTRAST_IMAGE = (3, (200, 60))
CONTRAST_TOKENS = 16

_EVA_NAMES = ("EVA", "eva")
_INTERNVIT_6B_NAMES = ("intern_vit_6b", "internvit_6b", "InternViT-6B", "internvit6b")
_INTERNVL_14B_NAMES = ("internvl_14b", "intern_vl_14b", "InternVL-14B", "internvl14b")


def tower_kind(name: str) -> str:
    """Which tower InternVL's copy builds for ``name`` (a hub id or a path): plain, case-sensitive
    substring tests in its order: ``eva``, ``internvit-6b``, ``internvl-14b``, else ``clip``."""
    if any(part in name for part in _EVA_NAMES):
        return "eva"
    if any(part in name for part in _INTERNVIT_6B_NAMES):
        return "internvit-6b"
    if any(part in name for part in _INTERNVL_14B_NAMES):
        return "internvl-14b"
    return "clip"


def internvit_image_processor(tower_name: str) -> CLIPImageProcessorPil:
    """The processor the copy builds in code (the tower repository's preprocessor_config.json is not
    read): resize the shortest edge to C bicubically, centre-crop C×C, ImageNet statistics, with
    C = 448 when ``"448"`` is anywhere in the tower's name, else 336."""
    crop = 448 if "448" in tower_name else 336
    return CLIPImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def internvit_pad_colour(variant: str | None = None) -> tuple[int, int, int]:
    """The square-padding colour: ``int(x * 255)`` of each ImageNet mean, i.e. (123, 116, 103)."""
    red, green, blue = (int(x * 255) for x in IMAGENET_MEAN)
    if variant == "pad-colour-off-by-one":
        red += 1
    return red, green, blue


@dataclass(frozen=True)
class _Shape:
    hidden: int
    heads: int
    layers: int
    image_size: int
    patch_size: int
    eps: float
    qkv_bias: bool
    qk_norm: bool

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _shape(config: dict[str, Any]) -> _Shape:
    if config.get("hidden_act", "gelu") != "gelu":
        raise NotImplementedError(f"hidden_act {config['hidden_act']!r}")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return _Shape(
        hidden=hidden,
        heads=heads,
        layers=int(config["num_hidden_layers"]),
        image_size=int(config["image_size"]),
        patch_size=int(config["patch_size"]),
        eps=float(config.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(config.get("qkv_bias", False)),
        qk_norm=bool(config.get("qk_normalization", True)),
    )


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise the last dimension by its root mean square in float32, cast back, then scale."""
    dtype = x.dtype
    wide = x.float()
    normalised = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normalised.to(dtype)


class InternViT:
    """The InternViT-6B forward pass over a tower's raw weights (its own key names, no prefix).

    ``variant`` (one of :data:`VARIANTS` or ``None``) switches in one deliberate mistake; those
    that concern preprocessing or feature selection change nothing here.
    """

    def __init__(self, config: dict[str, Any], weights: dict[str, Tensor], variant: str | None = None) -> None:
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}")
        self.shape = _shape(config)
        self.variant = variant
        expected = self._expected_keys()
        missing, unknown = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unknown:
            raise ValueError(f"tower weights do not fit the config: missing {missing}, unknown {unknown}")
        self.weights = {key: value.float() for key, value in weights.items()}

    def _expected_keys(self) -> set[str]:
        keys = {
            "embeddings.class_embedding",
            "embeddings.patch_embedding.weight",
            "embeddings.patch_embedding.bias",
            "embeddings.position_embedding",
        }
        per_layer = ["attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm1.weight", "norm2.weight"]
        per_layer += ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls1", "ls2"]
        if self.shape.qkv_bias:
            per_layer.append("attn.qkv.bias")
        if self.shape.qk_norm:
            per_layer += ["attn.q_norm.weight", "attn.k_norm.weight"]
        keys.update(f"encoder.layers.{n}.{name}" for n in range(self.shape.layers) for name in per_layer)
        return keys

    # ---------------------------------------------------------------------------------------------
    # Embeddings
    # ---------------------------------------------------------------------------------------------

    def position_table(self, rows: int, cols: int) -> Tensor:
        """The (1, 1 + rows·cols, D) position embeddings for a rows×cols patch grid: the CLS entry as
        stored, the patch entries resized from the native grid in float32 (bicubic,
        ``align_corners=False``) and cast back. At the native grid this is the identity."""
        table = self.weights["embeddings.position_embedding"]
        grid, hidden = self.shape.grid, self.shape.hidden
        patches = table[:, 1:].float().reshape(1, grid, grid, hidden).permute(0, 3, 1, 2)
        mode = "bilinear" if self.variant == "bilinear-interpolation" else "bicubic"
        resized = F.interpolate(patches, size=(rows, cols), mode=mode, align_corners=False)
        resized = resized.reshape(1, hidden, rows * cols).permute(0, 2, 1).to(table.dtype)
        return torch.cat((table[:, :1], resized), dim=1)

    def embed(self, pixel_values: Tensor, *, interpolate: bool = True) -> Tensor:
        """CLS token, then one token per patch (a strided convolution with bias), plus positions.
        ``interpolate=False`` adds the stored table as it is (only possible at the native size)."""
        w = self.weights
        patches = F.conv2d(
            pixel_values.float(),
            w["embeddings.patch_embedding.weight"],
            w["embeddings.patch_embedding.bias"],
            stride=self.shape.patch_size,
        )
        batch, _, rows, cols = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        cls = w["embeddings.class_embedding"].expand(batch, 1, -1)
        if interpolate:
            positions = self.position_table(rows, cols)
        else:
            positions = w["embeddings.position_embedding"]
            if positions.shape[1] != rows * cols + 1:
                raise ValueError("without interpolation the image must have the tower's native size")
        return torch.cat((cls, tokens), dim=1) + positions

    # ---------------------------------------------------------------------------------------------
    # Encoder
    # ---------------------------------------------------------------------------------------------

    def _block_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.variant == "layernorm":
            return F.layer_norm(x, (self.shape.hidden,), weight, torch.zeros_like(weight), self.shape.eps)
        return _rms_norm(x, weight, self.shape.eps)

    def _qk_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """RMSNorm of width D over all heads at once (the original); per head for the variant."""
        if self.variant != "per-head-qk-norm":
            return _rms_norm(x, weight, self.shape.eps)
        heads = self.shape.heads
        split = x.unflatten(-1, (heads, -1))
        return _rms_norm(split, weight.reshape(heads, -1), self.shape.eps).flatten(-2)

    def _attention(self, x: Tensor, prefix: str) -> Tensor:
        w, heads = self.weights, self.shape.heads
        qkv = F.linear(x, w[f"{prefix}attn.qkv.weight"], w.get(f"{prefix}attn.qkv.bias"))
        # The fused projection's rows are [q; k; v], each D wide and split into heads in order.
        q, k, v = qkv.chunk(3, dim=-1)
        if self.shape.qk_norm:
            q = self._qk_norm(q, w[f"{prefix}attn.q_norm.weight"])
            k = self._qk_norm(k, w[f"{prefix}attn.k_norm.weight"])
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        scale = q.shape[-1] ** -0.5
        weights = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
        context = (weights @ v).transpose(1, 2).flatten(2)
        return F.linear(context, w[f"{prefix}attn.proj.weight"], w[f"{prefix}attn.proj.bias"])

    def _mlp(self, x: Tensor, prefix: str) -> Tensor:
        w = self.weights
        inner = F.gelu(F.linear(x, w[f"{prefix}mlp.fc1.weight"], w[f"{prefix}mlp.fc1.bias"]))
        return F.linear(inner, w[f"{prefix}mlp.fc2.weight"], w[f"{prefix}mlp.fc2.bias"])

    def _layer(self, x: Tensor, index: int) -> Tensor:
        prefix, w = f"encoder.layers.{index}.", self.weights
        x = x + self._attention(self._block_norm(x, w[f"{prefix}norm1.weight"]), prefix) * w[f"{prefix}ls1"]
        return x + self._mlp(self._block_norm(x, w[f"{prefix}norm2.weight"]), prefix) * w[f"{prefix}ls2"]

    @torch.no_grad()
    def hidden_states(self, pixel_values: Tensor, *, interpolate: bool = True) -> list[Tensor]:
        """The embedding output, then each layer's output (no final norm): ``num_hidden_layers + 1``
        tensors of shape (batch, 1 + patches, D)."""
        states = [self.embed(pixel_values, interpolate=interpolate)]
        for index in range(self.shape.layers):
            states.append(self._layer(states[-1], index))
        return states
