"""create_app(worker): the HTTP routes of the worker, thin, over ModelWorker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from llava_worker.errors import InvalidRequestError
from llava_worker.protocol import encode_chunk, parse_generate_params
from llava_worker.worker import ModelWorker, describe_failure, new_request_id


def create_app(worker: ModelWorker) -> FastAPI:
    """The ASGI app serving `worker`; its lifespan starts and stops the controller link."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title="llava-worker", lifespan=lifespan)
    app.state.worker = worker

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> StreamingResponse:
        request_id = new_request_id()
        try:
            params = parse_generate_params(await request.body())
        except InvalidRequestError as exc:
            # Refused before it takes a slot; still a stream, so every client parses it the usual way.
            return StreamingResponse(_single(encode_chunk(describe_failure(exc, request_id), error_code=1)))
        return StreamingResponse(worker.generate_stream_gate(params, request_id))

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict[str, Any]:
        return worker.get_status()

    return app


async def _single(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk
