"""Recompute, from plain torch and transformers parts, the greedy output of haotian-liu/LLaVA's model worker.

This is the yardstick for original-format checkpoints: it re-derives what the original code
(``llava/model/builder.py``, ``llava/mm_utils.py``, ``llava/model/llava_arch.py``,
``llava/model/multimodal_encoder/clip_encoder.py``, ``llava/model/multimodal_projector/builder.py``,
``llava/serve/model_worker.py``) computes, without transformers' Llava/LlavaNext classes or processors
and without merging LoRA weights, so that it shares no conversion code with the worker under test.
It runs in float32 on the CPU; the original runs in float16, which tiny checkpoints don't need.

InternVL-Chat-1.0 checkpoints are served by InternVL's copy of that code (``internvl_chat_llava``),
which picks the vision tower by its name: an InternViT-6B tower is computed by
:mod:`tests.support.internvit_reference` (with the copy's built-in preprocessing) instead of CLIP.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from tests.support.internvit_reference import (
    VARIANTS,
    InternViT,
    internvit_image_processor,
    internvit_pad_colour,
    tower_kind,
)

__all__ = [
    "IMAGE_TOKEN_INDEX",
    "VARIANTS",
    "load_internvit",
    "load_weights",
    "reference_generate",
    "reference_tokenizer",
]

# llava/constants.py: the id spliced into input_ids where an image goes; never in the vocabulary.
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"

_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
_PROJECTOR_PREFIX = "model.mm_projector."
_LM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
_LM_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")

LanguageModel = LlamaForCausalLM | MistralForCausalLM


# --------------------------------------------------------------------------------------------------
# Files and weights
# --------------------------------------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence what loading prints and is expected here: the CLIP text weights a full CLIP directory
    carries, legacy ``rope_scaling`` fields, progress bars."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict), path
    return data


def _load_bin(path: Path) -> dict[str, Tensor]:
    # Original .bin files are plain dicts of tensors, which the safe unpickler reads.
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(data, dict), path
    return data


def _has_lm_weights(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _LM_WEIGHT_FILES)


def load_weights(directory: Path) -> dict[str, Tensor]:
    """Every tensor of a full checkpoint, as ``from_pretrained`` finds them: single or sharded,
    safetensors before pickles. Old ``.bin`` files carry ``rotary_emb.inv_freq`` buffers that no
    model loads (they are recomputed), so they are dropped here."""
    weights: dict[str, Tensor] = {}
    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            for shard in shards:
                weights.update(loader(directory / shard))
            break
    else:
        if (directory / "model.safetensors").is_file():
            weights = load_file(directory / "model.safetensors")
        elif (directory / "pytorch_model.bin").is_file():
            weights = _load_bin(directory / "pytorch_model.bin")
        else:
            raise FileNotFoundError(f"no model weights in {directory}")
    return {key: value for key, value in weights.items() if not key.endswith("rotary_emb.inv_freq")}


def _non_lora_trainables(checkpoint: Path) -> dict[str, Tensor]:
    """Mirrors the key clean-up in builder.py's LoRA branch: strip ``base_model.``, then one
    ``model.`` from every key if any starts ``model.model.``."""
    raw = _load_bin(checkpoint / "non_lora_trainables.bin")
    cleaned = {(key[len("base_model.") :] if key.startswith("base_model.") else key): v for key, v in raw.items()}
    if any(key.startswith("model.model.") for key in cleaned):
        cleaned = {(key[len("model.") :] if key.startswith("model.") else key): v for key, v in cleaned.items()}
    return cleaned


def _layout(checkpoint: Path) -> str:
    """``lora``, ``projector`` or ``full``: the original chose by substrings of the directory name;
    the files say the same thing reliably."""
    if (checkpoint / "adapter_config.json").is_file():
        return "lora"
    if (checkpoint / "mm_projector.bin").is_file() and not _has_lm_weights(checkpoint):
        return "projector"
    return "full"


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def reference_tokenizer(checkpoint: Path, model_base: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer ``load_pretrained_model`` returns: model_base's for LoRA and projector-only
    checkpoints, the checkpoint's otherwise, with ``<im_patch>`` added when
    ``mm_use_im_patch_token`` (true when absent) and then ``<im_start>``, ``<im_end>`` when
    ``mm_use_im_start_end``, all as special tokens."""
    checkpoint = Path(checkpoint)
    config = _read_json(checkpoint / "config.json")
    layout = _layout(checkpoint)
    if layout != "full" and model_base is None:
        raise ValueError(f"{checkpoint} is a {layout} checkpoint: it needs model_base")
    source = Path(model_base) if layout != "full" and model_base is not None else checkpoint
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(source)
    if config.get("mm_use_im_patch_token", True):
        tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if config.get("mm_use_im_start_end", False):
        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    return tokenizer


def reference_text(checkpoint: Path, token_ids: list[int], model_base: Path | None = None) -> str:
    """The text the original worker streams for ``token_ids``: its slow LlamaTokenizer's decode with
    special tokens skipped, which is SentencePiece's own decode of the remaining pieces (byte-fallback
    runs, the dummy-prefix space and all), not transformers 5's re-implementation of it."""
    tokenizer = reference_tokenizer(checkpoint, model_base)
    source = Path(model_base) if model_base is not None and _layout(Path(checkpoint)) != "full" else Path(checkpoint)
    processor = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    special = set(tokenizer.all_special_ids) | set(range(processor.get_piece_size(), len(tokenizer)))
    return str(processor.decode([token for token in token_ids if token not in special]))


def tokenizer_image_token(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Mirrors ``mm_utils.tokenizer_image_token``: each chunk between ``<image>`` placeholders is
    tokenised on its own; when the first chunk starts with BOS it is kept once and the first token
    of *every* chunk (its BOS) is dropped; chunks are joined by ``IMAGE_TOKEN_INDEX``."""
    chunks: list[list[int]] = [list(tokenizer(chunk).input_ids) for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index > 0:
            input_ids.append(IMAGE_TOKEN_INDEX)
        input_ids.extend(chunk[offset:])
    return input_ids


def _whole_prompt_token_ids(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The llava-hf way, for contrast only: ``<image>`` is an added special token and the whole
    prompt is tokenised at once; each of its ids then stands for one image's features."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    assert isinstance(image_id, int)
    return [IMAGE_TOKEN_INDEX if token == image_id else token for token in tokenizer(prompt).input_ids]


# --------------------------------------------------------------------------------------------------
# Model parts
# --------------------------------------------------------------------------------------------------


def build_vision_projector(config: dict[str, Any]) -> nn.Module:
    """Mirrors ``multimodal_projector/builder.py``: ``linear`` is one Linear; ``mlp{N}x_gelu`` is a
    Linear followed by N-1 (exact GELU, Linear) pairs, as an ``nn.Sequential``."""
    projector_type = config.get("mm_projector_type", "linear")
    mm_hidden, hidden = config["mm_hidden_size"], config["hidden_size"]
    if projector_type == "linear":
        return nn.Linear(mm_hidden, hidden)
    match = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if match is None:
        raise ValueError(f"unknown mm_projector_type {projector_type!r}")
    modules: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
    for _ in range(1, int(match.group(1))):
        modules += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*modules)


def _language_model(config: dict[str, Any], weights: dict[str, Tensor]) -> LanguageModel:
    """A Llama or Mistral causal LM built from the raw config fields; the original's LM keys
    (``model.layers.N...``, ``lm_head``) are already those classes' own."""
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "_name_or_path")}
    fields["vocab_size"] = weights["model.embed_tokens.weight"].shape[0]
    # The plainest attention: the reference should not share a fused kernel with the worker.
    fields["attn_implementation"] = "eager"
    names = " ".join([str(config.get("model_type", "")), *map(str, config.get("architectures") or [])])
    model: LanguageModel
    if "mistral" in names.lower():
        model = MistralForCausalLM(MistralConfig.from_dict(fields))
    else:
        model = LlamaForCausalLM(LlamaConfig.from_dict(fields))
    model.load_state_dict({k: v for k, v in weights.items() if k.startswith(_LM_PREFIXES)}, strict=True)
    model.float().eval()
    return model


def _resize_vocabulary(weights: dict[str, Tensor], size: int) -> None:
    """``model.resize_token_embeddings(len(tokenizer))`` after the tokens are added: it keeps the
    first ``size`` rows. Growing would fill new rows randomly, which no reference can reproduce."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = weights[key].shape[0]
        if size > rows:
            raise ValueError(
                f"the tokenizer has {size} tokens but {key} only {rows} rows: the original would "
                "initialise the new rows randomly"
            )
        weights[key] = weights[key][:size]


def _apply_lora(model: LanguageModel, checkpoint: Path) -> None:
    """Adds each adapter at forward time, ``y += (x A^T B^T) · alpha / r`` (what peft's
    ``merge_and_unload`` folds into the weights), so nothing here depends on weight merging."""
    adapter = _read_json(checkpoint / "adapter_config.json")
    path = checkpoint / "adapter_model.safetensors"
    tensors = load_file(path) if path.is_file() else _load_bin(checkpoint / "adapter_model.bin")
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected adapter key {key!r}")
        pairs.setdefault(match["module"], {})[match["which"]] = value.float()
    modules = dict(model.named_modules())
    rank_pattern: dict[str, int] = adapter.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = adapter.get("alpha_pattern") or {}
    if rank_pattern or alpha_pattern or adapter.get("fan_in_fan_out"):
        raise NotImplementedError("LoRA rank/alpha patterns and fan_in_fan_out are not reproduced")
    r, alpha = adapter["r"], adapter["lora_alpha"]
    scale = alpha / math.sqrt(r) if adapter.get("use_rslora") else alpha / r
    for name, pair in pairs.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear) or set(pair) != {"A", "B"}:
            raise ValueError(f"adapter for {name!r} does not fit the language model")
        linear.register_forward_hook(_lora_hook(pair["A"], pair["B"], scale))


def _lora_hook(a: Tensor, b: Tensor, scale: float) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output + (inputs[0] @ a.T @ b.T) * scale

    return hook


@dataclass
class _Reference:
    config: dict[str, Any]
    tokenizer: PreTrainedTokenizerBase
    language_model: LanguageModel
    vision_tower: CLIPVisionModel | InternViT
    image_processor: CLIPImageProcessorPil
    projector: nn.Module
    image_newline: Tensor | None
    eos_token_ids: frozenset[int]
    #: ``pad`` fills with this colour; ``None``: ``int(255 · mean)`` of the processor's mean.
    pad_colour: tuple[int, ...] | None = None
    #: The hidden state the tower's features come from (``mm_vision_select_layer``).
    select_layer: int = -2


_CACHE: dict[tuple[Path, Path | None, Path | None, str | None], _Reference] = {}


def _eos_token_ids(lm_dir: Path, config: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    # generate() stops on generation_config.eos_token_id, read from the directory the LM weights
    # came from, else from the model config.
    generation = lm_dir / "generation_config.json"
    eos = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    if eos is None:
        eos = config.get("eos_token_id", tokenizer.eos_token_id)
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _load(checkpoint: Path, model_base: Path | None, vision_tower: Path | None, variant: str | None) -> _Reference:
    """The cached parts for one (checkpoint, model_base, vision_tower, variant)."""
    key = (checkpoint.resolve(), model_base and model_base.resolve(), vision_tower and vision_tower.resolve(), variant)
    if key not in _CACHE:
        with _quiet():
            _CACHE[key] = _load_uncached(checkpoint, model_base, vision_tower, variant)
    return _CACHE[key]


def _load_uncached(
    checkpoint: Path, model_base: Path | None, vision_tower: Path | None, variant: str | None
) -> _Reference:
    """Mirrors ``builder.load_pretrained_model`` and ``CLIPVisionTower.load_model``."""
    config = _read_json(checkpoint / "config.json")
    layout = _layout(checkpoint)
    tokenizer = reference_tokenizer(checkpoint, model_base)
    lm_dir = checkpoint
    if layout == "full":
        weights = load_weights(checkpoint)
    else:
        assert model_base is not None
        lm_dir = model_base
        weights = load_weights(model_base)
        if layout == "lora":
            weights.update(_non_lora_trainables(checkpoint))
        else:
            # builder.py casts the projector to float16 before loading it.
            projector_weights = _load_bin(checkpoint / "mm_projector.bin")
            weights.update({k: v.to(torch.float16) for k, v in projector_weights.items()})
    weights = {k: v.float() for k, v in weights.items()}
    _resize_vocabulary(weights, len(tokenizer))
    language_model = _language_model(config, weights)
    if layout == "lora":
        _apply_lora(language_model, checkpoint)

    projector = build_vision_projector(config)
    projector.load_state_dict(
        {k[len(_PROJECTOR_PREFIX) :]: v for k, v in weights.items() if k.startswith(_PROJECTOR_PREFIX)}, strict=True
    )
    projector.float().eval()
    image_newline = weights.get("model.image_newline")
    if "unpad" in config.get("mm_patch_merge_type", "") and image_newline is None:
        raise ValueError(f"{checkpoint} uses spatial_unpad but has no model.image_newline")

    tower_source = vision_tower or config.get("mm_vision_tower", config.get("vision_tower"))
    if tower_source is None or not Path(tower_source).is_dir():
        raise ValueError(f"vision tower {tower_source!r} is not a local directory; pass vision_tower")
    tower, image_processor, pad_colour, select_layer = _load_tower(config, weights, str(tower_source), variant)

    return _Reference(
        config=config,
        tokenizer=tokenizer,
        language_model=language_model,
        vision_tower=tower,
        image_processor=image_processor,
        projector=projector,
        image_newline=image_newline,
        eos_token_ids=_eos_token_ids(lm_dir, config, tokenizer),
        pad_colour=pad_colour,
        select_layer=select_layer,
    )


def _load_tower(
    config: dict[str, Any], weights: dict[str, Tensor], source: str, variant: str | None
) -> tuple[CLIPVisionModel | InternViT, CLIPImageProcessorPil, tuple[int, ...] | None, int]:
    """The tower, its image processor, the ``pad`` colour (``None``: the processor's mean) and the
    selected hidden state. The tower kind follows the copy's name rules on the tower's path (haotian's
    own code knows only CLIP: the two agree unless a CLIP path contains "eva"). For InternViT-6B this
    mirrors the copy's ``CLIPVisionTower.load_model``: weights always from the tower's own directory
    (never a copy inside the checkpoint), its config.json read as JSON, the image processor built in
    code."""
    select_layer = int(config.get("mm_vision_select_layer", -2))
    # The copy tests the whole string; the worker deliberately tests only the tower's own name (a
    # parent directory named "eva…" or "…448…" says nothing of the tower), and the tests' temporary
    # directories must not decide the outcome either.
    name = Path(source).name
    kind = tower_kind(name)
    if kind == "internvit-6b":
        tower = load_internvit(Path(source), variant)
        if variant == "select-layer-3":
            select_layer = -3
        return tower, internvit_image_processor(name), internvit_pad_colour(variant), select_layer
    if kind != "clip":
        raise NotImplementedError(f"the reference does not compute {kind} towers ({source})")
    if variant is not None:
        raise ValueError(f"variant {variant!r} applies to InternViT-6B towers only")
    clip = CLIPVisionModel.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")
    if config.get("unfreeze_mm_vision_tower", False):
        _replace_tower_weights(clip, weights)
    clip.eval()
    return clip, CLIPImageProcessorPil.from_pretrained(source), None, select_layer


def load_internvit(directory: Path, variant: str | None = None) -> InternViT:
    """An InternViT-6B tower repository (config.json read as JSON, weights under its own names)."""
    return InternViT(_read_json(Path(directory) / "config.json"), load_weights(Path(directory)), variant)


def _replace_tower_weights(tower: CLIPVisionModel, weights: dict[str, Tensor]) -> None:
    """With ``unfreeze_mm_vision_tower`` the original builds the tower inside the LLaVA model, so the
    checkpoint's ``model.vision_tower.vision_tower.vision_model.*`` tensors overwrite it. In
    transformers 5 ``CLIPVisionModel``'s own keys have no ``vision_model.`` segment."""
    shipped = {k[len(_TOWER_PREFIX) :]: v for k, v in weights.items() if k.startswith(_TOWER_PREFIX)}
    if not shipped:
        return
    own = tower.state_dict()
    missing = [k for k in own if k not in shipped and not k.endswith("position_ids")]
    unknown = [k for k in shipped if k not in own]
    if missing or unknown:
        raise ValueError(f"checkpoint tower weights do not fit the tower: missing {missing}, unknown {unknown}")
    tower.load_state_dict(shipped, strict=False)


# --------------------------------------------------------------------------------------------------
# Images (llava/mm_utils.py)
# --------------------------------------------------------------------------------------------------


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Mirrors ``mm_utils.expand2square``: paste centred on a square of ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def select_best_resolution(original_size: tuple[int, int], resolutions: Iterable[Iterable[int]]) -> tuple[int, int]:
    """Mirrors ``mm_utils.select_best_resolution``; sizes are (width, height), and the strict
    comparisons make the first of equally good candidates win."""
    original_width, original_height = original_size
    best_fit: tuple[int, int] | None = None
    max_effective, min_wasted = 0, float("inf")
    for width, height in resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    assert best_fit is not None
    return best_fit


def resize_and_pad_image(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Mirrors ``mm_utils.resize_and_pad_image``: fit inside ``target`` (w, h) keeping the aspect
    (``math.ceil`` on the scaled side), PIL's default resampling, centred on black."""
    original_width, original_height = image.size
    target_width, target_height = target
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(original_width * scale_h), target_width), target_height
    resized = image.resize((new_width, new_height))
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Mirrors ``mm_utils.divide_to_patches``: row-major square crops."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def _pinpoints(config: dict[str, Any]) -> list[tuple[int, int]]:
    raw = config["image_grid_pinpoints"]
    points = ast.literal_eval(raw) if isinstance(raw, str) else raw
    return [(int(w), int(h)) for w, h in points]


def get_anyres_image_grid_shape(
    image_size: tuple[int, int], pinpoints: list[tuple[int, int]], patch_size: int
) -> tuple[int, int]:
    """Mirrors ``mm_utils.get_anyres_image_grid_shape``: (tiles across, tiles down)."""
    width, height = select_best_resolution(image_size, pinpoints)
    return width // patch_size, height // patch_size


def _pixels(processor: CLIPImageProcessorPil, image: Image.Image) -> Tensor:
    pixel_values = processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
    assert isinstance(pixel_values, Tensor)
    return pixel_values


def process_anyres_image(
    image: Image.Image, processor: CLIPImageProcessorPil, pinpoints: list[tuple[int, int]]
) -> Tensor:
    """Mirrors ``mm_utils.process_anyres_image``: [squashed base view, tiles of the padded image]."""
    best = select_best_resolution(image.size, pinpoints)
    tiles = divide_to_patches(resize_and_pad_image(image, best), processor.crop_size["height"])
    edge = processor.size["shortest_edge"]
    base = image.resize((edge, edge))
    return torch.stack([_pixels(processor, view) for view in [base, *tiles]])


def process_images(
    images: list[Image.Image],
    processor: CLIPImageProcessorPil,
    config: dict[str, Any],
    center_crop: bool,
    background: tuple[int, ...] | None = None,
) -> list[Tensor]:
    """Mirrors ``mm_utils.process_images``, one pixel tensor per image: (3, H, W) for ``pad`` and
    plain CLIP preprocessing, (1 + tiles, 3, H, W) for ``anyres``. ``pad`` fills with
    ``background``, by default ``int(x * 255)`` of each of the processor's means."""
    aspect = config.get("image_aspect_ratio")
    if center_crop and aspect not in ("pad", None):
        raise ValueError("center_crop contrasts with `pad` preprocessing only")
    if aspect == "pad" and not center_crop:
        if background is None:
            background = tuple(int(x * 255) for x in processor.image_mean)
        return [_pixels(processor, expand2square(image, background)) for image in images]
    if aspect == "anyres":
        return [process_anyres_image(image, processor, _pinpoints(config)) for image in images]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert isinstance(pixel_values, Tensor)
    return list(pixel_values)


# --------------------------------------------------------------------------------------------------
# Image features (llava/model/llava_arch.py, clip_encoder.py)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(ref: _Reference, pixel_values: Tensor) -> Tensor:
    """Mirrors ``encode_images``: ``CLIPVisionTower.forward`` (hidden state
    ``mm_vision_select_layer``; ``patch`` drops CLS, ``cls_patch`` keeps it) then the projector."""
    if isinstance(ref.vision_tower, InternViT):
        hidden_states = ref.vision_tower.hidden_states(pixel_values)
    else:
        hidden_states = ref.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    features = hidden_states[ref.select_layer]
    select = ref.config.get("mm_vision_select_feature", "patch")
    if select == "patch":
        features = features[:, 1:]
    elif select != "cls_patch":
        raise ValueError(f"unexpected mm_vision_select_feature {select!r}")
    projected = ref.projector(features)
    assert isinstance(projected, Tensor)
    return projected


def unpad_image(tensor: Tensor, original_size: tuple[int, int]) -> Tensor:
    """Mirrors ``llava_arch.unpad_image``; ``original_size`` is PIL's (width, height) and
    ``tensor`` is (C, H, W)."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


def _merge_anyres(ref: _Reference, feature: Tensor, image_size: tuple[int, int]) -> Tensor:
    """The ``spatial``/``spatial_unpad`` branch of ``prepare_inputs_labels_for_multimodal``."""
    merge = ref.config.get("mm_patch_merge_type", "flat")
    if feature.shape[0] == 1:
        if "unpad" in merge:
            assert ref.image_newline is not None
            return torch.cat((feature[0], ref.image_newline[None]), dim=0)
        return feature[0]
    base, tiles = feature[0], feature[1:]
    assert isinstance(ref.vision_tower, CLIPVisionModel), "anyres checkpoints use CLIP towers"
    tower_size = int(ref.vision_tower.config.image_size)  # type: ignore[arg-type]
    side = tower_size // int(ref.vision_tower.config.patch_size)  # type: ignore[arg-type]
    if side * side != base.shape[0]:
        raise ValueError("spatial merging needs one feature per patch (mm_vision_select_feature=patch)")
    grid_w, grid_h = get_anyres_image_grid_shape(image_size, _pinpoints(ref.config), tower_size)
    tiles = tiles.view(grid_h, grid_w, side, side, -1)
    if "unpad" in merge:
        assert ref.image_newline is not None
        grid = tiles.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
        grid = unpad_image(grid, image_size)
        newline = ref.image_newline[:, None, None].expand(*grid.shape[:-1], 1)
        merged = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
    else:
        merged = tiles.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
    return torch.cat((base, merged), dim=0)


def image_features(ref: _Reference, images: list[Image.Image], center_crop: bool) -> list[Tensor]:
    """One (positions, hidden) tensor per image, as ``prepare_inputs_labels_for_multimodal`` builds
    them: single views are encoded as one batch; anyres views go through the list/5-D branch."""
    pixels = process_images(images, ref.image_processor, ref.config, center_crop, ref.pad_colour)
    if pixels[0].ndim == 3:
        return list(encode_images(ref, torch.stack(pixels)))
    encoded = encode_images(ref, torch.cat(pixels))
    per_image = torch.split(encoded, [p.shape[0] for p in pixels])
    merge = ref.config.get("mm_patch_merge_type", "flat")
    if merge == "flat":
        return [feature.flatten(0, 1) for feature in per_image]
    if not merge.startswith("spatial"):
        raise ValueError(f"unexpected mm_patch_merge_type {merge!r}")
    with torch.no_grad():
        return [_merge_anyres(ref, feature, image.size) for feature, image in zip(per_image, images, strict=True)]


# --------------------------------------------------------------------------------------------------
# Generation (llava/serve/model_worker.py generate_stream, greedy)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _prompt_embeddings(ref: _Reference, input_ids: list[int], features: list[Tensor]) -> Tensor:
    """Mirrors the splicing in ``prepare_inputs_labels_for_multimodal`` for one sequence: text ids
    through ``embed_tokens``, each ``IMAGE_TOKEN_INDEX`` replaced by the next image's rows, then
    truncated to ``tokenizer_model_max_length``."""
    embed = ref.language_model.get_input_embeddings()
    pieces: list[Tensor] = []
    text: list[int] = []
    remaining = iter(features)
    for token in input_ids:
        if token == IMAGE_TOKEN_INDEX:
            pieces += [embed(torch.tensor(text, dtype=torch.long)), next(remaining)]
            text = []
        else:
            text.append(token)
    pieces.append(embed(torch.tensor(text, dtype=torch.long)))
    embeddings = torch.cat(pieces)
    limit = ref.config.get("tokenizer_model_max_length")
    return embeddings[:limit] if limit is not None else embeddings


def reference_generate(
    checkpoint: Path,
    prompt: str,
    images: list[Image.Image],
    max_new_tokens: int,
    *,
    model_base: Path | None = None,
    vision_tower: Path | None = None,
    whole_prompt_tokenization: bool = False,
    center_crop: bool = False,
    variant: str | None = None,
) -> list[int]:
    """Greedy token ids the original worker generates for ``prompt`` (with its ``<image>``
    placeholders) and RGB ``images``; an EOS that ends generation is included, as ``generate``
    returns it. ``whole_prompt_tokenization`` and ``center_crop`` swap in the llava-hf
    tokenisation and plain CLIP preprocessing, and ``variant`` (one of :data:`VARIANTS`, InternViT-6B
    towers only) one deliberate mistake, only to show that they change the answer."""
    checkpoint = Path(checkpoint)
    ref = _load(
        checkpoint,
        Path(model_base) if model_base is not None else None,
        Path(vision_tower) if vision_tower is not None else None,
        variant,
    )
    if prompt.count(DEFAULT_IMAGE_TOKEN) != len(images):
        raise ValueError("Number of images does not match number of <image> tokens in prompt")
    if ref.config.get("mm_use_im_start_end", False):
        prompt = prompt.replace(
            DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        )
    if whole_prompt_tokenization:
        input_ids = _whole_prompt_token_ids(prompt, ref.tokenizer)
    else:
        input_ids = tokenizer_image_token(prompt, ref.tokenizer)
    features = image_features(ref, images, center_crop) if images else []
    embeddings = _prompt_embeddings(ref, input_ids, features)

    # A full recompute per step: slower than a cache, but it shares nothing with one.
    embed = ref.language_model.get_input_embeddings()
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = ref.language_model(inputs_embeds=embeddings[None]).logits[0, -1]
            token = int(torch.argmax(logits))
            generated.append(token)
            if token in ref.eos_token_ids:
                break
            embeddings = torch.cat((embeddings, embed(torch.tensor([token]))))
    return generated
