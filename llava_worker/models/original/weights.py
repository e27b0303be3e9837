"""The weights of an original-format LLaVA checkpoint, gathered and renamed for transformers 5:
full checkpoints, LoRA adapters merged into their base, projector-only checkpoints over a base."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from llava_worker.errors import StartupError
from llava_worker.models.files import read_tensor_file

logger = logging.getLogger(__name__)

_TOWER_PREFIX = "model.vision_tower.vision_tower."
_PROJECTOR_PREFIX = "model.mm_projector."
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


def read_lora_trainables(directory: Path) -> dict[str, torch.Tensor]:
    """`non_lora_trainables.bin` (the projector and anything else trained in full next to the
    adapter), under the original's key names: the PEFT wrapper's prefixes are dropped as it drops them."""
    path = directory / "non_lora_trainables.bin"
    if not path.is_file():
        return {}
    trainables = {key.removeprefix("base_model."): value for key, value in read_tensor_file(path).items()}
    if any(key.startswith("model.model.") for key in trainables):
        trainables = {key.removeprefix("model."): value for key, value in trainables.items()}
    return trainables


def read_projector_only(directory: Path) -> dict[str, torch.Tensor]:
    """`mm_projector.bin`, cast to fp16 as the original casts it (its values then match exactly)."""
    weights = read_tensor_file(directory / "mm_projector.bin")
    return {key: value.to(torch.float16) for key, value in weights.items()}


def merge_lora(weights: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Adds each LoRA pair to the weight it adapts, `W += B @ A * alpha / r`, as PEFT's
    merge_and_unload does. `weights` uses the base's key names."""
    config_path = adapter_dir / "adapter_config.json"
    try:
        adapter = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise StartupError(f"{config_path} cannot be read: {exc}") from None
    if adapter.get("peft_type", "LORA") != "LORA":
        raise StartupError(f"{config_path}: peft_type = {adapter.get('peft_type')!r}; only LoRA adapters are merged")
    if adapter.get("use_dora") or adapter.get("use_rslora"):
        raise StartupError(f"{config_path}: DoRA / rsLoRA adapters cannot be merged by this worker")
    rank = int(adapter["r"])
    scale = float(adapter.get("lora_alpha", rank)) / rank
    fan_in_fan_out = bool(adapter.get("fan_in_fan_out", False))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _read_adapter(adapter_dir).items():
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = value
    for module, pair in pairs.items():
        target = f"{module}.weight"
        if target not in weights or set(pair) != {"A", "B"}:
            raise StartupError(f"{adapter_dir.name}: the adapter changes {target}, which the base model does not have")
        weight = weights[target]
        delta = (pair["B"].float() @ pair["A"].float()) * scale
        if fan_in_fan_out:
            delta = delta.T
        weights[target] = (weight.float() + delta).to(weight.dtype)
    if not pairs:
        raise StartupError(f"{adapter_dir.name}: the adapter holds no LoRA weights")
    logger.info("merged %d LoRA weights from %s (r=%d, alpha/r=%g)", len(pairs), adapter_dir, rank, scale)


def _read_adapter(adapter_dir: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return read_tensor_file(adapter_dir / name)
    raise StartupError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors or .bin")


def to_transformers_keys(
    weights: dict[str, torch.Tensor], ships_vision_tower: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Renames the original's keys to transformers 5's Llava layout.

    Returns the renamed model weights, the projector's weights under the original's Sequential names
    (`0.weight`, `2.bias`; the caller decides which module holds them) and the tower weights the
    checkpoint ships, under CLIPVisionModel's own names (empty unless `ships_vision_tower`).
    """
    model: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    tower: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer old checkpoints saved; transformers recomputes it
        if key.startswith(_PROJECTOR_PREFIX):
            projector[key.removeprefix(_PROJECTOR_PREFIX)] = value
        elif key.startswith(_TOWER_PREFIX):
            # Without unfreeze_mm_vision_tower the original never reads these; neither does the worker.
            if ships_vision_tower:
                tower[key.removeprefix(_TOWER_PREFIX).removeprefix("vision_model.")] = value
        elif key == "model.image_newline" or key == "lm_head.weight":
            model[key] = value
        elif key.startswith("model."):
            model["model.language_model." + key.removeprefix("model.")] = value
        else:
            logger.warning("ignoring %s: not part of the LLaVA architecture", key)
    return model, projector, tower


def projector_module(projector_type: str, in_features: int, out_features: int) -> nn.Module:
    """The original's projector (`llava/model/multimodal_projector/builder.py`), so its weights
    load under their own names: one Linear, or Linear then (GELU, Linear) N-1 times."""
    if projector_type == "identity":
        return nn.Identity()
    if projector_type == "linear":
        return nn.Linear(in_features, out_features)
    depth = int(projector_type.removeprefix("mlp").removesuffix("x_gelu"))
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


def as_transformers_projector(projector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """An `mlp2x_gelu` projector's weights under LlavaMultiModalProjector's names, or None when the
    projector has another shape (and needs `projector_module`)."""
    if set(projector) != {"0.weight", "0.bias", "2.weight", "2.bias"}:
        return None
    renamed = {"0": "linear_1", "2": "linear_2"}
    return {
        f"model.multi_modal_projector.{renamed[key.split('.')[0]]}.{key.split('.')[1]}": value
        for key, value in projector.items()
    }
