"""The LLaVA and FastChat dialects of the worker protocol: `\\0`-delimited chunks, FastChat's extra
fields and `/worker_generate` body, and the conversation templates of `/worker_get_conv_template`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from llava_worker.chunks import KEEPALIVE, StreamChunk
from llava_worker.http.failures import failure_chunk
from llava_worker.models.chat_template import LLAVA_SYSTEM_MESSAGE
from llava_worker.protocol import CHUNK_DELIMITER, GenerateParams, chunk_body, encode_chunk, usage

if TYPE_CHECKING:
    from llava_worker.worker import ModelWorker


async def stream_bytes(worker: ModelWorker, params: GenerateParams, request_id: str) -> AsyncIterator[bytes]:
    """The body of `/worker_generate_stream`; a failure becomes one final chunk with error code 1."""
    previous = None
    async for chunk in _chunks_or_failure(worker, params, request_id):
        if chunk is KEEPALIVE:
            yield CHUNK_DELIMITER  # clients skip empty chunks; it keeps their read timeouts at bay
            continue
        # The last chunk is sent even without new text when it carries FastChat's finish reason;
        # otherwise a chunk that adds no text would be a repeat.
        if chunk.text != previous or (params.extended and chunk.finish_reason):
            previous = chunk.text
            yield encode_chunk(*_wire(chunk, params))


async def final_body(worker: ModelWorker, params: GenerateParams, request_id: str) -> dict[str, Any]:
    """FastChat's `/worker_generate`: the final chunk of the stream, as one JSON object."""
    last = StreamChunk("")
    async for chunk in _chunks_or_failure(worker, params, request_id):
        if chunk is not KEEPALIVE:
            last = chunk
    text, error_code, extra = _wire(last, replace(params, extended=True))
    return chunk_body(text, error_code, extra)


async def _chunks_or_failure(
    worker: ModelWorker, params: GenerateParams, request_id: str
) -> AsyncGenerator[StreamChunk, None]:
    # Closed with this generator, so a client that leaves takes its request out of the engine at once.
    async with contextlib.aclosing(worker.generate_stream(params, request_id)) as chunks:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:
            yield failure_chunk(exc, request_id)


def _wire(chunk: StreamChunk, params: GenerateParams) -> tuple[str, int, dict[str, Any] | None]:
    """Text, error code and (for FastChat) the extra fields of one chunk."""
    error_code = (chunk.error_code or 1) if chunk.finish_reason == "error" else 0
    if not params.extended:
        return chunk.text, error_code, None
    # FastChat knows "stop" and "length"; running out of context is a length limit too.
    reason = {"exceeds_context": "length", "cancelled": "stop"}.get(chunk.finish_reason or "", chunk.finish_reason)
    extra = {"usage": usage(chunk.prompt_tokens, chunk.completion_tokens), "finish_reason": reason}
    return chunk.text, error_code, extra


# FastChat's SeparatorStyle enum, by value (its pip release; newer sources number some differently).
_ADD_COLON_TWO = 2
_NO_COLON_SINGLE = 4
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


def conversation_template(worker: ModelWorker) -> dict[str, Any]:
    """The template FastChat's API server should build prompts with for this model: the one whose
    prompts equal the checkpoint's own chat template's.

    Llama-3 and ChatML checkpoints (llama3-llava-next, v1.6-34b, Interleave, OneVision) get their own
    style, whatever their tower; LLaVA-1.5/NeXT-vicuna and other Llama-family models LLaVA's v1
    prompt, Mistral- and Qwen-based text models their chat formats. FastChat places images in v1
    prompts only: image chats with the other styles go through the worker's `/v1/chat/completions`.
    """
    family, text_model_type, takes_images = worker.chat_family, worker.text_model_type, worker.takes_images
    if family == "llama3":
        return _template(
            "llama-3",
            # FastChat's pip release has no Llama-3 style; "no colon, single separator" writes the same.
            system_template="<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
            roles=["<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"],
            sep_style=_NO_COLON_SINGLE,
            sep="<|eot_id|>",
            sep2=None,
            stop_str="<|eot_id|>",
            stop_token_ids=worker.end_token_ids,
        )
    if family == "chatml" or (text_model_type in ("qwen2", "qwen3") and not takes_images):
        qwen = text_model_type in ("qwen2", "qwen3")
        return _template(
            "qwen-7b-chat" if qwen else "chatml_direct",
            system_template="<|im_start|>system\n{system_message}",
            # Qwen's own default, and LLaVA's chatml_direct (v1.6-34b) one.
            system_message="You are a helpful assistant." if qwen else "Answer the questions.",
            roles=["<|im_start|>user", "<|im_start|>assistant"],
            sep_style=_CHATML,
            sep="<|im_end|>",
            sep2=None,
            stop_str="<|im_end|>",
            stop_token_ids=worker.end_token_ids,
        )
    if text_model_type == "mistral" and not takes_images:
        return _template(
            "mistral",
            system_template="[INST] {system_message}\n",
            roles=["[INST]", "[/INST]"],
            sep_style=_LLAMA2,
            sep=" ",
            sep2="</s>",
        )
    return _template("llava_v1", system_message=LLAVA_SYSTEM_MESSAGE)
