"""create_app(worker): the HTTP routes of the worker, thin, over ModelWorker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llava_worker.errors import InvalidRequestError
from llava_worker.http.body import read_body
from llava_worker.http.conversations import conversation_template
from llava_worker.http.disconnects import ClientDisconnected, gone_response, while_connected
from llava_worker.http.openai import openai_router
from llava_worker.metrics import METRICS_CONTENT_TYPE
from llava_worker.protocol import GenerateParams, encode_chunk, parse_generate_params
from llava_worker.worker import ModelWorker, ShuttingDownError, describe_failure, new_request_id


def create_app(worker: ModelWorker) -> FastAPI:
    """The ASGI app serving `worker`; its lifespan starts and stops the engine and controller link."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title="llava-worker", lifespan=lifespan)
    app.state.worker = worker
    app.include_router(openai_router(worker))

    async def parse(request: Request, request_id: str) -> GenerateParams | tuple[str, int]:
        """The request's parameters; or, when it is refused before taking a slot, (message, status)."""
        try:
            if worker.draining:
                raise ShuttingDownError()
            body = await read_body(request, worker.config.max_request_bytes)
            return parse_generate_params(body, max_images=worker.config.max_images)
        except (InvalidRequestError, ShuttingDownError) as exc:
            refused = isinstance(exc, ShuttingDownError)
            worker.metrics.count("rejected" if refused else "invalid")
            return describe_failure(exc, request_id), 503 if refused else 400

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> StreamingResponse:
        request_id = new_request_id()
        params = await parse(request, request_id)
        if isinstance(params, tuple):
            # Still a stream, so every client parses the refusal the usual way.
            message, status = params
            return StreamingResponse(_single(encode_chunk(message, error_code=1)), status_code=status)
        return StreamingResponse(worker.generate_stream_gate(params, request_id))

    @app.post("/worker_generate")
    async def worker_generate(request: Request) -> Response:
        """FastChat's non-streaming call: the last chunk, with `usage` and `finish_reason`."""
        request_id = new_request_id()
        params = await parse(request, request_id)
        if isinstance(params, tuple):
            # 200, as FastChat's own workers answer: its API server drops the body of any other status
            # (chat clients then see a bare "Bad Request", /v1/completions fails with a 500).
            message, _ = params
            return JSONResponse({"text": message, "error_code": 1})
        try:
            return JSONResponse(await while_connected(request, worker.generate(params, request_id)))
        except ClientDisconnected:
            return gone_response()

    @app.post("/count_token")
    async def count_token(request: Request) -> JSONResponse:
        try:
            prompt = (await _json_object(request)).get("prompt")
            if not isinstance(prompt, str):
                raise InvalidRequestError("invalid request: 'prompt' must be a string")
        except InvalidRequestError as exc:
            return JSONResponse({"count": 0, "error_code": 1, "text": str(exc)}, status_code=400)
        count = await asyncio.to_thread(worker.count_tokens, prompt)
        return JSONResponse({"count": count, "error_code": 0})

    @app.post("/model_details")
    async def model_details() -> dict[str, Any]:
        return {"context_length": worker.loaded.context_length}

    @app.post("/worker_get_conv_template")
    async def worker_get_conv_template() -> dict[str, Any]:
        return {"conv": conversation_template(worker.loaded)}

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict[str, Any]:
        return worker.get_status()

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process is up and its event loop answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded and the generation engine is alive and answering."""
        reason = await worker.readiness()
        if reason is None:
            return JSONResponse({"status": "ready", "model": worker.model_name})
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return body


async def _single(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk
