"""Original-format LLaVA checkpoints (haotian-liu/LLaVA layout): the worker's greedy answers equal an
independent computation of the original architecture (tests/support/original_reference.py)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from PIL import Image

from llava_worker.config import WorkerConfig
from llava_worker.errors import StartupError
from llava_worker.models.chat_template import LLAVA_SYSTEM_MESSAGE
from llava_worker.models.images import ImageLimits
from llava_worker.models.inputs import prepare_inputs
from llava_worker.models.loader import load_model
from tests.support.original_reference import reference_generate, reference_text
from tests.support.payloads import encode_image, greedy
from tests.support.servers import stream_together, wait_until

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO_IMAGES = "USER: <image>\nand <image>\nCompare the two pictures. ASSISTANT:"
TEXT_ONLY = "USER: Tell me about the red boat. ASSISTANT:"
WIDE, TALL = (40, 30), (30, 50)
#: Within the tower's 32 px on both sides: every anyres resolution fits it equally well, and the tie
#: goes to the first listed, so only the original's (width, height) reading gives the right tiles.
SMALL = (28, 20)

#: checkpoint -> the settings it is served with; names in the settings are other tiny checkpoints.
CASES: dict[str, dict[str, str]] = {
    "llava-v1.5-llava_llama": {},
    "llava-v1.5-llava": {},
    "llava-v1.5-lora": {"model_base": "vicuna-base"},
    "llava-v1.5-projector": {"model_base": "vicuna-base"},
    "llava-v1.6-mistral": {"vision_tower": "clip-tower"},
    "llava-v1-linear": {},
}


def _settings(checkpoints: dict[str, Path], name: str, **extra: Any) -> dict[str, Any]:
    return {key: str(checkpoints[value]) for key, value in CASES[name].items()} | extra


def _decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _expected(checkpoints: dict[str, Path], name: str, prompt: str, images: list[str], tokens: int, **kw: Any) -> str:
    """prompt + the reference's greedy continuation, as the worker streams it."""
    settings = {key: checkpoints[value] for key, value in CASES[name].items()}
    base, tower = settings.get("model_base"), settings.get("vision_tower")
    decoded = [_decoded(i) for i in images]
    ids = reference_generate(checkpoints[name], prompt, decoded, tokens, model_base=base, vision_tower=tower, **kw)
    return prompt + reference_text(checkpoints[name], ids, base)


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_answers_equal_the_original_architecture(start_worker, checkpoints, name):
    worker = start_worker(name, **_settings(checkpoints, name))
    requests = [
        (PROMPT, [encode_image(1, WIDE)]),
        (TWO_IMAGES, [encode_image(2, TALL), encode_image(3, SMALL)]),
        (TEXT_ONLY, []),
    ]
    answers = []
    for prompt, images in requests:
        chunks = worker.generate(greedy(prompt, images or None, max_new_tokens=16))
        assert chunks[-1]["error_code"] == 0, chunks[-1]
        expected = _expected(checkpoints, name, prompt, images, 16)
        assert chunks[-1]["text"] == expected, (name, prompt)
        answers.append(expected)
    other_image = worker.generate(greedy(PROMPT, [encode_image(7, WIDE)], max_new_tokens=16))[-1]["text"]
    assert other_image != answers[0], "the answer should depend on the image"


def test_the_reference_would_notice_llava_hf_style_inputs(checkpoints):
    """Whole-prompt tokenisation and centre-cropping, the llava-hf way, each change an answer here, so
    the comparisons above would catch a worker that prepared inputs that way."""
    name = "llava-v1.5-llava_llama"
    images = [_decoded(encode_image(1, WIDE))]
    original = reference_generate(checkpoints[name], PROMPT, images, 16)
    assert reference_generate(checkpoints[name], PROMPT, images, 16, whole_prompt_tokenization=True) != original
    assert reference_generate(checkpoints[name], PROMPT, images, 16, center_crop=True) != original


def test_original_checkpoints_batch_like_any_other(start_worker, checkpoints):
    name = "llava-v1.6-mistral"
    worker = start_worker(name, limit_model_concurrency=4, **_settings(checkpoints, name))
    cases = [
        (PROMPT, [encode_image(11, WIDE)], 60),
        (PROMPT, [encode_image(12, TALL)], 50),
        (TWO_IMAGES, [encode_image(13, (64, 64)), encode_image(14, (20, 60))], 60),
        (TEXT_ONLY, [], 50),
    ]
    clients = stream_together(worker.url, [greedy(p, i or None, max_new_tokens=n) for p, i, n in cases])
    for client, (prompt, images, tokens) in zip(clients, cases, strict=True):
        assert client.chunks[-1]["text"] == _expected(checkpoints, name, prompt, images, tokens), prompt
    assert worker.worker.engine.peak_batch >= 2, "the requests should have decoded together"
    wait_until(lambda: worker.status()["queue_length"] == 0, 10, "every slot to come back")


@pytest.mark.parametrize(("name", "flag"), [("llava-v1.5-llava_llama", "load_8bit"), ("llava-v1-linear", "load_4bit")])
def test_quantized_original_checkpoints_keep_tower_and_projector_in_full_precision(
    start_worker, checkpoints, name, flag
):
    pytest.importorskip("bitsandbytes")
    worker = start_worker(name, **_settings(checkpoints, name, **{flag: True}))
    model = worker.worker.loaded.model
    quantized = [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    assert quantized and all(n.startswith("model.language_model.") for n in quantized), quantized
    chunks = worker.generate(greedy(PROMPT, [encode_image(1, WIDE)], max_new_tokens=8))
    assert chunks[-1]["error_code"] == 0 and len(chunks[-1]["text"]) > len(PROMPT)


def test_plain_lora_over_a_language_model(start_worker, checkpoints, tmp_path):
    """An adapter with no LLaVA config over a plain Llama: merged as PEFT's merge_and_unload would."""
    adapter = tmp_path / "plain-lora"
    adapter.mkdir()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(checkpoints["llava-v1.5-lora"] / file, adapter / file)
    base = checkpoints["vicuna-base"]
    merged = start_worker("vicuna-base", model_path=str(adapter), model_base=str(base))
    plain = start_worker("vicuna-base")
    assert not merged.worker.loaded.takes_images
    answer = merged.generate(greedy(TEXT_ONLY, max_new_tokens=16))[-1]["text"]
    assert answer == TEXT_ONLY + _lora_reference(base, adapter, TEXT_ONLY, 16)
    assert answer != plain.generate(greedy(TEXT_ONLY, max_new_tokens=16))[-1]["text"]


def _lora_reference(base: Path, adapter: Path, prompt: str, tokens: int) -> str:
    """Greedy decoding of the base with each adapted Linear computing `x W^T + (x A^T B^T) alpha/r`."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    model = LlamaForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    modules = dict(model.named_modules())
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        module = modules[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")]
        module.register_forward_hook(lambda _m, args, out, a=a, b=b: out + (args[0] @ a.T @ b.T) * scale)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(tokens):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return str(tokenizer.decode(ids[0, -tokens:], skip_special_tokens=True))


def _original_copy(checkpoints: dict[str, Path], tmp_path: Path, name: str, **changes: Any) -> Path:
    """A copy of an original checkpoint's config and tokenizer (weights are not read before a refusal)."""
    target = tmp_path / f"{name}-changed"
    target.mkdir()
    for file in checkpoints[name].iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, target / file.name)
    raw = json.loads((checkpoints[name] / "config.json").read_text())
    raw.update(changes)
    (target / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return target


def _refusal(path: Path | str, **settings: Any) -> str:
    with pytest.raises(StartupError) as refused:
        load_model(WorkerConfig(model_path=str(path), device="cpu", **settings))
    return str(refused.value)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model_type": "llava_mpt", "architectures": ["LlavaMptForCausalLM"]}, "'llava_mpt'"),
        ({"s2": True}, "s2 = True"),
        ({"mm_resampler_type": "perceiver"}, "mm_resampler_type = 'perceiver'"),
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "flat"}, "mm_patch_merge_type = 'flat'"),
        ({"image_aspect_ratio": "anyres_max_9", "mm_patch_merge_type": "spatial_unpad"}, "'anyres_max_9'"),
        (
            {
                "model_type": "llava_qwen",
                "architectures": ["LlavaQwenForCausalLM"],
                "image_aspect_ratio": "anyres_max_9",
            },
            "serve its transformers port instead, e.g. --model-path llava-hf/llava-onevision-qwen2-7b-ov-hf",
        ),
        ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type = 'spatial_unpad'"),
        ({"mm_projector_type": "qformer"}, "mm_projector_type = 'qformer'"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature = 'cls'"),
        ({"mm_vision_tower": "/nonexistent/clip"}, "/nonexistent/clip does not exist"),
    ],
)
def test_layouts_that_cannot_be_represented_are_refused_by_name(checkpoints, tmp_path, changes, named):
    path = _original_copy(checkpoints, tmp_path, "llava-v1.5-llava_llama", **changes)
    assert named in _refusal(path)


def test_model_base_is_required_exactly_where_the_original_needs_it(checkpoints, tmp_path):
    assert "--model-base" in _refusal(checkpoints["llava-v1.5-lora"])
    assert "--model-base" in _refusal(checkpoints["llava-v1.5-projector"])
    assert "drop --model-base" in _refusal(
        checkpoints["llava-v1.5-llava_llama"], model_base=str(checkpoints["vicuna-base"])
    )
    assert "neither" in _refusal(checkpoints["llava-1.5"], model_base=str(checkpoints["vicuna-base"]))
    assert "--vision-tower" in _refusal(checkpoints["llava-1.5"], vision_tower=str(checkpoints["clip-tower"]))


def test_a_hub_tower_without_network_points_at_vision_tower(checkpoints, monkeypatch):
    # Offline mode answers at once where the hub client would otherwise retry for half a minute.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    message = _refusal(checkpoints["llava-v1.6-mistral"])
    assert "openai/clip-vit-large-patch14-336" in message and "--vision-tower" in message


def test_pad_images_makes_llava_hf_checkpoints_pad_like_the_original(models, checkpoints):
    """`--pad-images`: the image is centred on the mean colour before the processor, instead of cropped."""
    config = WorkerConfig(model_path=str(checkpoints["llava-1.5"]), device="cpu")
    cropped = models.get(config)
    padded = models.get(WorkerConfig(model_path=str(checkpoints["llava-1.5"]), device="cpu", pad_images=True))
    image = encode_image(1, WIDE)
    pixels = {
        which: prepare_inputs(loaded, PROMPT, (image,), ImageLimits()).tensors["pixel_values"]
        for which, loaded in (("cropped", cropped), ("padded", padded))
    }
    square = Image.new("RGB", (40, 40), (122, 116, 104))
    square.paste(_decoded(image), (0, 5))
    by_hand = cropped.processor.image_processor(square, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels["padded"], by_hand)
    assert not torch.equal(pixels["cropped"], by_hand)
    assert "--pad-images" in _refusal(checkpoints["llava-next"], pad_images=True)


def test_openai_chat_renders_llava_v1_conversations_for_original_checkpoints(start_worker, checkpoints):
    """Original checkpoints carry no chat template: the worker's OpenAI route uses LLaVA's v1 conversation."""
    name = "llava-v1.5-llava_llama"
    worker = start_worker(name)
    image = encode_image(1, WIDE)
    parts = [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
    ]
    body: dict[str, Any] = {
        "model": worker.worker.model_name,
        "messages": [{"role": "user", "content": parts}],
        "temperature": 0,
        "max_tokens": 12,
    }
    answer = requests.post(worker.url + "/v1/chat/completions", json=body, timeout=60).json()
    prompt = f"{LLAVA_SYSTEM_MESSAGE} USER: <image>\nWhat is in the picture? ASSISTANT:"
    expected = _expected(checkpoints, name, prompt, [image], 12)
    assert answer["choices"][0]["message"]["content"] == expected.removeprefix(prompt)


def test_a_checkpoint_missing_a_weight_is_refused_rather_than_filled_at_random(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "llava-v1.5-missing-weight"
    shutil.copytree(checkpoints["llava-v1.5-llava_llama"], target)
    shard = next(target.glob("model-*.safetensors"))
    weights = load_file(str(shard))
    dropped = next(key for key in weights if key.startswith("model.layers."))
    del weights[dropped]
    save_file(weights, str(shard), metadata={"format": "pt"})
    assert f"lacks 1 weight the model needs: model.language_model.{dropped.removeprefix('model.')}" in _refusal(target)
