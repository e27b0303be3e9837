"""InternVL-Chat-1.0 checkpoints (the LLaVA layout with an InternViT-6B tower): served like the original
LLaVA ones, their greedy answers equal to an independent computation of InternVL's copy of the worker
(tests/support/internvit_reference.py), and the towers it cannot serve refused by name."""

from __future__ import annotations

import base64
import builtins
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from llava_worker.config import WorkerConfig
from llava_worker.errors import StartupError
from llava_worker.models.images import ImageLimits
from llava_worker.models.inputs import prepare_inputs
from llava_worker.models.loader import load_model
from tests.support.internvit_reference import CONTRAST_IMAGE, CONTRAST_PROMPT, CONTRAST_TOKENS
from tests.support.original_reference import reference_generate, reference_text
from tests.support.payloads import encode_image, greedy
from tests.support.servers import stream_together, wait_until

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO_IMAGES = "USER: <image>\nand <image>\nCompare the two pictures. ASSISTANT:"
TEXT_ONLY = "USER: Tell me about the red boat. ASSISTANT:"
WIDE, TALL = (40, 30), (30, 50)
#: The request on which each likely porting mistake changes the answer (see the contrast test).
CONTRAST = (CONTRAST_PROMPT, [encode_image(*CONTRAST_IMAGE)], CONTRAST_TOKENS)

#: checkpoint -> (its tower, image tokens per image: the crop's patches, not the native size's).
CHATS = {
    "internvl-chat-7b": ("internvit-224-tower", 12 * 12),
    "internvl-chat-13b-448px": ("internvit-448-tower", 8 * 8),
}


def _decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _expected(checkpoint: Path, prompt: str, images: list[str], tokens: int, **kw: Any) -> str:
    """prompt + the reference's greedy continuation, as the worker streams it."""
    ids = reference_generate(checkpoint, prompt, [_decoded(i) for i in images], tokens, **kw)
    return prompt + reference_text(checkpoint, ids)


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_answers_equal_internvl_chat_computed_independently(start_worker, checkpoints, name):
    worker = start_worker(name)
    cases = [(PROMPT, [encode_image(1, WIDE)], 16), (TWO_IMAGES, [encode_image(2, TALL), encode_image(3, WIDE)], 16)]
    cases += [(TEXT_ONLY, [], 16), CONTRAST]
    answers = []
    for prompt, images, tokens in cases:
        chunks = worker.generate(greedy(prompt, images or None, max_new_tokens=tokens))
        assert chunks[-1]["error_code"] == 0, chunks[-1]
        expected = _expected(checkpoints[name], prompt, images, tokens)
        assert chunks[-1]["text"] == expected, (name, prompt)
        answers.append(expected)
    other_image = worker.generate(greedy(PROMPT, [encode_image(7, WIDE)], max_new_tokens=16))[-1]["text"]
    assert other_image != answers[0], "the answer should depend on the image"


@pytest.mark.parametrize(
    "variant",
    ["pad-colour-off-by-one", "per-head-qk-norm", "layernorm", "select-layer-3", "bilinear-interpolation"],
)
def test_the_comparison_would_catch_each_likely_mistake(checkpoints, variant):
    """Each variant of the reference makes one mistake a port of InternViT-6B could make; each changes
    the answer to a request the worker is compared on above, so a worker that made it would fail there."""
    checkpoint = checkpoints["internvl-chat-7b"]
    prompt, images, tokens = CONTRAST
    assert _expected(checkpoint, prompt, images, tokens, variant=variant) != _expected(
        checkpoint, prompt, images, tokens
    ), variant


def test_the_tower_comes_from_mm_vision_tower_or_the_flag(start_worker, checkpoints, tmp_path):
    """--vision-tower names a copy of the tower: the same answer; the checkpoint's own tower copy and its
    stray mm_projector.bin are ignored as the original ignores them (the reference ignores them)."""
    name = "internvl-chat-7b"
    tower, _ = CHATS[name]
    copy = tmp_path / "copies" / checkpoints[tower].name
    shutil.copytree(checkpoints[tower], copy)
    worker = start_worker(name, vision_tower=str(copy))
    images = [encode_image(4, TALL)]
    assert worker.generate(greedy(PROMPT, images, max_new_tokens=12))[-1]["text"] == _expected(
        checkpoints[name], PROMPT, images, 12
    )


@pytest.mark.parametrize("name", list(CHATS))
def test_the_length_budget_counts_the_real_image_tokens(models, checkpoints, name):
    loaded = models.get(WorkerConfig(model_path=str(checkpoints[name]), device="cpu", no_register=True))
    limits = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)
    inputs = prepare_inputs(loaded, TWO_IMAGES, (encode_image(1, WIDE), encode_image(2, TALL)), limits)
    image_tokens = int((inputs.input_ids == loaded.processor.image_token_id).sum())
    # The original's budget reads the native size (64 for the 224 tower); the worker counts what the
    # model really receives, and the prompt's length includes them.
    assert image_tokens == 2 * CHATS[name][1]
    assert inputs.prompt_tokens == inputs.input_ids.shape[-1] > image_tokens


def test_internvl_chat_batches_like_any_other(start_worker, checkpoints):
    name = "internvl-chat-7b"
    worker = start_worker(name, limit_model_concurrency=4)
    cases = [
        (PROMPT, [encode_image(11, WIDE)], 40),
        (PROMPT, [encode_image(12, TALL)], 30),
        (TWO_IMAGES, [encode_image(13, (64, 64)), encode_image(14, (20, 60))], 40),
        (TEXT_ONLY, [], 30),
    ]
    clients = stream_together(worker.url, [greedy(p, i or None, max_new_tokens=n) for p, i, n in cases])
    for client, (prompt, images, tokens) in zip(clients, cases, strict=True):
        assert client.chunks[-1]["text"] == _expected(checkpoints[name], prompt, images, tokens), prompt
    assert worker.worker.engine.peak_batch >= 2, "the requests should have decoded together"
    wait_until(lambda: worker.status()["queue_length"] == 0, 10, "every slot to come back")


@pytest.mark.parametrize(
    ("name", "flag"), [("internvl-chat-7b", "load_8bit"), ("internvl-chat-13b-448px", "load_4bit")]
)
def test_quantized_internvl_chat_keeps_its_tower_in_full_precision(start_worker, checkpoints, name, flag):
    pytest.importorskip("bitsandbytes")
    worker = start_worker(name, **{flag: True})
    model = worker.worker.loaded.model
    tower_linears = [m for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.Linear)]
    assert tower_linears and all(type(m) is torch.nn.Linear for m in tower_linears)
    language_linears = [m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    assert language_linears and all(type(m) is not torch.nn.Linear for m in language_linears)
    chunks = worker.generate(greedy(PROMPT, [encode_image(1, WIDE)], max_new_tokens=8))
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].startswith(PROMPT)


def test_a_tower_config_is_read_as_data_never_as_remote_code(checkpoints, monkeypatch, caplog):
    """transformers asks on the terminal before it runs a repository's code; nothing here may ask."""

    def no_prompt(*_: Any) -> str:
        raise AssertionError("the loader asked a question on the terminal")

    monkeypatch.setattr(builtins, "input", no_prompt)
    with caplog.at_level(logging.WARNING):
        load_model(WorkerConfig(model_path=str(checkpoints["internvl-chat-13b-448px"]), device="cpu"))
    assert "trust_remote_code" not in caplog.text


def _with_tower(checkpoints: dict[str, Path], tmp_path: Path, tower_name: str, model_type: str) -> Path:
    """A copy of the 7B chat checkpoint whose mm_vision_tower is a directory named `tower_name`."""
    tower = tmp_path / tower_name
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 32}))
    chat = tmp_path / "chat"
    shutil.copytree(checkpoints["internvl-chat-7b"], chat)
    config = json.loads((chat / "config.json").read_text())
    config["mm_vision_tower"] = str(tower)
    (chat / "config.json").write_text(json.dumps(config))
    return chat


@pytest.mark.parametrize(
    ("tower_name", "model_type", "refusal"),
    [
        ("EVA02-CLIP-bigE-14", "evaclip", "is an EVA-CLIP tower"),
        ("InternVL-14B-224px", "internvl", "is an InternVL-14B tower"),
        ("some-other-tower", "siglip_vision_model", "is a 'siglip_vision_model' model"),
    ],
)
def test_towers_it_cannot_serve_are_refused_naming_the_field_and_value(
    checkpoints, tmp_path, tower_name, model_type, refusal
):
    chat = _with_tower(checkpoints, tmp_path, tower_name, model_type)
    with pytest.raises(StartupError) as refused:
        load_model(WorkerConfig(model_path=str(chat), device="cpu"))
    message = str(refused.value)
    assert refusal in message and "mm_vision_tower" in message and tower_name in message
