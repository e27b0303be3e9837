"""Build deterministic tiny random-weight checkpoints in the InternVL-Chat-1.0 layout.

InternVL-Chat-1.0 (``OpenGVLab/InternVL-Chat-ViT-6B-Vicuna-7B``, ``-Vicuna-13B-448px``) is the original
haotian-liu/LLaVA layout with an InternViT-6B vision tower in place of CLIP: a Vicuna ``config.json``
with ``mm_*`` fields whose ``mm_vision_tower`` names a separate tower repository
(``OpenGVLab/InternViT-6B-224px``, ``-448px-V1-0``), which ships remote code, a ``config.json`` of
``model_type "intern_vit_6b"`` and weights under InternViT's own names. These builders write both at
toy size, with the decoys a loader must ignore: a copy of the tower inside the chat checkpoint, a
stray ``mm_projector.bin`` and the tower repository's ``preprocessor_config.json``.

Toy patch sizes keep the geometry of the real ones: the 224 tower (patch 28, 8×8 positions) is used
at 336 px, so its position table is interpolated to 12×12 (144 image tokens); the 448 tower (patch
56) is used at its native size, 8×8 (64 image tokens).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from llava_worker.testing.tiny import build_each_atomically
from llava_worker.testing.tiny_original import (
    MM_HIDDEN_SIZE,
    language_model,
    llava_config,
    projector_weights,
    save_safetensors,
    save_sharded,
    write_generation_config,
    write_json,
    write_tokenizer,
)

__all__ = [
    "BUILD_VERSION",
    "IMAGE_TOKENS",
    "INTERNVIT_CONFIG",
    "INTERNVL_CHAT_CHECKPOINT_DIRS",
    "build_internvl_chat_checkpoints",
]

INTERNVL_CHAT_CHECKPOINT_DIRS: dict[str, str] = {
    "internvit-224-tower": "tiny-InternViT-6B-224px",
    "internvit-448-tower": "tiny-InternViT-6B-448px-V1-0",
    "internvl-chat-7b": "tiny-InternVL-Chat-ViT-6B-Vicuna-7B",
    "internvl-chat-13b-448px": "tiny-InternVL-Chat-ViT-6B-Vicuna-13B-448px",
}
# Independent of the other builders' versions: bump when anything built here changes.
BUILD_VERSION = "1"

#: The tower fields both tiny towers share (the hub's InternViT-6B: hidden 3200, 25 heads, 48 layers).
INTERNVIT_CONFIG: dict[str, Any] = {
    "hidden_size": MM_HIDDEN_SIZE,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "num_hidden_layers": 6,
    "qkv_bias": False,
    "qk_normalization": True,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}
# (native image size, patch size) per tower; the chat checkpoints crop to 336 and 448 px.
_TOWER_GEOMETRY = {"internvit-224-tower": (224, 28), "internvit-448-tower": (448, 56)}
_CHAT_TOWERS = {"internvl-chat-7b": "internvit-224-tower", "internvl-chat-13b-448px": "internvit-448-tower"}
#: Image tokens per image: (336 / 28)² with the 224 tower, (448 / 56)² with the 448 one.
IMAGE_TOKENS: dict[str, int] = {"internvl-chat-7b": 144, "internvl-chat-13b-448px": 64}

_SEEDS = {
    "internvit-224-tower": 200,
    "internvit-448-tower": 201,
    "internvl-chat-7b": 202,
    "internvl-chat-13b-448px": 203,
}
# The tower copy inside a chat checkpoint is the tower's weights plus this much noise, and the stray
# mm_projector.bin is another seed's projector: using either visibly changes the output.
_TOWER_COPY_NOISE = 0.1
_STRAY_PROJECTOR_SEED_OFFSET = 1000
_ORIGINAL_TRANSFORMERS_VERSION = "4.37.2"


def _tower_config(name: str) -> dict[str, Any]:
    """The tower's config.json as the hub repository has it (remote code, read as JSON by loaders)."""
    image_size, patch_size = _TOWER_GEOMETRY[name]
    hub_name = "OpenGVLab/InternViT-6B-224px" if image_size == 224 else "OpenGVLab/InternViT-6B-448px-V1-0"
    return {
        "_name_or_path": hub_name,
        "architectures": ["InternVisionModel"],
        "auto_map": {
            "AutoConfig": "configuration_intern_vit.InternVisionConfig",
            "AutoModel": "modeling_intern_vit.InternVisionModel",
        },
        "model_type": "intern_vit_6b",
        **INTERNVIT_CONFIG,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
        "initializer_factor": 0.1,
        "initializer_range": 0.02,
        "use_flash_attn": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "torch_dtype": "float32",
        "transformers_version": _ORIGINAL_TRANSFORMERS_VERSION,
    }


@functools.cache
def _tower_weights(name: str) -> dict[str, torch.Tensor]:
    """Random InternViT-6B weights under the original names, scaled so that every part matters:
    norm weights and layer scales far from their initial ones, a random position table (so its
    interpolation shows), QK-norm weights that differ per channel (so per-head norms differ)."""
    image_size, patch_size = _TOWER_GEOMETRY[name]
    hidden, inner = INTERNVIT_CONFIG["hidden_size"], INTERNVIT_CONFIG["intermediate_size"]
    grid = image_size // patch_size
    generator = torch.Generator().manual_seed(_SEEDS[name])

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(shape, generator=generator)

    # Unit-variance patch embeddings for normalised pixels, comparable to the position table's.
    patch_std = 1.0 / math.sqrt(3 * patch_size * patch_size)
    weights = {
        "embeddings.class_embedding": normal(1, 1, hidden, std=1.0),
        "embeddings.patch_embedding.weight": normal(hidden, 3, patch_size, patch_size, std=patch_std),
        "embeddings.patch_embedding.bias": normal(hidden, std=0.2),
        "embeddings.position_embedding": normal(1, grid * grid + 1, hidden, std=1.0),
    }
    linear_std = 1.0 / math.sqrt(hidden)
    for index in range(INTERNVIT_CONFIG["num_hidden_layers"]):
        prefix = f"encoder.layers.{index}."
        weights.update(
            {
                f"{prefix}attn.qkv.weight": normal(3 * hidden, hidden, std=linear_std),
                f"{prefix}attn.q_norm.weight": normal(hidden, mean=1.0, std=0.5),
                f"{prefix}attn.k_norm.weight": normal(hidden, mean=1.0, std=0.5),
                f"{prefix}attn.proj.weight": normal(hidden, hidden, std=linear_std),
                f"{prefix}attn.proj.bias": normal(hidden, std=0.2),
                f"{prefix}mlp.fc1.weight": normal(inner, hidden, std=linear_std),
                f"{prefix}mlp.fc1.bias": normal(inner, std=0.2),
                f"{prefix}mlp.fc2.weight": normal(hidden, inner, std=1.0 / math.sqrt(inner)),
                f"{prefix}mlp.fc2.bias": normal(hidden, std=0.2),
                f"{prefix}norm1.weight": normal(hidden, mean=1.0, std=0.3),
                f"{prefix}norm2.weight": normal(hidden, mean=1.0, std=0.3),
                f"{prefix}ls1": normal(hidden, mean=0.5, std=0.2),
                f"{prefix}ls2": normal(hidden, mean=0.5, std=0.2),
            }
        )
    return weights


def _save_sharded_bin(out_dir: Path, state: dict[str, torch.Tensor], shards: int = 2) -> None:
    """Shard into ``pytorch_model-0000N-of-0000M.bin`` pickles plus their ``weight_map`` index, as
    transformers 4.3x saved checkpoints without safetensors."""
    keys = list(state)
    per_shard = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    for index in range(shards):
        name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        chunk = keys[index * per_shard : (index + 1) * per_shard]
        torch.save({key: state[key].contiguous() for key in chunk}, out_dir / name)
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(value.numel() * value.element_size() for value in state.values())
    write_json(out_dir / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_decoy_preprocessor(out_dir: Path) -> None:
    # The original builds InternViT's image processor in code (ImageNet mean/std, 336 or 448 px);
    # a loader that reads this file instead gets CLIP's statistics and another size.
    write_json(
        out_dir / "preprocessor_config.json",
        {
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": 224},
        },
    )


def _build_tower(out_dir: Path, name: str) -> None:
    write_json(out_dir / "config.json", _tower_config(name))
    _write_decoy_preprocessor(out_dir)
    weights = _tower_weights(name)
    # Hub towers come in both formats: one of each, so loaders must read sharded pickles and safetensors.
    if name == "internvit-224-tower":
        _save_sharded_bin(out_dir, weights)
    else:
        save_safetensors(out_dir / "model.safetensors", weights)


def _tower_copy(tower: str, seed: int) -> dict[str, torch.Tensor]:
    """The tower as InternVL-Chat checkpoints carry it (``model.vision_tower.vision_tower.*``),
    perturbed so that loading it instead of the tower repository's weights changes the output."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"model.vision_tower.vision_tower.{key}": value
        + _TOWER_COPY_NOISE * torch.randn(value.shape, generator=generator)
        for key, value in _tower_weights(tower).items()
    }


def _chat_config(model: PreTrainedModel, name: str, tower_dir: str) -> dict[str, Any]:
    """config.json as InternVL's copy of LLaVA's training writes it: ``model_type "llava"``, select
    layer -4, and none of the fields later LLaVA versions added (``tokenizer_model_max_length``,
    ``mm_patch_merge_type``, ``unfreeze_mm_vision_tower``)."""
    base = "lmsys/vicuna-7b-v1.5" if name == "internvl-chat-7b" else "lmsys/vicuna-13b-v1.5"
    config = llava_config(
        model,
        vision_tower=tower_dir,
        name_or_path=base,
        model_type="llava",
        mm_vision_select_layer=-4,
        image_grid_pinpoints=None,
        tune_vit_pos_embedding=False,
    )
    for key in (
        "tokenizer_model_max_length",
        "tokenizer_padding_side",
        "mm_patch_merge_type",
        "mm_resampler_type",
        "mm_projector_lr",
        "unfreeze_mm_vision_tower",
    ):
        del config[key]
    assert config["mm_hidden_size"] == INTERNVIT_CONFIG["hidden_size"]
    return config


def _build_chat(out_dir: Path, name: str, tower_dir: str) -> None:
    tokenizer = write_tokenizer(out_dir)
    seed = _SEEDS[name]
    model = language_model(tokenizer, seed)
    write_json(out_dir / "config.json", _chat_config(model, name, tower_dir))
    write_generation_config(out_dir, tokenizer)
    state = {
        **model.state_dict(),
        **projector_weights("mlp2x_gelu", seed),
        **_tower_copy(_CHAT_TOWERS[name], seed),
    }
    if name == "internvl-chat-7b":
        save_sharded(out_dir, state)
        # Left over from the projector-pretraining stage (half precision); the checkpoint's own
        # model.mm_projector.* is what the original loads.
        stray = projector_weights("mlp2x_gelu", seed + _STRAY_PROJECTOR_SEED_OFFSET)
        torch.save({key: value.half() for key, value in stray.items()}, out_dir / "mm_projector.bin")
    else:
        _save_sharded_bin(out_dir, state, shards=3)


def _stamp(root: Path) -> str:
    # The chat configs hold the towers' absolute paths: a tree copied elsewhere must be rebuilt.
    return f"{BUILD_VERSION}\n{root}\n"


def build_internvl_chat_checkpoints(root: Path, force: bool = False) -> dict[str, Path]:
    """Build the tiny InternViT-6B towers and InternVL-Chat-1.0 checkpoints under ``root`` (skipping
    complete ones unless ``force``).

    Returns ``{name: directory}`` for the names in :data:`INTERNVL_CHAT_CHECKPOINT_DIRS`; each chat
    checkpoint's ``mm_vision_tower`` is the absolute path of its tower's directory.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[Path], None]] = {
        tower: functools.partial(_build_tower, name=tower) for tower in _TOWER_GEOMETRY
    }
    for chat, tower in _CHAT_TOWERS.items():
        tower_dir = str(root / INTERNVL_CHAT_CHECKPOINT_DIRS[tower])
        builders[chat] = functools.partial(_build_chat, name=chat, tower_dir=tower_dir)
    return build_each_atomically(builders, INTERNVL_CHAT_CHECKPOINT_DIRS, root, _stamp(root), force)
