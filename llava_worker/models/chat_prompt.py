"""Chat messages made into a prompt by the checkpoint's own chat template, with `<image>` per image."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from llava_worker.errors import InvalidRequestError, plural
from llava_worker.models.inputs import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from llava_worker.models.loaded import LoadedModel


def render_prompt(loaded: LoadedModel, messages: list[dict[str, Any]], images: int, videos: int = 0) -> str:
    """The prompt the model's own chat template makes of `messages`, with one `<image>` per image and
    one `<video>` per video."""
    try:
        if loaded.processor is not None:
            prompt = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError) as exc:
        raise InvalidRequestError(f"the model's chat template cannot render these messages: {exc}") from None
    prompt = _without_duplicate_bos(loaded, str(prompt))
    # The worker's inputs take `<image>` and `<video>` and map them to the model's own tokens.
    prompt = _with_placeholders(prompt, loaded.image_token, IMAGE_PLACEHOLDER, images, "image")
    return _with_placeholders(prompt, loaded.video_token, VIDEO_PLACEHOLDER, videos, "video")


def _with_placeholders(prompt: str, model_token: str | None, placeholder: str, count: int, noun: str) -> str:
    """`prompt` with the model's own token written as the worker's `placeholder`; refuses a prompt
    whose placeholders do not match the `count` media the request sent."""
    if model_token and model_token != placeholder:
        prompt = prompt.replace(model_token, placeholder)
    if count and prompt.count(placeholder) != count:
        raise InvalidRequestError(
            f"the chat template made {plural(prompt.count(placeholder), placeholder + ' placeholder')} "
            f"for {plural(count, noun)}; message text must not contain {placeholder!r}"
        )
    return prompt


def _without_duplicate_bos(loaded: LoadedModel, prompt: str) -> str:
    """Drops a BOS the template wrote when tokenizing adds one anyway (Llama-style templates do both)."""
    tokenizer = loaded.tokenizer
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return prompt[len(bos) :]
    return prompt


#: Assistant text no tokenizer merges with what follows it.
_TURN_MARK = "\u2063llava-worker-turn-end\u2063"


def turn_end_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """The special token the model's chat template writes right after an assistant's message
    (`<|eot_id|>`, `<|im_end|>`, `</s>`), if any: the model ends its turn with it, whatever the eos
    of its tokenizer and generation config says (llama3-llava-next: eos `<|end_of_text|>`, turns end
    with `<|eot_id|>`). Empty when the model has no chat template, or it writes no such token."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": _TURN_MARK}]},
    ]
    tokenizer = loaded.tokenizer
    try:
        owner: Any = loaded.processor if loaded.processor is not None else tokenizer
        rendered = str(owner.apply_chat_template(messages, tokenize=False))
    except Exception:  # no template, or one that rejects an assistant turn: nothing to learn from it
        return frozenset()
    at = rendered.find(_TURN_MARK)
    if at < 0:
        return frozenset()
    after = rendered[at + len(_TURN_MARK) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return frozenset(int(token) for token in ids if token in special)


def chat_family(loaded: LoadedModel) -> str | None:
    """The prompt style of the checkpoint's own chat template: `llama3` (header tokens around roles),
    `chatml` (`<|im_start|>`), or None for anything else (LLaVA's v1 and the like)."""
    owner: Any = loaded.processor if loaded.processor is not None else loaded.tokenizer
    template = getattr(owner, "chat_template", None) or getattr(loaded.tokenizer, "chat_template", None)
    text = template if isinstance(template, str) else str(template or "")
    if "<|start_header_id|>" in text:
        return "llama3"
    if "<|im_start|>" in text:
        return "chatml"
    return None
