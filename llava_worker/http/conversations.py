"""FastChat conversation templates for the served model family (`/worker_get_conv_template`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only a type here: the original-format input path imports this module while the loader loads.
    from llava_worker.models.loader import LoadedModel

#: LLaVA-1.5's system message (its `conv_llava_v1`; FastChat's `vicuna_v1.1` has the same format, "user" for "human").
LLAVA_SYSTEM_MESSAGE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

#: LLaVA's v1 conversation (`conv_llava_v1`) as a chat template, for checkpoints that ship none:
#: `SYSTEM USER: <image>\nquestion ASSISTANT: answer</s>USER: ... ASSISTANT:`, images first in
#: their message as LLaVA's UI puts them.
LLAVA_V1_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + LLAVA_SYSTEM_MESSAGE.replace("'", "\\'") + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in turns -%}"
    "{{- 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] in ('image', 'image_url') -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- ' ' if message['role'] == 'user' else eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# FastChat's SeparatorStyle enum, by value.
_ADD_COLON_TWO = 2
_LLAMA2 = 7
_CHATML = 9


def _template(name: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "system_template": "{system_message}",
        "system_message": "",
        "roles": ["USER", "ASSISTANT"],
        "messages": [],
        "offset": 0,
        "sep_style": _ADD_COLON_TWO,
        "sep": " ",
        "sep2": "</s>",
        "stop_str": None,
        "stop_token_ids": None,
    }
    base.update(fields)
    return base


def conversation_template(loaded: LoadedModel) -> dict[str, Any]:
    """The template FastChat's API server should build prompts with for this model.

    LLaVA-1.5/NeXT-vicuna and other Llama-family models take LLaVA's v1 prompt (the only style in
    which FastChat places images); Mistral- and Qwen-based models get their own chat formats.
    """
    text_type = loaded.model.config.get_text_config().model_type
    if text_type == "mistral" and not loaded.takes_images:
        return _template(
            "mistral",
            system_template="[INST] {system_message}\n",
            roles=["[INST]", "[/INST]"],
            sep_style=_LLAMA2,
            sep=" ",
            sep2="</s>",
        )
    if text_type in ("qwen2", "qwen3") and not loaded.takes_images:
        return _template(
            "chatml",
            system_template="<|im_start|>system\n{system_message}",
            system_message="You are a helpful assistant.",
            roles=["<|im_start|>user", "<|im_start|>assistant"],
            sep_style=_CHATML,
            sep="<|im_end|>",
            sep2=None,
            stop_str="<|im_end|>",
        )
    return _template("llava_v1", system_message=LLAVA_SYSTEM_MESSAGE)
