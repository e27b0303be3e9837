"""Chat messages made into a prompt by the checkpoint's own chat template, with `<image>` per image."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from llava_worker.errors import InvalidRequestError, plural
from llava_worker.models.inputs import IMAGE_PLACEHOLDER
from llava_worker.models.loaded import LoadedModel


def render_prompt(loaded: LoadedModel, messages: list[dict[str, Any]], images: int) -> str:
    """The prompt the model's own chat template makes of `messages`, with one `<image>` per image."""
    try:
        if loaded.processor is not None:
            prompt = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError) as exc:
        raise InvalidRequestError(f"the model's chat template cannot render these messages: {exc}") from None
    prompt = _without_duplicate_bos(loaded, str(prompt))
    # The worker's inputs take `<image>` and map it to the model's own image token.
    image_token = loaded.image_token
    if image_token and image_token != IMAGE_PLACEHOLDER:
        prompt = prompt.replace(image_token, IMAGE_PLACEHOLDER)
    if images and prompt.count(IMAGE_PLACEHOLDER) != images:
        raise InvalidRequestError(
            f"the chat template made {plural(prompt.count(IMAGE_PLACEHOLDER), IMAGE_PLACEHOLDER + ' placeholder')} "
            f"for {plural(images, 'image')}; message text must not contain {IMAGE_PLACEHOLDER!r}"
        )
    return prompt


def _without_duplicate_bos(loaded: LoadedModel, prompt: str) -> str:
    """Drops a BOS the template wrote when tokenizing adds one anyway (Llama-style templates do both)."""
    tokenizer = loaded.tokenizer
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return prompt[len(bos) :]
    return prompt
