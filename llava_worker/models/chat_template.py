"""LLaVA's v1 conversation as a chat template: a leaf, so the model layer and the HTTP edge share it."""

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
