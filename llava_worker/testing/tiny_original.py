"""Build deterministic tiny random-weight checkpoints in the original haotian-liu/LLaVA layout.

The liuhaotian/* repositories on the hub are not transformers checkpoints: their config.json is a
Llama/Mistral config with ``mm_*`` fields, the vision tower comes from a separate CLIP repository,
the tokenizer ships as a SentencePiece ``tokenizer.model`` only, and LoRA or projector-only releases
need a base model. These builders reproduce each of those layouts at toy size (the same shapes as
:mod:`llava_worker.testing.tiny`), so tests can load them through the same code path a real
checkpoint takes without network access.
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from llava_worker.testing.tiny import (
    IMAGE_SIZE,
    INITIALIZER_RANGE,
    MAX_POSITIONS,
    PATCH_SIZE,
    build_each_atomically,
    finish_model,
    language_fields,
    save_quietly,
    training_corpus,
)

__all__ = [
    "BUILD_VERSION",
    "GRID_PINPOINTS_WH",
    "IMAGE_PATCH_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "LM_HIDDEN_SIZE",
    "MM_HIDDEN_SIZE",
    "ORIGINAL_CHECKPOINT_DIRS",
    "SPM_VOCAB_SIZE",
    "build_original_checkpoints",
    "language_model",
    "legacy_text_fields",
    "llava_config",
    "projector_weights",
    "save_safetensors",
    "save_sharded",
    "write_generation_config",
    "write_json",
    "write_tokenizer",
]

ORIGINAL_CHECKPOINT_DIRS: dict[str, str] = {
    "clip-tower": "tiny-original-clip-tower",
    "vicuna-base": "tiny-original-vicuna-base",
    "llava-v1.5-llava_llama": "tiny-original-llava-v1.5-llava_llama",
    "llava-v1.5-llava": "tiny-original-llava-v1.5-llava",
    "llava-v1.5-lora": "tiny-original-llava-v1.5-lora",
    "llava-v1.5-projector": "tiny-original-llava-v1.5-projector",
    "llava-v1.6-mistral": "tiny-original-llava-v1.6-mistral",
    "llava-v1-linear": "tiny-original-llava-v1-linear",
}
# Independent of tiny.BUILD_VERSION: bump when anything built here changes.
BUILD_VERSION = "2"

SPM_VOCAB_SIZE = 600
MM_HIDDEN_SIZE = 32
LM_HIDDEN_SIZE = 64
# The original lists pinpoints as (width, height); transformers wants (height, width).
GRID_PINPOINTS_WH = [[32, 64], [64, 32], [64, 64]]
IMAGE_PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
HUB_VISION_TOWER = "openai/clip-vit-large-patch14-336"

# Written by transformers 4.31-4.37 like the hub files, so loaders must cope with the legacy spelling
# (torch_dtype, rope_theta/rope_scaling) rather than only what transformers 5 writes itself.
_ORIGINAL_TRANSFORMERS_VERSION = "4.37.2"
_V5_ONLY_CONFIG_KEYS = frozenset(
    {
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "dtype",
        "rope_parameters",
        "head_dim",
        "mlp_bias",
        "_name_or_path",
        "transformers_version",
        "architectures",
    }
)
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_RANK = 4
_LORA_ALPHA = 8
# Tower weights shipped inside a checkpoint are the CLIP tower's plus this much noise: enough that
# encoding with the wrong set visibly changes the output.
_TOWER_NOISE = 0.1

_SEEDS = {
    "clip-tower": 100,
    "vicuna-base": 101,
    "llava-v1.5-llava_llama": 102,
    "llava-v1.5-llava": 103,
    "llava-v1.5-lora": 104,
    "llava-v1.5-projector": 105,
    "llava-v1.6-mistral": 106,
    "llava-v1-linear": 107,
}
_TOKENIZER_CORPUS_SEED = 0


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@functools.cache
def _sentencepiece_model() -> bytes:
    """A Llama-style SentencePiece BPE model (byte fallback, digits split, no pad piece)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus(_TOKENIZER_CORPUS_SEED)),
        model_writer=model,
        model_type="bpe",
        vocab_size=SPM_VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        # Llama's trainer settings: keep text as written, so "\n" becomes <0x0A> and spaces survive.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # One thread and the whole corpus (no sampling) make the model byte-identical on every run.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer(out_dir: Path, added: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Write tokenizer files the way liuhaotian's repos ship them (no tokenizer.json) and load them back."""
    (out_dir / "tokenizer.model").write_bytes(_sentencepiece_model())
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **_added_token("<s>")},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **_added_token("</s>")},
        "legacy": False,
        "model_max_length": MAX_POSITIONS,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **_added_token("<unk>")},
    }
    if added:
        # added_tokens.json alone, as LLaVA v1 repos (transformers 4.31) have it: an added_tokens_decoder
        # in tokenizer_config.json would make transformers 5 ignore special_tokens_map.json (pad = unk).
        write_json(out_dir / "added_tokens.json", {t: SPM_VOCAB_SIZE + i for i, t in enumerate(added)})
    write_json(out_dir / "tokenizer_config.json", config)
    # LLaVA's (and FastChat's) training sets pad = unk and saves it here, while tokenizer_config keeps
    # the base's null: the hub files carry both.
    special = {name: _added_token(content) for name, content in (("bos_token", "<s>"), ("eos_token", "</s>"))}
    write_json(
        out_dir / "special_tokens_map.json", {**special, "pad_token": "<unk>", "unk_token": _added_token("<unk>")}
    )
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == SPM_VOCAB_SIZE + len(added)
    assert tokenizer.pad_token_id == tokenizer.unk_token_id
    assert tokenizer.convert_tokens_to_ids(list(added)) == [SPM_VOCAB_SIZE + i for i in range(len(added))]
    return tokenizer


def _base_tokenizer() -> PreTrainedTokenizerFast:
    # LoRA and projector-only releases ship no tokenizer: the base's is what sizes their vocabulary.
    with tempfile.TemporaryDirectory() as scratch:
        return write_tokenizer(Path(scratch))


@functools.cache
def _clip_model() -> CLIPModel:
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 100,
            "max_position_embeddings": 77,
            # The defaults (49406/49407) lie outside this tiny vocabulary and trigger warnings.
            "bos_token_id": 98,
            "eos_token_id": 99,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": MM_HIDDEN_SIZE,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "initializer_range": INITIALIZER_RANGE,
        },
        projection_dim=32,
    )
    torch.manual_seed(_SEEDS["clip-tower"])
    model = CLIPModel(config)
    model.eval()
    return model


def _tower_vision_weights() -> dict[str, torch.Tensor]:
    """The CLIP tower's vision weights under their openai names (``vision_model.…``)."""
    return {key: value for key, value in _clip_model().state_dict().items() if key.startswith("vision_model.")}


def _checkpoint_tower(seed: int) -> dict[str, torch.Tensor]:
    """A fine-tuned-looking copy of the tower under the original's in-checkpoint prefix."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"model.vision_tower.vision_tower.{key}": value + _TOWER_NOISE * torch.randn(value.shape, generator=generator)
        for key, value in _tower_vision_weights().items()
    }


def _random(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator) * INITIALIZER_RANGE


def projector_weights(projector_type: str, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if projector_type == "linear":
        return {
            "model.mm_projector.weight": _random((LM_HIDDEN_SIZE, MM_HIDDEN_SIZE), generator),
            "model.mm_projector.bias": _random((LM_HIDDEN_SIZE,), generator),
        }
    assert projector_type == "mlp2x_gelu"
    # Random (not zero) biases, so a loader that drops or swaps them gives different output.
    return {
        "model.mm_projector.0.weight": _random((LM_HIDDEN_SIZE, MM_HIDDEN_SIZE), generator),
        "model.mm_projector.0.bias": _random((LM_HIDDEN_SIZE,), generator),
        "model.mm_projector.2.weight": _random((LM_HIDDEN_SIZE, LM_HIDDEN_SIZE), generator),
        "model.mm_projector.2.bias": _random((LM_HIDDEN_SIZE,), generator),
    }


def language_model(tokenizer: PreTrainedTokenizerFast, seed: int, *, mistral: bool = False) -> PreTrainedModel:
    fields = language_fields(tokenizer)
    model: PreTrainedModel
    torch.manual_seed(seed)
    if mistral:
        # llava-v1.6-mistral's base (Mistral-7B-Instruct-v0.2) has no sliding window and rope_theta 1e6.
        model = MistralForCausalLM(
            MistralConfig(
                **fields, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}
            )
        )
    else:
        model = LlamaForCausalLM(LlamaConfig(**fields))
    finish_model(model, tokenizer)
    return model


def _zero_head_rows(state: dict[str, torch.Tensor], token_ids: Sequence[int]) -> None:
    # Added tokens such as <im_start> decode as printable text, but greedy output must never contain them.
    state["lm_head.weight"][list(token_ids)] = 0.0


def legacy_text_fields(config: PretrainedConfig) -> dict[str, Any]:
    """``config`` as transformers 4.37 would have written it: rope_theta, torch_dtype, no v5-only keys."""
    fields = config.to_dict()
    rope = fields["rope_parameters"]
    assert rope["rope_type"] == "default"
    legacy = {key: value for key, value in fields.items() if key not in _V5_ONLY_CONFIG_KEYS}
    legacy.update(
        rope_theta=rope["rope_theta"],
        rope_scaling=None,
        torch_dtype="float32",
        transformers_version=_ORIGINAL_TRANSFORMERS_VERSION,
    )
    return legacy


def llava_config(
    model: PreTrainedModel,
    *,
    vision_tower: str,
    name_or_path: str = "lmsys/vicuna-7b-v1.5",
    **overrides: Any,
) -> dict[str, Any]:
    config = {
        **legacy_text_fields(model.config),
        "_name_or_path": name_or_path,
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_vision_tower": vision_tower,
        "mm_hidden_size": MM_HIDDEN_SIZE,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_resampler_type": None,
        "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_model_max_length": MAX_POSITIONS,
        "tokenizer_padding_side": "right",
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": False,
        "use_mm_proj": True,
        "mm_projector_lr": None,
    }
    config.update(overrides)
    return config


def write_generation_config(out_dir: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    # No sampling defaults: the worker's request parameters alone decide how to decode.
    write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "transformers_version": _ORIGINAL_TRANSFORMERS_VERSION,
        },
    )


def save_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({key: value.contiguous() for key, value in state.items()}, str(path), metadata={"format": "pt"})


def save_sharded(out_dir: Path, state: dict[str, torch.Tensor], shards: int = 2) -> None:
    """Shard like a multi-file hub checkpoint: whole tensors per file plus the ``weight_map`` index."""
    keys = list(state)
    per_shard = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        chunk = keys[index * per_shard : (index + 1) * per_shard]
        save_safetensors(out_dir / name, {key: state[key] for key in chunk})
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(value.numel() * value.element_size() for value in state.values())
    write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _build_clip_tower(out_dir: Path) -> None:
    model = _clip_model()
    save_quietly(model, out_dir)
    saved = set(_tower_vision_weights())
    # The original and the openai repo name vision weights "vision_model.…"; transformers 5's
    # CLIPVisionModel drops that segment in memory but still saves and loads it for CLIPModel.
    assert saved and all(key.startswith("vision_model.") for key in saved)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(out_dir)


def _build_vicuna_base(out_dir: Path) -> None:
    tokenizer = write_tokenizer(out_dir)
    model = language_model(tokenizer, _SEEDS["vicuna-base"])
    save_quietly(model, out_dir)
    # lmsys/vicuna-7b-v1.5 was saved by transformers 4.31: keep its spelling of the config.
    write_json(
        out_dir / "config.json",
        {
            **legacy_text_fields(model.config),
            "_name_or_path": "meta-llama/Llama-2-7b-hf",
            "architectures": ["LlamaForCausalLM"],
        },
    )


def _build_llava_llama(out_dir: Path, tower: str) -> None:
    tokenizer = write_tokenizer(out_dir)
    seed = _SEEDS["llava-v1.5-llava_llama"]
    model = language_model(tokenizer, seed)
    write_json(out_dir / "config.json", llava_config(model, vision_tower=tower))
    write_generation_config(out_dir, tokenizer)
    save_sharded(out_dir, {**model.state_dict(), **projector_weights("mlp2x_gelu", seed)})


def _build_llava_model_type(out_dir: Path, tower: str) -> None:
    tokenizer = write_tokenizer(out_dir)
    seed = _SEEDS["llava-v1.5-llava"]
    model = language_model(tokenizer, seed)
    # Some liuhaotian repos say "llava", which AutoConfig silently reads as transformers' LlavaConfig.
    write_json(out_dir / "config.json", llava_config(model, vision_tower=tower, model_type="llava"))
    write_generation_config(out_dir, tokenizer)
    text = model.config
    head_dim = text.hidden_size // text.num_attention_heads
    # Older transformers saved the rotary buffer in every layer; nothing may load it now.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rotary = {
        f"model.layers.{n}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for n in range(text.num_hidden_layers)
    }
    # A stale tower copy that unfreeze_mm_vision_tower: false says to ignore in favour of mm_vision_tower.
    decoy = _checkpoint_tower(seed)
    state = {**model.state_dict(), **rotary, **projector_weights("mlp2x_gelu", seed), **decoy}
    torch.save(state, out_dir / "pytorch_model.bin")


def _build_lora(out_dir: Path, tower: str) -> None:
    seed = _SEEDS["llava-v1.5-lora"]
    # Only its config and shapes matter here: the weights come from the base at load time.
    shape_model = language_model(_base_tokenizer(), _SEEDS["vicuna-base"])
    write_json(out_dir / "config.json", llava_config(shape_model, vision_tower=tower))
    write_json(
        out_dir / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": _LORA_RANK,
            "lora_alpha": _LORA_ALPHA,
            "lora_dropout": 0.05,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "target_modules": list(_LORA_TARGETS),
            "base_model_name_or_path": "lmsys/vicuna-7b-v1.5",
            "modules_to_save": None,
        },
    )
    generator = torch.Generator().manual_seed(seed)
    adapter: dict[str, torch.Tensor] = {}
    for name, module in shape_model.named_modules():
        if name.rsplit(".", 1)[-1] not in _LORA_TARGETS:
            continue
        assert isinstance(module, torch.nn.Linear)
        prefix = f"base_model.model.{name}"
        # B @ A · alpha/r then has entries of about 0.16, as large as the base weights themselves
        # (trained B is non-zero, unlike peft's zero init), so merging visibly changes the output.
        adapter[f"{prefix}.lora_A.weight"] = _random((_LORA_RANK, module.in_features), generator)
        adapter[f"{prefix}.lora_B.weight"] = _random((module.out_features, _LORA_RANK), generator)
    assert len(adapter) == 2 * len(_LORA_TARGETS) * shape_model.config.num_hidden_layers
    save_safetensors(out_dir / "adapter_model.safetensors", adapter)
    projector = {f"base_model.model.{key}": value for key, value in projector_weights("mlp2x_gelu", seed).items()}
    torch.save(projector, out_dir / "non_lora_trainables.bin")


def _build_projector(out_dir: Path, tower: str) -> None:
    seed = _SEEDS["llava-v1.5-projector"]
    shape_model = language_model(_base_tokenizer(), _SEEDS["vicuna-base"])
    write_json(out_dir / "config.json", llava_config(shape_model, vision_tower=tower))
    # Pretraining saves the projector in half precision; the original casts it to fp16 on load too.
    projector = {key: value.half() for key, value in projector_weights("mlp2x_gelu", seed).items()}
    torch.save(projector, out_dir / "mm_projector.bin")


def _build_mistral(out_dir: Path) -> None:
    tokenizer = write_tokenizer(out_dir)
    seed = _SEEDS["llava-v1.6-mistral"]
    model = language_model(tokenizer, seed, mistral=True)
    config = llava_config(
        model,
        # A hub id on purpose: with no network the caller must point --vision-tower at a directory,
        # and the checkpoint's own tower weights must still win over that directory's.
        vision_tower=HUB_VISION_TOWER,
        name_or_path="mistralai/Mistral-7B-Instruct-v0.2",
        architectures=["LlavaMistralForCausalLM"],
        model_type="llava_mistral",
        image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=GRID_PINPOINTS_WH,
        unfreeze_mm_vision_tower=True,
    )
    write_json(out_dir / "config.json", config)
    write_generation_config(out_dir, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    state = {
        **model.state_dict(),
        **projector_weights("mlp2x_gelu", seed),
        "model.image_newline": _random((LM_HIDDEN_SIZE,), generator),
        **_checkpoint_tower(seed),
    }
    save_safetensors(out_dir / "model.safetensors", state)


def _build_linear(out_dir: Path, tower: str) -> None:
    added = (IMAGE_PATCH_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
    tokenizer = write_tokenizer(out_dir, added)
    seed = _SEEDS["llava-v1-linear"]
    model = language_model(tokenizer, seed)
    config = llava_config(
        model,
        vision_tower=tower,
        mm_projector_type="linear",
        mm_use_im_start_end=True,
        mm_use_im_patch_token=True,
        mm_vision_select_layer=-1,
    )
    # LLaVA v1 predates image_aspect_ratio: its absence must mean the default (no padding).
    del config["image_aspect_ratio"]
    write_json(out_dir / "config.json", config)
    write_generation_config(out_dir, tokenizer)
    state = {**model.state_dict(), **projector_weights("linear", seed)}
    _zero_head_rows(state, [SPM_VOCAB_SIZE + index for index in range(len(added))])
    save_safetensors(out_dir / "model.safetensors", state)


def _stamp(root: Path) -> str:
    # Configs hold the tower's absolute path, so a tree copied elsewhere must be rebuilt, not reused.
    return f"{BUILD_VERSION}\n{root}\n"


def build_original_checkpoints(root: Path, force: bool = False) -> dict[str, Path]:
    """Build every original-layout checkpoint under ``root`` (skipping complete ones unless ``force``).

    Returns ``{name: directory}`` for the names in :data:`ORIGINAL_CHECKPOINT_DIRS`. The LoRA and
    projector-only checkpoints need ``vicuna-base`` as their base; the LLaVA configs point
    ``mm_vision_tower`` at the absolute path of ``clip-tower``, except ``llava-v1.6-mistral``, which
    names the hub id (pass the directory as the vision tower explicitly).
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tower = str(root / ORIGINAL_CHECKPOINT_DIRS["clip-tower"])
    builders: dict[str, Callable[[Path], None]] = {
        "clip-tower": _build_clip_tower,
        "vicuna-base": _build_vicuna_base,
        "llava-v1.5-llava_llama": functools.partial(_build_llava_llama, tower=tower),
        "llava-v1.5-llava": functools.partial(_build_llava_model_type, tower=tower),
        "llava-v1.5-lora": functools.partial(_build_lora, tower=tower),
        "llava-v1.5-projector": functools.partial(_build_projector, tower=tower),
        "llava-v1.6-mistral": _build_mistral,
        "llava-v1-linear": functools.partial(_build_linear, tower=tower),
    }
    return build_each_atomically(builders, ORIGINAL_CHECKPOINT_DIRS, root, _stamp(root), force)
