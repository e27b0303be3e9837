"""OpenAI-compatible routes (`/v1/models`, `/v1/chat/completions`) over the worker's own queue and engine.

A chat request is validated at the edge and rendered with the model's own chat template into plain
GenerateParams (`openai_requests.py`), and then runs through `ModelWorker.generate_stream` like any other request:
same admission queue, same limits, same metrics. Every failure leaves through `_error_response`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llava_worker.errors import ImageError, InvalidRequestError, WorkerError
from llava_worker.http.body import read_body
from llava_worker.http.disconnects import ClientDisconnected, gone_response, while_connected
from llava_worker.http.openai_requests import RequestError, generate_params, parse_chat_request
from llava_worker.protocol import GenerateParams, usage
from llava_worker.worker import KEEPALIVE, ModelWorker, ShuttingDownError, StreamChunk, describe_failure, new_request_id

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


async def _counted(worker: ModelWorker, params: GenerateParams, request_id: str) -> AsyncGenerator[StreamChunk, None]:
    """`worker.generate_stream`, counted in the metrics as `/worker_generate_stream` counts it."""
    outcome = "cancelled"
    # Closed explicitly when this is, so the request leaves the engine at once, not when collected.
    stream = cast("AsyncGenerator[StreamChunk, None]", worker.generate_stream(params, request_id))
    try:
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                outcome = chunk.finish_reason or outcome
                yield chunk
    except Exception as exc:
        outcome = "rejected" if isinstance(exc, ShuttingDownError) else "error"
        raise
    finally:
        worker.metrics.count(outcome)


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
            yield _event(_error_body(exc, request_id)[1])
        else:
            yield reply.chunk({}, finish_reason)
            if reply.include_usage and last is not None:
                yield reply.usage_chunk(last)
        yield _event("[DONE]")


# Errors: every failure of this API is mapped to OpenAI's error object here, and only here.


def _error_body(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any]]:
    message = describe_failure(exc, request_id)
    param: str | None = None
    code: str | None = None
    if isinstance(exc, RequestError):
        status, kind, param, code = exc.status, "invalid_request_error", exc.param, exc.code
    elif isinstance(exc, ShuttingDownError):
        status, kind, code = 503, "server_error", "shutting_down"
    elif isinstance(exc, (InvalidRequestError, ImageError)):
        status, kind = 400, "invalid_request_error"
    else:
        status, kind = 500, "server_error"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(exc: BaseException, request_id: str) -> JSONResponse:
    status, body = _error_body(exc, request_id)
    return JSONResponse(body, status_code=status)


def _model_not_found(name: str, served: str) -> RequestError:
    return RequestError(
        f"the model {name!r} does not exist; this worker serves {served!r}",
        param="model",
        code="model_not_found",
        status=404,
    )


def openai_router(worker: ModelWorker) -> APIRouter:
    """The OpenAI-compatible routes of `worker`."""
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
            return _error_response(_model_not_found(name, worker.model_name), new_request_id())
        return JSONResponse(model_card())

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        request_id = new_request_id()
        # 1. Refuse what cannot run before it takes a slot, as the worker's own routes do.
        try:
            if worker.draining:
                raise ShuttingDownError()
            chat = parse_chat_request(await read_body(request, worker.config.max_request_bytes))
            if chat.model != worker.model_name:
                raise _model_not_found(chat.model, worker.model_name)
            params = await generate_params(chat, worker)
        except Exception as exc:
            refused = isinstance(exc, ShuttingDownError)
            worker.metrics.count("rejected" if refused else "invalid" if isinstance(exc, WorkerError) else "error")
            return _error_response(exc, request_id)
        reply = _Reply(
            id=f"chatcmpl-{request_id}",
            created=int(time.time()),
            model=worker.model_name,
            include_usage=bool(chat.stream_options and chat.stream_options.include_usage),
        )
        # 2. Wait for the first chunk: bad images, an over-long prompt or a full context are found
        #    before the first token, so they still get an HTTP error status instead of a stream.
        chunks = _counted(worker, params, request_id)
        try:
            first = await while_connected(request, anext(chunks))
            if first.finish_reason == "exceeds_context":
                raise RequestError(
                    f"the prompt is {first.prompt_tokens} tokens long (image tokens included), which leaves "
                    f"no room for new tokens in the model's context of {worker.loaded.context_length} tokens",
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
            return _error_response(exc, request_id)

    return router
