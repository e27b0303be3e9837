"""The wire format of PROTOCOL.md: request parameters, stream chunks and status, with their encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_worker.config import DEFAULT_MAX_NEW_TOKENS
from llava_worker.errors import InvalidJSONError, InvalidRequestError

#: What the original sends when the prompt leaves no room for new tokens (with error_code 0).
EXCEEDS_CONTEXT_TEXT = "Exceeds max token length. Please start a new conversation, thanks."
#: Separates chunks of `/worker_generate_stream`; clients split on it and skip empty pieces.
CHUNK_DELIMITER = b"\0"
#: Temperatures at or below this mean greedy decoding, as in the original.
GREEDY_TEMPERATURE = 1e-3
#: Highest temperature accepted; beyond it sampling is noise.
MAX_TEMPERATURE = 10.0


class _GenerateRequestBody(BaseModel):
    """`POST /worker_generate_stream` as it arrives; strict so wrong JSON types are refused.

    The first fields are LLaVA's; the rest are what FastChat's API server adds.
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: str
    images: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE)
    # 0 is valid for OpenAI and FastChat: only the most likely token is kept.
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1)
    stop: str | list[str] | None = None
    echo: bool | None = None
    top_k: int | None = Field(default=None, ge=-1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop_token_ids: list[int] | None = None
    # torch's generators take seeds in [-2**63, 2**64).
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)


@dataclass(frozen=True)
class GenerateParams:
    """One generation request, validated; the inside of the worker sees only this."""

    prompt: str
    images: tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    echo: bool = True
    """Whether `text` starts with the prompt (LLaVA always; FastChat asks with `echo`)."""
    extended: bool = False
    """Whether chunks carry FastChat's `usage` and `finish_reason` (only when it sent `echo`, so a
    LLaVA client sees exactly the original's chunks)."""
    top_k: int | None = None
    """None: the model's default; 0: no top-k filter."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


def parse_generate_params(body: bytes, max_images: int | None = None) -> GenerateParams:
    """Decode and validate a request body; raises InvalidRequestError naming what is wrong."""
    try:
        request = _GenerateRequestBody.model_validate(json_object(body))
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc)) from None
    if max_images is not None and request.images and len(request.images) > max_images:
        raise InvalidRequestError(f"too many images: {len(request.images)} given, at most {max_images} accepted")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    return GenerateParams(
        prompt=request.prompt,
        images=tuple(request.images or ()),
        temperature=request.temperature,
        top_p=request.top_p,
        max_new_tokens=request.max_new_tokens,
        stop=tuple(s for s in stop if s),
        echo=request.echo is not False,
        extended=request.echo is not None,
        # FastChat's -1 means "off", as 0 does here.
        top_k=None if request.top_k is None else max(request.top_k, 0),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        seed=request.seed,
    )


def json_object(body: bytes) -> dict[str, Any]:
    """A request body decoded as a JSON object; raises InvalidJSONError or InvalidRequestError."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJSONError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"request body must be a JSON object, not {type(raw).__name__}")
    return raw


def describe_validation_error(exc: ValidationError) -> str:
    """One readable line per problem, naming the field: `'top_p': Input should be ...`."""
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
        problems.append(f"'{location}': {error['msg']}")
    return "invalid request: " + "; ".join(dict.fromkeys(problems))


def encode_chunk(text: str, error_code: int = 0, extra: dict[str, Any] | None = None) -> bytes:
    """One stream chunk, serialised exactly as the original worker does (FastChat's fields after)."""
    return json.dumps(chunk_body(text, error_code, extra)).encode() + CHUNK_DELIMITER


def chunk_body(text: str, error_code: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"text": text, "error_code": error_code, **(extra or {})}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """FastChat's (and OpenAI's) token accounting."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def worker_status(model_name: str, queue_length: int) -> dict[str, Any]:
    """Body of `/worker_get_status` and of the status sent at registration."""
    return {"model_names": [model_name], "speed": 1, "queue_length": queue_length}
