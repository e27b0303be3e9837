"""The vision benchmark's model (`build_benchmark_llava15`) has LLaVA-1.5's image geometry and a
language model of the size the issue asks for; greedy decoding cannot stop early by itself."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

from llava_worker.testing.tiny import (
    BENCH_IMAGE_TOKENS,
    benchmark_llava15_config,
    build_benchmark_llava15,
    build_tokenizer,
    make_test_image,
)


def test_config_has_llava15_geometry_and_a_20m_language_model():
    tokenizer = build_tokenizer()
    config = benchmark_llava15_config(tokenizer)
    vision, text = config.vision_config, config.text_config
    assert isinstance(vision, CLIPVisionConfig) and isinstance(text, LlamaConfig)
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert BENCH_IMAGE_TOKENS == config.image_seq_length == 576
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    with torch.device("meta"):
        language_model = LlamaForCausalLM(text)
    assert sum(p.numel() for p in language_model.parameters()) >= 20_000_000


def test_built_checkpoint_gives_576_image_tokens_per_image_and_never_picks_eos(tmp_path: Path):
    path = build_benchmark_llava15(tmp_path / "bench-llava")
    processor = AutoProcessor.from_pretrained(path)
    images = [make_test_image(0, (64, 48)), make_test_image(1, (48, 64))]
    inputs = processor(text=["USER: <image>\nWhat is it? ASSISTANT:"] * 2, images=images, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 336, 336)
    image_tokens = (inputs["input_ids"] == processor.tokenizer.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [576, 576]
    model = LlavaForConditionalGeneration.from_pretrained(path)
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear)
    # A zero row never wins greedy decoding over ~500 random ones.
    assert not head.weight[processor.tokenizer.eos_token_id].any()
