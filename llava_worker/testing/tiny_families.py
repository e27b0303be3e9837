"""Tiny random-weight checkpoints of the LLaVA family as people serve it today, each with the shape
and the tokenizer conventions of its hub original, built here (no model hub):

- `llava-next-llama3`: LLaVA-NeXT on a Llama-3-style tokenizer (llava-hf/llama3-llava-next-8b-hf):
  turns end with `<|eot_id|>`, while the tokenizer's and the generation config's eos is
  `<|end_of_text|>`.
- `llava-next-chatml`: LLaVA-NeXT on a Yi-style ChatML tokenizer (llava-hf/llava-v1.6-34b-hf): turns
  end with `<|im_end|>`, the eos is `<|endoftext|>`, and a BOS `<|startoftext|>` is added.
- `llava-interleave`: LLaVA with a SigLIP tower and Qwen2 (llava-hf/llava-interleave-qwen-0.5b-hf):
  full tower features (no CLS token), several `<image>`s in one turn, ChatML, no BOS.
- `llava-onevision`: LlavaOnevisionForConditionalGeneration, SigLIP and Qwen2, any-resolution with
  `anyres_max_N` (llava-hf/llava-onevision-qwen2-0.5b-ov-hf).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import processors
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.utils.import_utils import is_torchvision_available

from llava_worker.testing.tiny import (
    DEFAULT_SEED,
    GRID_PINPOINTS,
    IMAGE_SIZE,
    IMAGE_TOKEN,
    MAX_POSITIONS,
    PATCH_SIZE,
    _llava_next_image_processor,
    _save,
    _text_config,
    _vision_config,
    build_each_atomically,
    finish_model,
    language_fields,
    train_byte_level_bpe,
)

IMAGE_TOKENS_FULL = (IMAGE_SIZE // PATCH_SIZE) ** 2  # SigLIP: every patch, no CLS token
VIDEO_TOKEN = "<video>"


def _image_parts(marker: str) -> str:
    """Jinja for a message's content: text parts as they are, image parts as `marker`, video parts
    as `<video>` on a line of its own."""
    return (
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- elif part['type'] in ('image', 'image_url') -%}{{- '" + marker + "' -}}"
        "{%- elif part['type'] in ('video', 'video_url') -%}{{- '" + VIDEO_TOKEN + "\\n' -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )


def llama3_chat_template() -> str:
    """llama3-llava-next's: header tokens around the role, `<|eot_id|>` after every turn."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
        + _image_parts(IMAGE_TOKEN + "\\n")
        + "{{- '<|eot_id|>' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    )


def chatml_chat_template() -> str:
    """ChatML, as Yi-34B's NeXT, Interleave and OneVision write it: `<|im_end|>` after every turn."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        + _image_parts(IMAGE_TOKEN + "\\n")
        + "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def family_tokenizer(
    *, seed: int, bos: str | None, eos: str, pad: str, specials: list[str], template: str, video: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the family's special tokens; a BOS is added only when `bos`."""
    media = [IMAGE_TOKEN, VIDEO_TOKEN] if video else [IMAGE_TOKEN]
    ordered = list(dict.fromkeys([*([bos] if bos else []), eos, pad, *specials, *media]))
    backend = train_byte_level_bpe(seed, ordered)
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens={"image_token": IMAGE_TOKEN, **({"video_token": VIDEO_TOKEN} if video else {})},
        chat_template=template,
        model_max_length=MAX_POSITIONS,
        padding_side="left",
    )


def llama3_tokenizer(seed: int = DEFAULT_SEED) -> PreTrainedTokenizerFast:
    return family_tokenizer(
        seed=seed,
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad="<|finetune_right_pad_id|>",
        specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        template=llama3_chat_template(),
    )


def yi_tokenizer(seed: int = DEFAULT_SEED) -> PreTrainedTokenizerFast:
    return family_tokenizer(
        seed=seed,
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        pad="<unk>",
        specials=["<|im_start|>", "<|im_end|>"],
        template=chatml_chat_template(),
    )


def qwen2_tokenizer(seed: int = DEFAULT_SEED, video: bool = False) -> PreTrainedTokenizerFast:
    return family_tokenizer(
        seed=seed,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        specials=["<|im_start|>"],
        template=chatml_chat_template(),
        video=video,
    )


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


def _siglip_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )


def _qwen2_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    fields = language_fields(tokenizer)
    return Qwen2Config(**fields, use_sliding_window=False)


def _siglip_image_processor() -> Any:
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _finish(
    out_dir: Path, model_class: Any, config: Any, tokenizer: PreTrainedTokenizerFast, processor: Any, seed: int
) -> Path:
    """The model of `config`, seeded and finished (see `finish_model`), saved with its processor."""
    torch.manual_seed(seed)
    model = model_class(config)
    finish_model(model, tokenizer)
    return _save(Path(out_dir), model, processor)


def _llava_next_on(tokenizer: PreTrainedTokenizerFast, out_dir: Path, seed: int) -> Path:
    config = LlavaNextConfig(
        vision_config=_vision_config(),
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=IMAGE_TOKENS_FULL,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=_llava_next_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
    )
    return _finish(out_dir, LlavaNextForConditionalGeneration, config, tokenizer, processor, seed)


def build_llava_next_llama3(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """LLaVA-NeXT on a Llama-3-style tokenizer; the generation config's eos is `<|end_of_text|>` alone,
    as in the checkpoint that made workers run every answer to `max_new_tokens`."""
    return _llava_next_on(llama3_tokenizer(seed), out_dir, seed)


def build_llava_next_chatml(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """LLaVA-NeXT on a Yi-style ChatML tokenizer (v1.6-34b)."""
    return _llava_next_on(yi_tokenizer(seed), out_dir, seed)


def build_llava_interleave(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """LLaVA with a SigLIP tower and Qwen2 (Interleave): full features, no BOS, ChatML."""
    tokenizer = qwen2_tokenizer(seed)
    config = LlavaConfig(
        vision_config=_siglip_config(),
        text_config=_qwen2_config(tokenizer),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=IMAGE_TOKENS_FULL,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    processor = LlavaProcessor(
        image_processor=_siglip_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        num_additional_image_tokens=0,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
    )
    return _finish(out_dir, LlavaForConditionalGeneration, config, tokenizer, processor, seed)


def build_llava_onevision(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """LLaVA-OneVision (SigLIP, Qwen2, anyres_max); its processor needs torchvision (a video processor)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tokenizer = qwen2_tokenizer(seed, video=True)
    pinpoints = [[IMAGE_SIZE * rows, IMAGE_SIZE * cols] for rows in (1, 2) for cols in (1, 2)]
    config = LlavaOnevisionConfig(
        vision_config=_siglip_config(),
        text_config=_qwen2_config(tokenizer),
        image_token_index=tokenizer.image_token_id,
        video_token_index=_token_id(tokenizer, VIDEO_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_2",
        image_grid_pinpoints=pinpoints,
    )
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        num_image_tokens=IMAGE_TOKENS_FULL,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
        chat_template=tokenizer.chat_template,
    )
    return _finish(out_dir, LlavaOnevisionForConditionalGeneration, config, tokenizer, processor, seed)


def build_llava_next_video(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """LLaVA-NeXT-Video (CLIP, Llama, any-resolution images, pooled video frames); its processor needs
    torchvision (a video processor)."""
    from transformers import (
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    tokenizer = family_tokenizer(
        seed=seed,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        specials=["<unk>"],
        template=_vicuna_chat_template(),
        video=True,
    )
    config = LlavaNextVideoConfig(
        vision_config=_vision_config(),
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.image_token_id,
        video_token_index=_token_id(tokenizer, VIDEO_TOKEN),
        image_seq_length=IMAGE_TOKENS_FULL,
        video_seq_length=(IMAGE_SIZE // PATCH_SIZE // 2) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        image_processor=_llava_next_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
    )
    return _finish(out_dir, LlavaNextVideoForConditionalGeneration, config, tokenizer, processor, seed)


def _vicuna_chat_template() -> str:
    """LLaVA's v1 prompt (`USER: ... ASSISTANT:`), as llava-hf's NeXT-Video checkpoints write it."""
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] != 'system' -%}{{- message['role'] | upper + ': ' -}}{%- endif -%}"
        + _image_parts(IMAGE_TOKEN + "\\n")
        + "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- ' ' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


FAMILY_DIRS = {
    "llava-next-llama3": "tiny-llava-next-llama3",
    "llava-next-chatml": "tiny-llava-next-chatml",
    "llava-interleave": "tiny-llava-interleave",
    "llava-onevision": "tiny-llava-onevision",
    "llava-next-video": "tiny-llava-next-video",
}


def family_builders() -> dict[str, Any]:
    builders: dict[str, Any] = {
        "llava-next-llama3": build_llava_next_llama3,
        "llava-next-chatml": build_llava_next_chatml,
        "llava-interleave": build_llava_interleave,
    }
    if is_torchvision_available():
        builders["llava-onevision"] = build_llava_onevision
        builders["llava-next-video"] = build_llava_next_video
    return builders


#: Bump whenever these checkpoints change, so that caches built by older code are rebuilt.
FAMILY_BUILD_VERSION = "families-4\n"


def build_family_checkpoints(root: Path, force: bool = False) -> dict[str, Path]:
    """Build the family checkpoints under `root` (skipping complete ones unless `force`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return build_each_atomically(family_builders(), FAMILY_DIRS, root, FAMILY_BUILD_VERSION, force)
