"""Turns a checkpoint (local directory or hub id) into a LoadedModel ready to generate."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from llava_worker.config import DEFAULT_CONTEXT_LENGTH, WorkerConfig, validate_config
from llava_worker.errors import StartupError
from llava_worker.models.files import local_directory, one_line, read_raw_config
from llava_worker.models.loaded import LoadedModel
from llava_worker.models.original.checkpoint import is_original_config
from llava_worker.models.original.loader import plan_original_load

logger = logging.getLogger(__name__)

#: Config fields that name a model's context length, most specific first.
_CONTEXT_LENGTH_FIELDS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions")


def resolve_device(requested: str) -> torch.device:
    """The device to use; falls back to the CPU, with a log line, when the accelerator is absent."""
    if requested == "cuda" and not torch.cuda.is_available():
        logger.warning("--device cuda was requested but CUDA is not available; running on the CPU")
        return torch.device("cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        logger.warning("--device mps was requested but MPS is not available; running on the CPU")
        return torch.device("cpu")
    return torch.device(requested)


def load_model(config: WorkerConfig) -> LoadedModel:
    """Loads the checkpoint named by `config.model_path` as the flags ask."""
    validate_config(config)
    device = resolve_device(config.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    raw = read_raw_config(config.model_path)
    if config.model_base is not None or (raw is not None and is_original_config(raw)):
        return _load_original_format(config, raw, device, dtype)
    if config.vision_tower is not None:
        raise StartupError(
            f"--vision-tower is for checkpoints in the original LLaVA layout; {config.model_path} names its own tower"
        )
    model_config = _load_config(config.model_path)
    is_vlm = _is_vision_language(model_config)
    if config.multi_modal and not is_vlm:
        raise StartupError(
            f"--multi-modal was given, but {config.model_path} (model_type "
            f"{model_config.model_type!r}) is not a vision-language model that transformers can load"
        )
    if config.pad_images and model_config.model_type != "llava":
        raise StartupError(
            f"--pad-images is for LLaVA-1.5-style checkpoints; {config.model_path} is a "
            f"{model_config.model_type!r} model, which prepares images its own way"
        )

    kwargs = _load_kwargs(config, model_config, is_vlm, device, dtype)
    try:
        if is_vlm:
            processor = AutoProcessor.from_pretrained(config.model_path)
            tokenizer = processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(config.model_path, **kwargs)
        else:
            processor = None
            tokenizer = AutoTokenizer.from_pretrained(config.model_path)
            model = AutoModelForCausalLM.from_pretrained(config.model_path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise StartupError(f"cannot load {config.model_path}: {one_line(exc)}") from exc
    pad_colour = None
    if config.pad_images:
        pad_colour = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    return _loaded(config, model, tokenizer, processor, model_config, is_vlm, dtype, pad_colour)


def _load_original_format(
    config: WorkerConfig, raw: dict[str, Any] | None, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """An original-format LLaVA checkpoint (or a LoRA over `--model-base`), built in memory."""
    directory = local_directory(config.model_path, "--model-path")
    plan = plan_original_load(config, directory, raw)
    if config.multi_modal and not plan.takes_images:
        raise StartupError(f"--multi-modal was given, but {config.model_path} is a LoRA over a language model")
    if config.pad_images:
        logger.info("--pad-images changes nothing here: original LLaVA checkpoints prepare images as their config says")
    kwargs = _load_kwargs(config, plan.model_config, plan.takes_images, device, dtype)
    model, processor = plan.load(kwargs)
    return _loaded(config, model, plan.tokenizer, processor, plan.model_config, plan.takes_images, dtype, None)


def _load_kwargs(
    config: WorkerConfig, model_config: PretrainedConfig, is_vlm: bool, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype}
    # "auto" spreads a model over every visible GPU; elsewhere everything goes on the one device.
    kwargs["device_map"] = "auto" if device.type == "cuda" else {"": device}
    if config.use_flash_attn:
        kwargs["attn_implementation"] = "flash_attention_2"
    quantization = _quantization_config(config, model_config, is_vlm, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return kwargs


def _loaded(
    config: WorkerConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    processor: Any | None,
    model_config: PretrainedConfig,
    is_vlm: bool,
    dtype: torch.dtype,
    pad_colour: tuple[int, ...] | None,
) -> LoadedModel:
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        takes_images=is_vlm,
        context_length=context_length_of(model_config),
        device=model.device,
        dtype=dtype,
        square_pad_colour=pad_colour,
    )
    logger.info(
        "loaded %s (%s, %s, %s on %s, context %d tokens, images: %s)",
        config.model_path,
        type(model).__name__,
        "8-bit" if config.load_8bit else "4-bit" if config.load_4bit else str(dtype).removeprefix("torch."),
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
        loaded.device,
        loaded.context_length,
        "yes" if loaded.takes_images else "no",
    )
    return loaded


def context_length_of(model_config: PretrainedConfig) -> int:
    """The longest sequence the language model was built for."""
    text_config = model_config.get_text_config()
    for source in (text_config, model_config):
        for field in _CONTEXT_LENGTH_FIELDS:
            value = getattr(source, field, None)
            if isinstance(value, int) and value > 0:
                return value
    return DEFAULT_CONTEXT_LENGTH


def _load_config(model_path: str) -> PretrainedConfig:
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(model_path)
    except Exception as exc:  # the hub client raises many types; all mean "cannot use this path"
        where = "a local directory" if os.path.isdir(model_path) else "a model on the Hugging Face hub"
        raise StartupError(f"--model-path {model_path} is not usable as {where}: {one_line(exc)}") from exc
    return config


def _is_vision_language(model_config: PretrainedConfig) -> bool:
    """Decided from the checkpoint's own config, not from its name."""
    return model_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(
        model_config, "vision_config"
    )


def _quantization_config(
    config: WorkerConfig, model_config: PretrainedConfig, is_vlm: bool, dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    if not (config.load_8bit or config.load_4bit):
        return None
    # Giving a skip list replaces bitsandbytes' default, so lm_head has to be named again; the vision
    # tower and projector stay in full precision, as the original keeps them.
    skip = ["lm_head", *(_non_language_modules(model_config) if is_vlm else [])]
    if config.load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        llm_int8_skip_modules=skip,
    )


def _non_language_modules(model_config: PretrainedConfig) -> list[str]:
    """Full paths of a VLM's modules other than its language model (vision tower, projector, ...).

    Found by building the model on the meta device, which allocates nothing, so this works for any
    architecture without a table of module names.
    """
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(model_config)
    base_name, base = next(iter(skeleton.named_children()))
    return [
        f"{base_name}.{name}"
        for name, _ in base.named_children()
        if name != "language_model" and not name.startswith("lm_head")
    ]
