"""create_app(worker): the HTTP routes of the worker, thin, over ModelWorker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llava_worker.errors import InvalidRequestError, QueueFullError, ShuttingDownError, outcome_of
from llava_worker.http.body import parse_body, read_body
from llava_worker.http.disconnects import ClientDisconnected, gone_response, while_connected
from llava_worker.http.failures import (
    count_token_refusal,
    new_request_id,
    refusal_body,
    refusal_chunk,
    refusal_status,
)
from llava_worker.http.fastchat import conversation_template, final_body, stream_bytes
from llava_worker.http.openai import openai_router
from llava_worker.http.remote_images import RemoteImages
from llava_worker.metrics import METRICS_CONTENT_TYPE
from llava_worker.protocol import GenerateParams, json_object, parse_generate_params

if TYPE_CHECKING:
    from llava_worker.worker import ModelWorker


def create_app(worker: ModelWorker) -> FastAPI:
    """The ASGI app serving `worker`; its lifespan starts and stops the engine and controller link."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    # The interactive docs and the schema would only show strangers what to send: off unless asked for.
    docs = worker.config.serve_api_docs
    app = FastAPI(
        title="llava-worker",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.worker = worker
    app.include_router(_generate_router(worker))
    app.include_router(_fastchat_router(worker))
    app.include_router(_probe_router(worker))
    app.state.remote_images = RemoteImages(worker.config, worker.check_queue)
    app.include_router(openai_router(worker, app.state.remote_images))
    return app


async def _parse(request: Request, worker: ModelWorker) -> GenerateParams:
    """The request's parameters; raises what refuses it before it takes a slot (and counts it)."""
    try:
        if worker.draining:
            raise ShuttingDownError()
        worker.check_queue()
        body = await read_body(request, worker.config.max_request_bytes, worker.config.body_timeout)
        config = worker.config
        parse = partial(parse_generate_params, max_images=config.max_images, max_videos=config.max_videos)
        return await parse_body(body, parse)
    except (InvalidRequestError, ShuttingDownError, QueueFullError) as exc:
        worker.metrics.count(outcome_of(exc))
        raise


def _generate_router(worker: ModelWorker) -> APIRouter:
    """The routes of LLaVA's worker protocol, which FastChat's controller uses too."""
    router = APIRouter()

    @router.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> StreamingResponse:
        request_id = new_request_id()
        try:
            params = await _parse(request, worker)
        except (InvalidRequestError, ShuttingDownError, QueueFullError) as exc:
            # Still a stream, so every client parses the refusal the usual way.
            return StreamingResponse(_single(refusal_chunk(exc, request_id)), status_code=refusal_status(exc))
        return StreamingResponse(stream_bytes(worker, params, request_id))

    @router.post("/worker_get_status")
    async def worker_get_status() -> dict[str, Any]:
        return worker.get_status()

    return router


def _fastchat_router(worker: ModelWorker) -> APIRouter:
    """FastChat's additions to the worker protocol."""
    router = APIRouter()

    @router.post("/worker_generate")
    async def worker_generate(request: Request) -> Response:
        """FastChat's non-streaming call: the last chunk, with `usage` and `finish_reason`."""
        request_id = new_request_id()
        try:
            params = await _parse(request, worker)
        except (InvalidRequestError, ShuttingDownError, QueueFullError) as exc:
            return JSONResponse(refusal_body(exc, request_id))
        try:
            return JSONResponse(await while_connected(request, final_body(worker, params, request_id)))
        except ClientDisconnected:
            return gone_response()

    @router.post("/count_token")
    async def count_token(request: Request) -> JSONResponse:
        try:
            body = await read_body(request, worker.config.max_request_bytes, worker.config.body_timeout)
            prompt = (await parse_body(body, json_object)).get("prompt")
            if not isinstance(prompt, str):
                raise InvalidRequestError("invalid request: 'prompt' must be a string")
        except InvalidRequestError as exc:
            return count_token_refusal(exc, new_request_id())
        return JSONResponse({"count": await worker.count_tokens(prompt), "error_code": 0})

    @router.post("/model_details")
    async def model_details() -> dict[str, Any]:
        return {"context_length": worker.context_length}

    @router.post("/worker_get_conv_template")
    async def worker_get_conv_template() -> dict[str, Any]:
        return {"conv": conversation_template(worker)}

    return router


def _probe_router(worker: ModelWorker) -> APIRouter:
    """Liveness, readiness and metrics, for orchestrators and monitoring."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process is up and its event loop answers."""
        return {"status": "ok"}

    @router.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded and the generation engine is alive and answering."""
        reason = await worker.readiness()
        if reason is None:
            return JSONResponse({"status": "ready", "model": worker.model_name})
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return router


async def _single(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk
