"""What bare transformers `generate` gives for a request, computed in the test: the yardstick of exactness."""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from PIL import Image

from llava_worker.models.loaded import LoadedModel


def reference_tokens(
    loaded: LoadedModel, prompt: str, images: list[str], max_new_tokens: int, eos_token_id: list[int] | None = None
) -> list[int]:
    """What `model.generate` gives greedily for the same prompt and images, computed in the test
    (stopping at `eos_token_id` when given, else at the generation config's eos)."""
    pil = [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in images]
    if loaded.processor is not None:
        # Clients write <image>; a model family with its own marker (InternVL) gets that instead.
        prompt = prompt.replace("<image>", loaded.processor.image_token)
        # The images of the one prompt, as a list of them: OneVision reads several together at their
        # base view (a flat list would be one image per prompt); the other processors flatten it.
        inputs = loaded.processor(text=[prompt], images=[pil] if pil else None, return_tensors="pt")
    else:
        inputs = loaded.tokenizer(prompt, return_tensors="pt")
    model: Any = loaded.model
    with torch.inference_mode():
        stops = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, **stops)
    tokens: list[int] = output[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens


def reference_text(
    loaded: LoadedModel, prompt: str, images: list[str], max_new_tokens: int, eos_token_id: list[int] | None = None
) -> str:
    tokens = reference_tokens(loaded, prompt, images, max_new_tokens, eos_token_id)
    return str(loaded.tokenizer.decode(tokens, skip_special_tokens=True))
