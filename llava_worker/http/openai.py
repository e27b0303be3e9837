"""OpenAI-compatible routes (`/v1/models`, `/v1/chat/completions`) over the worker's own queue and engine.

A chat request is validated at the edge (`openai_requests.py`), rendered with the model's own chat
template into plain GenerateParams, and then runs through `ModelWorker.generate_stream` like any
other request: same admission queue, same limits, same metrics. Every failure leaves through
`failures.openai_error`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llava_worker.chunks import KEEPALIVE, StreamChunk
from llava_worker.errors import InvalidRequestError, ShuttingDownError, outcome_of
from llava_worker.http.body import parse_body, read_body
from llava_worker.http.disconnects import ClientDisconnected, gone_response, while_connected
from llava_worker.http.failures import new_request_id, openai_error, openai_error_response
from llava_worker.http.openai_requests import (
    ChatCompletionRequest,
    RequestError,
    chat_messages,
    check_image_urls,
    check_video_urls,
    generate_params,
    parse_chat_request,
)
from llava_worker.http.remote_images import RemoteImages
from llava_worker.protocol import GenerateParams, usage

if TYPE_CHECKING:
    from llava_worker.worker import ModelWorker

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Generation and the answer: one chat.completion, or server-sent chat.completion.chunk events.


@dataclass(frozen=True)
class _Reply:
    """What every object of one answer shares."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def completion(self, last: StreamChunk, finish_reason: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": last.text},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage(last.prompt_tokens, last.completion_tokens),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event(self._chunk_object([choice], usage=None))

    def usage_chunk(self, last: StreamChunk) -> str:
        return _event(self._chunk_object([], usage=usage(last.prompt_tokens, last.completion_tokens)))

    def _chunk_object(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage  # OpenAI sends `"usage": null` on every chunk but the last when asked
        return body


def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _finish_reason(last: StreamChunk | None) -> str:
    if last is None or last.finish_reason == "cancelled":
        # Only a shutdown cancels a request that is still being read, and it leaves no whole answer.
        raise ShuttingDownError()
    return "length" if last.finish_reason == "length" else "stop"


async def _complete(first: StreamChunk, chunks: AsyncGenerator[StreamChunk, None], reply: _Reply) -> dict[str, Any]:
    last = None if first is KEEPALIVE else first
    async for chunk in chunks:
        if chunk is not KEEPALIVE:
            last = chunk
    finish_reason = _finish_reason(last)
    assert last is not None
    return reply.completion(last, finish_reason)


async def _events(
    first: StreamChunk, chunks: AsyncGenerator[StreamChunk, None], reply: _Reply, request_id: str
) -> AsyncIterator[str]:
    """The SSE body; a failure midway becomes an error event, and `[DONE]` always ends it."""
    async with contextlib.aclosing(chunks):
        yield reply.chunk({"role": "assistant", "content": ""})
        sent, last = "", None
        try:
            pending: StreamChunk | None = first
            while pending is not None:
                if pending is KEEPALIVE:
                    # An SSE comment: clients ignore it, and it keeps proxies' read timeouts at bay.
                    yield ": keepalive\n\n"
                else:
                    last = pending
                    # The text is cumulative and only grows, so the new part is what follows the old.
                    if len(pending.text) > len(sent):
                        yield reply.chunk({"content": pending.text[len(sent) :]})
                        sent = pending.text
                pending = await anext(chunks, None)
            finish_reason = _finish_reason(last)
        except Exception as exc:
            yield _event(openai_error(exc, request_id)[1])
        else:
            yield reply.chunk({}, finish_reason)
            if reply.include_usage and last is not None:
                yield reply.usage_chunk(last)
        yield _event("[DONE]")


def _model_not_found(name: str, served: str) -> RequestError:
    return RequestError(
        f"the model {name!r} does not exist; this worker serves {served!r}",
        param="model",
        code="model_not_found",
        status=404,
    )


def openai_router(worker: ModelWorker, remote_images: RemoteImages) -> APIRouter:
    """The OpenAI-compatible routes of `worker`; `remote_images` fetches the images chats name by URL."""
    router = APIRouter(prefix="/v1")
    started = int(time.time())

    def model_card() -> dict[str, Any]:
        return {"id": worker.model_name, "object": "model", "created": started, "owned_by": "llava-worker"}

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{name:path}")
    async def retrieve_model(name: str) -> Response:
        if name != worker.model_name:
            return openai_error_response(_model_not_found(name, worker.model_name), new_request_id())
        return JSONResponse(model_card())

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _chat_completion(request, worker, remote_images)

    return router


async def _chat_completion(request: Request, worker: ModelWorker, remote_images: RemoteImages) -> Response:
    request_id = new_request_id()
    # 1. Refuse what cannot run before it takes a slot, as the worker's own routes do.
    try:
        if worker.draining:
            raise ShuttingDownError()
        chat = await parse_body(
            await read_body(request, worker.config.max_request_bytes, worker.config.body_timeout), parse_chat_request
        )
        if chat.model != worker.model_name:
            raise _model_not_found(chat.model, worker.model_name)
        params = await _params_of(chat, worker, remote_images, request)
    except ClientDisconnected:
        worker.metrics.count("cancelled")
        return gone_response()
    except Exception as exc:
        worker.metrics.count(outcome_of(exc))
        return openai_error_response(exc, request_id)
    reply = _Reply(
        id=f"chatcmpl-{request_id}",
        created=int(time.time()),
        model=worker.model_name,
        include_usage=bool(chat.stream_options and chat.stream_options.include_usage),
    )
    # 2. Wait for the first chunk: bad images, an over-long prompt or a full context are found
    #    before the first token, so they still get an HTTP error status instead of a stream. The
    #    chunks are closed explicitly, so the request leaves the engine at once, not when collected.
    chunks = worker.generate_stream(params, request_id)
    try:
        first = await while_connected(request, anext(chunks))
        if first.finish_reason == "exceeds_context":
            raise RequestError(
                f"the prompt is {first.prompt_tokens} tokens long (image tokens included), which leaves "
                f"no room for new tokens in the model's context of {worker.context_length} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        # 3. Stream, or gather the whole answer.
        if chat.stream:
            events = _events(first, chunks, reply, request_id)
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        async with contextlib.aclosing(chunks):
            return JSONResponse(await while_connected(request, _complete(first, chunks, reply)))
    except ClientDisconnected:
        await chunks.aclose()
        return gone_response()
    except Exception as exc:
        await chunks.aclose()
        return openai_error_response(exc, request_id)


async def _params_of(
    chat: ChatCompletionRequest, worker: ModelWorker, remote_images: RemoteImages, request: Request
) -> GenerateParams:
    """The chat's GenerateParams: URLs checked, the prompt rendered, then remote images fetched (for as
    long as the client stays)."""
    config = worker.config
    chat_content = chat_messages(chat, worker.takes_images, worker.takes_videos)
    urls = chat_content.image_urls
    check_image_urls(urls, config.max_images, config.allow_remote_images)
    check_video_urls(chat_content.video_urls, config.max_videos)
    try:
        prompt = await worker.render_chat_prompt(chat_content.messages, len(urls), len(chat_content.video_urls))
    except InvalidRequestError as exc:
        raise RequestError(str(exc), param="messages") from None
    images = await while_connected(request, remote_images.fetch(urls))
    return generate_params(chat, prompt, images, tuple(chat_content.video_urls))
