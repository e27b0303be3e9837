"""A random-weight LLaVA-1.5 with llava-hf/llava-1.5-7b-hf's exact shapes, for the GPU benchmark.

`scripts/benchmark.py --mode vision --device cuda --llava-7b-shapes` builds it with
`build_llava15_7b_shapes`: CLIP ViT-L/14-336 (1024 wide, 24 layers, 16 heads, 576 image tokens per
image, layer -2 selected), the two-layer GELU projector and Llama-2-7B (4096 wide, 32 layers, 32
heads, intermediate 11008) with llava-hf's vocabulary of 32064 (`<image>` at 32000, `<pad>` at
32001): 7.06 B parameters, built directly on the GPU in float16 (never materialised in float32 or
on the CPU), about 14 GB on disk. With `tiny=True` the same architecture and vocabulary come with
tiny widths and depths, to try the code path on a CPU.

The tokenizer is the fixtures' BPE (`tiny.build_tokenizer`) with its ids laid out as LLaVA-1.5's:
`<unk>` 0, `<s>` 1, `</s>` 2, the trained tokens from 3, unused placeholder tokens (that no text
encodes to) up to `<image>` at 32000 and `<pad>` at 32001.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from llava_worker.testing.tiny import (
    BENCH_IMAGE_SIZE,
    BENCH_IMAGE_TOKENS,
    BENCH_PATCH_SIZE,
    DEFAULT_SEED,
    IMAGE_TOKEN,
    _clip_image_processor,
    _llava_processor_fields,
    _save,
    _unprintable_token_ids,
    build_tokenizer,
    language_fields,
    make_test_image,
)

__all__ = [
    "LLAVA15_7B_IMAGE_TOKEN_ID",
    "LLAVA15_7B_PAD_TOKEN_ID",
    "LLAVA15_7B_VOCAB_SIZE",
    "build_llava15_7b_shapes",
    "llava15_7b_config",
    "llava15_7b_tokenizer",
    "parameter_count",
]

#: llava-hf's LLaVA-1.5 vocabulary: Llama's 32000, `<image>`, `<pad>`, padded to a multiple of 64.
LLAVA15_7B_VOCAB_SIZE = 32064
LLAVA15_7B_IMAGE_TOKEN_ID = 32000
LLAVA15_7B_PAD_TOKEN_ID = 32001
LLAVA15_7B_MAX_POSITIONS = 4096
#: transformers' default initialisation (the tiny fixtures' 0.2 would overflow float16 at 4096 wide).
LLAVA15_7B_INITIALIZER_RANGE = 0.02
#: What no text encodes to: the BPE merges never produce these strings.
_PLACEHOLDER = "<unused_{}>"


def llava15_7b_tokenizer(seed: int = DEFAULT_SEED) -> PreTrainedTokenizerFast:
    """`tiny.build_tokenizer(seed)` with LLaVA-1.5's ids (see the module docstring); it encodes any
    text to the same tokens, only their ids differ."""
    return _relaid(build_tokenizer(seed))[0]


def _relaid(tiny: PreTrainedTokenizerFast) -> tuple[PreTrainedTokenizerFast, list[int]]:
    """`tiny` with LLaVA-1.5's ids, and the new ids of the tokens greedy output may pick (`tiny`'s
    printable ones: `finish_model`'s rule)."""
    special_ids = {IMAGE_TOKEN: LLAVA15_7B_IMAGE_TOKEN_ID, tiny.pad_token: LLAVA15_7B_PAD_TOKEN_ID}
    layout = json.loads(tiny.backend_tokenizer.to_str())
    old_vocab: dict[str, int] = layout["model"]["vocab"]
    new_ids: dict[int, int] = {}
    next_id = 0
    for token, old_id in sorted(old_vocab.items(), key=lambda item: item[1]):
        if token in special_ids:
            new_ids[old_id] = special_ids[token]
        else:
            new_ids[old_id] = next_id
            next_id += 1
    vocab = {token: new_ids[old_id] for token, old_id in old_vocab.items()}
    vocab.update({_PLACEHOLDER.format(i): i for i in range(next_id, LLAVA15_7B_IMAGE_TOKEN_ID)})
    layout["model"]["vocab"] = vocab
    for added in layout["added_tokens"]:
        added["id"] = new_ids[added["id"]]
    for special in layout["post_processor"]["special_tokens"].values():
        special["ids"] = [new_ids[old_id] for old_id in special["ids"]]
    kwargs = {key: value for key, value in tiny.init_kwargs.items() if key != "backend"}
    kwargs["model_max_length"] = LLAVA15_7B_MAX_POSITIONS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(layout)), **kwargs)
    assert tokenizer.image_token_id == LLAVA15_7B_IMAGE_TOKEN_ID, tokenizer.image_token_id
    assert tokenizer.pad_token_id == LLAVA15_7B_PAD_TOKEN_ID, tokenizer.pad_token_id
    assert len(tokenizer) == LLAVA15_7B_PAD_TOKEN_ID + 1, len(tokenizer)
    unprintable = set(_unprintable_token_ids(tiny))
    printable = sorted(new_ids[old_id] for old_id in range(len(tiny)) if old_id not in unprintable)
    return tokenizer, printable


def _vision_config(tiny: bool) -> CLIPVisionConfig:
    """CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), or the same geometry tiny."""
    sizes: dict[str, Any]
    if tiny:
        sizes = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 1}
    else:
        sizes = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
    return CLIPVisionConfig(
        **sizes,
        image_size=BENCH_IMAGE_SIZE,
        patch_size=BENCH_PATCH_SIZE,
        projection_dim=64 if tiny else 768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        initializer_range=LLAVA15_7B_INITIALIZER_RANGE,
    )


def _text_config(tokenizer: PreTrainedTokenizerFast, tiny: bool) -> LlamaConfig:
    """Llama-2-7B (vicuna-7b-v1.5) with llava-hf's vocabulary, or the same with tiny sizes."""
    if tiny:
        sizes = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 1}
    else:
        sizes = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}
    fields = language_fields(
        tokenizer,
        **sizes,
        num_key_value_heads=sizes["num_attention_heads"],
        vocab_size=LLAVA15_7B_VOCAB_SIZE,
        max_position_embeddings=LLAVA15_7B_MAX_POSITIONS,
    )
    return LlamaConfig(
        **{**fields, "initializer_range": LLAVA15_7B_INITIALIZER_RANGE},
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
    )


def llava15_7b_config(tokenizer: PreTrainedTokenizerFast, *, tiny: bool = False) -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf's config (or its architecture with tiny sizes) for `tokenizer`'s ids."""
    return LlavaConfig(
        vision_config=_vision_config(tiny),
        text_config=_text_config(tokenizer, tiny),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=BENCH_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def parameter_count(*, tiny: bool = False) -> int:
    """The model's parameters, counted on the meta device (nothing is allocated)."""
    config = llava15_7b_config(llava15_7b_tokenizer(), tiny=tiny)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float16)
    return sum(parameter.numel() for parameter in model.parameters())


def _finish(model: Any, tokenizer: PreTrainedTokenizerFast, printable: list[int]) -> None:
    """`tiny.finish_model` without its cast to float32: greedy output is printable text that never
    stops by itself (every other row of the head is zero, which scores below the best of the ~500
    random logits), and the generation config names the special ids."""
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear)
    keep = torch.zeros(head.weight.shape[0], dtype=torch.bool, device=head.weight.device)
    keep[printable] = True
    with torch.no_grad():
        head.weight[~keep] = 0.0
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.eval()


def _check_finite(model: Any, processor: LlavaProcessor, device: torch.device, dtype: torch.dtype) -> None:
    """One image prompt through the model: float16 must neither overflow nor give NaN."""
    prompt = f"USER: {IMAGE_TOKEN}\nWhat is shown in this picture? ASSISTANT:"
    inputs = processor(text=[prompt], images=[make_test_image(0, (640, 480))], return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        logits = model(**inputs).logits[:, -1]
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the random LLaVA-1.5-7B-shaped model gives non-finite logits in {dtype}")


def build_llava15_7b_shapes(
    out_dir: Path, *, device: str = "cuda", tiny: bool = False, seed: int = DEFAULT_SEED
) -> Path:
    """Builds the random LLaVA-1.5-7B-shaped checkpoint (tokenizer and processor included) into
    `out_dir`: its weights are created on `device`, in float16 on a GPU and float32 on the CPU (as
    the worker loads them), and checked to give finite logits before they are saved."""
    tokenizer, printable = _relaid(build_tokenizer(seed))
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(BENCH_IMAGE_SIZE),
        **{**_llava_processor_fields(tokenizer), "patch_size": BENCH_PATCH_SIZE},
    )
    config = llava15_7b_config(tokenizer, tiny=tiny)
    target = torch.device(device)
    dtype = torch.float32 if target.type == "cpu" else torch.float16
    torch.manual_seed(seed)
    with torch.device(target):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    try:
        _finish(model, tokenizer, printable)
        _check_finite(model, processor, target, dtype)
        return _save(Path(out_dir), model, processor)
    finally:
        del model
        if target.type == "cuda":
            torch.cuda.empty_cache()
