"""Request payloads the tests send: prompts, images, greedy requests."""

from __future__ import annotations

import base64
import io
from typing import Any

from llava_worker.testing.tiny import make_test_image

PROMPT_1 = "USER: <image>\nWhat is shown here? ASSISTANT:"
PROMPT_2 = "USER: <image>\nCompare it with <image>\nplease. ASSISTANT:"
TEXT_PROMPT = "USER: Tell me a story about the sea. ASSISTANT:"


def encode_image(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    make_test_image(seed, size).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def greedy(prompt: str, images: list[str] | None = None, max_new_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": "m",
        "prompt": prompt,
        "temperature": 0,
        "max_new_tokens": max_new_tokens,
    }
    if images is not None:
        payload["images"] = images
    payload.update(extra)
    return payload
