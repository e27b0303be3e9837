"""8-bit and 4-bit loading with bitsandbytes on the CPU: only the language model is quantized."""

from __future__ import annotations

import pytest

from tests.support.payloads import PROMPT_1, TEXT_PROMPT, encode_image

pytest.importorskip("bitsandbytes")


def _quantized_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__module__.startswith("bitsandbytes")]


@pytest.mark.parametrize("flag", ["load_8bit", "load_4bit"])
def test_quantized_llava_keeps_vision_tower_and_projector_in_full_precision(start_worker, flag):
    worker = start_worker("llava-1.5", **{flag: True})
    quantized = _quantized_modules(worker.worker.loaded.model)
    assert quantized, "the language model should be quantized"
    assert all(name.startswith("model.language_model.") for name in quantized), quantized
    chunks = worker.generate({"prompt": PROMPT_1, "images": [encode_image(1)], "temperature": 0, "max_new_tokens": 8})
    assert chunks[-1]["error_code"] == 0
    assert len(chunks[-1]["text"]) > len(PROMPT_1)


@pytest.mark.parametrize("flag", ["load_8bit", "load_4bit"])
def test_quantized_text_only_model_serves(start_worker, flag):
    worker = start_worker("text-only", **{flag: True})
    assert _quantized_modules(worker.worker.loaded.model)
    chunks = worker.generate({"prompt": TEXT_PROMPT, "temperature": 0, "max_new_tokens": 8})
    assert chunks[-1]["error_code"] == 0
    assert len(chunks[-1]["text"]) > len(TEXT_PROMPT)
