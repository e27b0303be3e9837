"""Builds, in memory, the transformers model equivalent to an original-format LLaVA checkpoint (full,
LoRA over `--model-base`, projector-only over `--model-base`), or a plain LoRA over a language model.

Loading is split in two: `plan_original_load` reads only configs and the tokenizer, so the caller can
choose dtype, device map and quantization from the resulting transformers config; `OriginalPlan.load`
then reads, renames and merges the weights and builds the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from llava_worker.config import WorkerConfig
from llava_worker.errors import StartupError, plural
from llava_worker.models.files import local_directory, one_line, read_weights
from llava_worker.models.original.checkpoint import (
    Layout,
    OriginalCheckpoint,
    describe_checkpoint,
    is_original_config,
    language_config,
    llava_config,
)
from llava_worker.models.original.inputs import OriginalProcessor
from llava_worker.models.original.towers import VisionTower, describe_tower, interpolate_positions_in_float32
from llava_worker.models.original.weights import (
    as_transformers_projector,
    merge_lora,
    projector_module,
    read_lora_trainables,
    read_projector_only,
    to_transformers_keys,
)

logger = logging.getLogger(__name__)


@dataclass
class OriginalPlan:
    """What an original-format (or plain LoRA) checkpoint becomes, decided before any weight is read."""

    model_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    directory: Path
    base_directory: Path | None
    checkpoint: OriginalCheckpoint | None
    """None for a plain LoRA over a language model."""
    tower: VisionTower | None = None
    image_processor: CLIPImageProcessorPil | None = None

    @property
    def takes_images(self) -> bool:
        return self.checkpoint is not None

    def load(self, load_kwargs: dict[str, Any]) -> tuple[PreTrainedModel, OriginalProcessor | None]:
        """Reads the weights and builds the model with `load_kwargs` (dtype, device map, quantization)."""
        if self.checkpoint is None:
            assert self.base_directory is not None
            weights = read_weights(self.base_directory)
            merge_lora(weights, self.directory)
            # from_pretrained(None, ...) needs the concrete class; the Auto class wants a path.
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(self.model_config)]
            model = _from_state_dict(model_class, self.model_config, weights, load_kwargs)
            return model, None
        return self._load_llava(self.checkpoint, load_kwargs)

    def _load_llava(
        self, checkpoint: OriginalCheckpoint, load_kwargs: dict[str, Any]
    ) -> tuple[PreTrainedModel, OriginalProcessor]:
        if checkpoint.layout is Layout.FULL:
            weights = read_weights(self.directory)
        else:
            assert self.base_directory is not None
            weights = read_weights(self.base_directory)
            if checkpoint.layout is Layout.LORA:
                weights.update(read_lora_trainables(self.directory))
                merge_lora(weights, self.directory)
            else:
                weights.update(read_projector_only(self.directory))
        state, projector, shipped_tower = to_transformers_keys(weights, checkpoint.ships_vision_tower)
        del weights
        if not projector:
            raise StartupError(f"{self.directory.name}: no mm_projector weights were found")
        if checkpoint.anyres and "model.image_newline" not in state:
            raise StartupError(f"{self.directory.name}: an anyres checkpoint without model.image_newline")
        assert self.tower is not None and self.image_processor is not None
        state.update(self.tower.weights(shipped_tower))

        transformers_projector = (
            as_transformers_projector(projector) if checkpoint.projector_type == "mlp2x_gelu" else None
        )
        # transformers' projector is always two layers; any other is put in place after loading, and
        # until then zero-stride placeholders (no memory) keep the load from reporting it missing.
        state.update(transformers_projector or _projector_placeholders(self.model_config))
        model_class = LlavaNextForConditionalGeneration if checkpoint.anyres else LlavaForConditionalGeneration
        model = _from_state_dict(model_class, self.model_config, state, load_kwargs)
        if transformers_projector is None:
            _replace_projector(model, checkpoint, projector)
        if self.tower.kind == "internvit":
            interpolate_positions_in_float32(model.model.vision_tower)
        image_token_id = int(self.model_config.image_token_id)
        _make_room_for_image_token(model, image_token_id)
        processor = OriginalProcessor(
            tokenizer=self.tokenizer,
            image_processor=self.image_processor,
            checkpoint=checkpoint,
            image_token_id=image_token_id,
            tower=self.tower,
        )
        return model, processor


def plan_original_load(config: WorkerConfig, directory: Path, raw: dict[str, Any] | None) -> OriginalPlan:
    """Plans loading `directory` (the local copy of `--model-path`), whose raw config is `raw`:
    an original-format LLaVA checkpoint, or, with `--model-base`, a plain LoRA adapter."""
    name = directory.name
    base = local_directory(config.model_base, "--model-base") if config.model_base else None
    if raw is None or not is_original_config(raw):
        if not (directory / "adapter_config.json").is_file():
            raise StartupError(
                f"--model-base is only for LoRA adapters and projector-only LLaVA checkpoints; "
                f"{name} is neither (it has no adapter_config.json or mm_projector.bin)"
            )
        assert base is not None, "only --model-base brings a checkpoint that is not LLaVA's here"
        return OriginalPlan(
            model_config=_auto_config(base, "--model-base"),
            tokenizer=_tokenizer(base),
            directory=directory,
            base_directory=base,
            checkpoint=None,
        )

    checkpoint = describe_checkpoint(directory, raw, config.vision_tower)
    if checkpoint.layout is Layout.FULL and base is not None:
        raise StartupError(
            f"--model-base is only for LoRA and projector-only checkpoints; {name} is a full checkpoint "
            "(drop --model-base)"
        )
    if checkpoint.layout is not Layout.FULL and base is None:
        raise StartupError(
            f"{name} is a {checkpoint.layout.value} LLaVA checkpoint: give the language model it was trained "
            "from with --model-base (for LLaVA-1.5, lmsys/vicuna-7b-v1.5 or -13b-v1.5)"
        )
    text_config = language_config(raw, checkpoint.language)
    # The original takes the base's tokenizer for LoRA and projector-only checkpoints.
    tokenizer = _tokenizer(base if base is not None else directory, text_config)
    if checkpoint.added_tokens:
        tokenizer.add_tokens(checkpoint.added_tokens, special_tokens=True)
    vocab_size = int(text_config.vocab_size)
    if len(tokenizer) > vocab_size:
        raise StartupError(
            f"{name}: the tokenizer has {len(tokenizer)} tokens (with {', '.join(checkpoint.added_tokens) or 'none'} "
            f"added, as mm_use_im_patch_token / mm_use_im_start_end ask) but the model only {vocab_size}"
        )
    tower = _tower_for(checkpoint, raw)
    # The original splices image features in at id -200, never embedded; an id just past the
    # vocabulary plays that part without changing any logit.
    model_config = llava_config(checkpoint, text_config, tower, image_token_id=vocab_size)
    logger.info(
        "%s is an original LLaVA checkpoint (%s, %s, %s projector, images: %s); %s tower %s%s",
        name,
        checkpoint.layout.value,
        checkpoint.language,
        checkpoint.projector_type,
        "anyres" if checkpoint.anyres else "pad" if checkpoint.pads_to_square else "resize and crop",
        "InternViT-6B" if tower.kind == "internvit" else "CLIP",
        checkpoint.vision_tower,
        " with the checkpoint's own tower weights" if checkpoint.ships_vision_tower else "",
    )
    return OriginalPlan(
        model_config=model_config,
        tokenizer=tokenizer,
        directory=directory,
        base_directory=base,
        checkpoint=checkpoint,
        tower=tower,
        image_processor=tower.image_processor(),
    )


def _tower_for(checkpoint: OriginalCheckpoint, raw: dict[str, Any]) -> VisionTower:
    """The checkpoint's vision tower, checked against what the checkpoint says of it."""
    name = checkpoint.directory.name
    tower = describe_tower(checkpoint.vision_tower)
    mm_hidden_size = raw.get("mm_hidden_size", tower.hidden_size)
    if mm_hidden_size != tower.hidden_size:
        raise StartupError(
            f"{name}: mm_hidden_size = {mm_hidden_size}, but the vision tower {checkpoint.vision_tower} has "
            f"hidden size {tower.hidden_size}"
        )
    if tower.kind == "internvit" and checkpoint.anyres:
        raise StartupError(f"{name}: image_aspect_ratio 'anyres' with an InternViT-6B tower cannot be served")
    return tower


def _tokenizer(directory: Path, model_config: PretrainedConfig | None = None) -> PreTrainedTokenizerBase:
    try:
        # Given the config, AutoTokenizer does not read config.json, which it cannot parse (llava_llama)
        # or misreads (plain "llava") for original checkpoints.
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(directory, config=model_config)
    except (OSError, ValueError, ImportError) as exc:
        raise StartupError(f"cannot load the tokenizer of {directory}: {one_line(exc)}") from exc
    return tokenizer


def _auto_config(directory: Path, flag: str) -> PretrainedConfig:
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise StartupError(f"{flag} {directory}: {one_line(exc)}") from exc
    return config


def _from_state_dict(
    model_class: Any,
    model_config: PretrainedConfig,
    state: dict[str, torch.Tensor],
    load_kwargs: dict[str, Any],
) -> PreTrainedModel:
    """`from_pretrained` on weights already in memory; refuses to start on missing weights, which
    transformers would otherwise fill with random values."""
    try:
        model, info = model_class.from_pretrained(
            None, config=model_config, state_dict=state, output_loading_info=True, **load_kwargs
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise StartupError(f"cannot build the model: {one_line(exc)}") from exc
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise StartupError(
            f"the checkpoint lacks {plural(len(missing), 'weight')} the model needs: {', '.join(missing[:3])}"
        )
    result: PreTrainedModel = model
    return result


def _projector_placeholders(model_config: PretrainedConfig) -> dict[str, torch.Tensor]:
    vision = model_config.vision_config.hidden_size
    text = model_config.text_config.hidden_size
    shapes = {"linear_1.weight": (text, vision), "linear_1.bias": (text,), "linear_2.weight": (text, text)}
    shapes["linear_2.bias"] = (text,)
    return {f"model.multi_modal_projector.{name}": torch.zeros(1).expand(shape) for name, shape in shapes.items()}


def _replace_projector(
    model: PreTrainedModel, checkpoint: OriginalCheckpoint, weights: dict[str, torch.Tensor]
) -> None:
    base = model.model
    old = base.multi_modal_projector
    config = model.config
    projector = projector_module(
        checkpoint.projector_type, config.vision_config.hidden_size, config.text_config.hidden_size
    )
    try:
        projector.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise StartupError(
            f"the mm_projector weights do not fit mm_projector_type {checkpoint.projector_type!r}: {one_line(exc)}"
        ) from exc
    reference = next(old.parameters())
    base.multi_modal_projector = projector.to(device=reference.device, dtype=reference.dtype)


def _make_room_for_image_token(model: PreTrainedModel, image_token_id: int) -> None:
    """Extends the input embedding (only: lm_head keeps its size, so logits are unchanged) to embed the
    image token, whose embedding is replaced by image features before the language model sees it."""
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, nn.Embedding)
    if embeddings.num_embeddings > image_token_id:
        return
    weight = embeddings.weight
    extended = nn.Embedding(
        image_token_id + 1,
        weight.shape[1],
        padding_idx=embeddings.padding_idx,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        extended.weight.zero_()
        extended.weight[: weight.shape[0]] = weight
    model.set_input_embeddings(extended)
