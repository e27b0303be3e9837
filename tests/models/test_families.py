"""The LLaVA family as served today (tiny checkpoints of each shape, `testing/tiny_families.py`): each
one's turn ends where its chat template ends a turn, whatever its eos says, and with `stop: null`."""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from PIL import Image

from llava_worker.config import WorkerConfig
from llava_worker.models.chat_prompt import turn_end_token_ids
from llava_worker.models.loader import load_model
from llava_worker.worker import ModelWorker
from tests.support.kinds import needs_torchvision
from tests.support.payloads import encode_image
from tests.support.reference import reference_tokens
from tests.support.servers import ModelCache, RunningWorker, free_port


def loaded_model(checkpoints: dict[str, Path], models: ModelCache, kind: str) -> Any:
    return models.get(WorkerConfig(model_path=str(checkpoints[kind]), device="cpu", no_register=True))


@pytest.mark.parametrize(
    ("kind", "turn_end"),
    [
        ("llava-1.5", "</s>"),
        ("llava-next-llama3", "<|eot_id|>"),
        ("llava-next-chatml", "<|im_end|>"),
        ("llava-interleave", "<|im_end|>"),
        pytest.param("llava-onevision", "<|im_end|>", marks=needs_torchvision),
    ],
)
def test_the_end_of_turn_token_is_read_from_the_chat_template(checkpoints, models, kind, turn_end):
    loaded = loaded_model(checkpoints, models, kind)
    assert turn_end_token_ids(loaded) == {loaded.tokenizer.convert_tokens_to_ids(turn_end)}


def test_llama3_next_ends_its_turn_at_eot_although_its_eos_is_end_of_text(checkpoints):
    """llama3-llava-next's eos is `<|end_of_text|>`; its turns end with `<|eot_id|>`. A worker that
    stopped at the eos alone ran every answer to `max_new_tokens`. Here the tiny model is made to
    write `<|eot_id|>` a few tokens in; the worker stops there, for `stop: null` as for no stop."""
    config = WorkerConfig(model_path=str(checkpoints["llava-next-llama3"]), device="cpu", no_register=True)
    loaded = load_model(config)  # its own copy: the weights are changed below
    tokenizer = loaded.tokenizer
    eot, eos = tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id
    assert isinstance(eot, int) and isinstance(eos, int)
    assert loaded.model.generation_config.eos_token_id == eos != eot
    prompt = "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
    prompt += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    images = [encode_image(7)]
    plain = reference_tokens(loaded, prompt, images, 12)
    # The fourth token's row, doubled, becomes <|eot_id|>'s: the model now ends its turn about there.
    head = loaded.model.get_output_embeddings()
    with torch.no_grad():
        head.weight[eot] = 2 * head.weight[plain[3]]
    stopped = reference_tokens(loaded, prompt, images, 12, eos_token_id=[eos, eot])
    assert stopped[-1] == eot and len(stopped) < 12, "the rigged model writes <|eot_id|> early"
    assert eot not in reference_tokens(loaded, prompt, images, len(stopped) - 1)
    expected = str(tokenizer.decode(stopped[:-1], skip_special_tokens=True))

    port = free_port()
    worker = RunningWorker(ModelWorker(replace(config, worker_address=f"http://127.0.0.1:{port}"), loaded), port)
    worker.start()
    try:
        for stop in ({"stop": None}, {}):
            payload = {"prompt": prompt, "images": images, "temperature": 0, "max_new_tokens": 12, **stop}
            chunks = worker.generate(payload)
            assert chunks[-1] == {"text": prompt + expected, "error_code": 0}
            assert requests.post(worker.url + "/worker_generate", json=payload, timeout=60).json()["finish_reason"] == (
                "stop"
            )
    finally:
        worker.stop()


FAMILY_PROMPTS = {
    "llava-next-llama3": "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llava-next-chatml": "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
    "llava-interleave": "<|im_start|>user\n<image>\n<image>\nCompare them.<|im_end|>\n<|im_start|>assistant\n",
    "llava-onevision": "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
    "llava-next-video": "USER: <image>\nWhat is it? ASSISTANT:",
}


@pytest.mark.parametrize(
    "kind",
    [
        "llava-next-llama3",
        "llava-next-chatml",
        "llava-interleave",
        pytest.param("llava-onevision", marks=needs_torchvision),
        pytest.param("llava-next-video", marks=needs_torchvision),
    ],
)
def test_the_length_budget_counts_each_familys_image_tokens_exactly(start_worker, kind):
    """`usage` reports the processor's own count, and a prompt one token short of the context gets
    exactly one new token, so the image tokens are counted neither short nor long."""
    prompt = FAMILY_PROMPTS[kind]
    images = [encode_image(seed, (64 + 16 * seed, 40)) for seed in range(prompt.count("<image>"))]
    probe = start_worker(kind)
    loaded = probe.worker.loaded
    pil = [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in images]
    count = int(loaded.processor(text=[prompt], images=[pil], return_tensors="pt")["input_ids"].shape[-1])
    assert count > len(loaded.tokenizer(prompt)["input_ids"]) + 10
    payload: dict[str, Any] = {
        "prompt": prompt,
        "images": images,
        "temperature": 0,
        "max_new_tokens": 50,
        "echo": False,
    }
    worker = start_worker(kind, max_prompt_tokens=count)  # accepted at exactly its length
    usage = requests.post(worker.url + "/worker_generate", json=payload, timeout=60).json()["usage"]
    assert usage["prompt_tokens"] == count
    tight = start_worker(kind, max_prompt_tokens=count - 1)
    refused = requests.post(tight.url + "/worker_generate", json=payload, timeout=60).json()
    assert refused["error_code"] != 0 and f"the prompt is {count} tokens long" in refused["text"]
