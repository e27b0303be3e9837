"""Every failure's wire form, in one place: LLaVA/FastChat error chunks and bodies, HTTP statuses and
OpenAI error objects; each failure is logged here, once, with its request id."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi.responses import JSONResponse

from llava_worker.chunks import StreamChunk
from llava_worker.errors import (
    ImageError,
    InvalidJSONError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    ShuttingDownError,
    WorkerError,
)
from llava_worker.http.openai_requests import RequestError
from llava_worker.protocol import encode_chunk

logger = logging.getLogger(__name__)


def new_request_id() -> str:
    """The id that ties a request's log lines to the error text its client sees."""
    return uuid.uuid4().hex[:12]


def describe_failure(exc: BaseException, request_id: str) -> str:
    """The user-facing text of a failure; a WorkerError says what to fix, anything else is a bug."""
    if isinstance(exc, WorkerError):
        logger.warning("request %s failed: %s", request_id, exc)
        return str(exc)
    logger.error("request %s failed unexpectedly", request_id, exc_info=exc)
    return f"internal error ({type(exc).__name__}: {exc}); request id {request_id}"


# The LLaVA and FastChat routes: an error is a chunk with error code 1 (LLaVA's clients only check
# that it is not 0), or FastChat's ENGINE_OVERLOADED when the queue is full.

#: FastChat's `ErrorCode.ENGINE_OVERLOADED`.
ENGINE_OVERLOADED = 42903


def error_code_of(exc: BaseException) -> int:
    return ENGINE_OVERLOADED if isinstance(exc, QueueFullError) else 1


def failure_chunk(exc: BaseException, request_id: str) -> StreamChunk:
    """The last chunk of a stream that failed after it started."""
    return StreamChunk(describe_failure(exc, request_id), finish_reason="error", error_code=error_code_of(exc))


def refusal_chunk(exc: BaseException, request_id: str) -> bytes:
    """The whole body of a `/worker_generate_stream` request refused before it took a slot."""
    return encode_chunk(describe_failure(exc, request_id), error_code=error_code_of(exc))


def refusal_status(exc: BaseException) -> int:
    """The HTTP status of a refused LLaVA request: 503 while draining (try another worker), 429 when
    the queue is full (try later), else 400."""
    if isinstance(exc, ShuttingDownError):
        return 503
    return 429 if isinstance(exc, QueueFullError) else 400


def refusal_body(exc: BaseException, request_id: str) -> dict[str, Any]:
    """FastChat's `/worker_generate` refusal, sent with status 200 as FastChat's own workers send it:
    its API server drops the body of any other status."""
    return {"text": describe_failure(exc, request_id), "error_code": error_code_of(exc)}


def count_token_refusal(exc: BaseException, request_id: str) -> JSONResponse:
    return JSONResponse(
        {"count": 0, "error_code": 1, "text": describe_failure(exc, request_id)}, status_code=refusal_status(exc)
    )


# The OpenAI-compatible routes: an HTTP status and OpenAI's error object.


def openai_error(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any]]:
    """OpenAI's status and error object for `exc`."""
    message = describe_failure(exc, request_id)
    param: str | None = None
    code: str | None = None
    if isinstance(exc, RequestError):
        status, kind, param, code = exc.status, "invalid_request_error", exc.param, exc.code
    elif isinstance(exc, ShuttingDownError):
        status, kind, code = 503, "server_error", "shutting_down"
    elif isinstance(exc, QueueFullError):
        status, kind, code = 429, "rate_limit_error", "queue_full"
    elif isinstance(exc, PromptTooLongError):
        status, kind, param, code = 400, "invalid_request_error", "messages", "context_length_exceeded"
    elif isinstance(exc, (InvalidRequestError, ImageError)):
        status, kind = 400, "invalid_request_error"
        code = "invalid_json" if isinstance(exc, InvalidJSONError) else None
    else:
        status, kind = 500, "server_error"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error_response(exc: BaseException, request_id: str) -> JSONResponse:
    status, body = openai_error(exc, request_id)
    return JSONResponse(body, status_code=status)
