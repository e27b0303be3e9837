"""The wire format of PROTOCOL.md: request parameters, stream chunks and status, with their encoding."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
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
#: Deepest nesting of arrays and objects in a request body (its own object is level 1). Real requests
#: need six at most (an OpenAI image part); the bound keeps hostile bodies from exhausting the parser's
#: recursion.
MAX_JSON_DEPTH = 64
#: Most JSON values (every array item and object member, and the body itself) in a request body. Real
#: requests hold a few hundred; json.loads holds the GIL throughout, so this bounds how long parsing can
#: stall every other thread, the event loop's included (a million empty arrays take about 0.3 s).
MAX_JSON_VALUES = 1_000_000


class _GenerateRequestBody(BaseModel):
    """`POST /worker_generate_stream` as it arrives; strict so wrong JSON types are refused.

    The first fields are LLaVA's; the rest are what FastChat's API server adds.
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: str
    images: list[str] | None = None
    videos: list[str] | None = None
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
    videos: tuple[str, ...] = ()
    """Base64 video files (or data: URLs), one per `<video>` in the prompt."""
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


def parse_generate_params(body: bytes, max_images: int | None = None, max_videos: int | None = None) -> GenerateParams:
    """Decode and validate a request body; raises InvalidRequestError naming what is wrong."""
    try:
        request = _GenerateRequestBody.model_validate(json_object(body))
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc)) from None
    if max_images is not None and request.images and len(request.images) > max_images:
        raise InvalidRequestError(f"too many images: {len(request.images)} given, at most {max_images} accepted")
    if max_videos is not None and request.videos and len(request.videos) > max_videos:
        raise InvalidRequestError(f"too many videos: {len(request.videos)} given, at most {max_videos} accepted")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    return GenerateParams(
        prompt=request.prompt,
        images=tuple(request.images or ()),
        videos=tuple(request.videos or ()),
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
    """A request body decoded as a JSON object; raises InvalidJSONError or InvalidRequestError.

    Its depth and size are bounded from the bytes before it is parsed, and text that is not valid
    Unicode (a lone surrogate) is refused here, before it can reach a tokenizer.
    """
    encoding = json.detect_encoding(body)
    try:
        # Strict, unlike json.loads, which lets UTF-8-encoded surrogates through.
        text = body.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InvalidJSONError(f"request body is not valid JSON: {exc}") from None
    # The scan reads bytes as ASCII, so a UTF-16 or UTF-32 body is scanned as UTF-8.
    _check_structure(body if encoding.startswith("utf-8") else text.encode())
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJSONError(f"request body is not valid JSON: {exc}") from None
    except ValueError:
        # The only other ValueError of json.loads: an integer longer than Python converts.
        digits = sys.get_int_max_str_digits()
        raise InvalidJSONError(f"request body has an integer longer than the {digits} digits accepted") from None
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"request body must be a JSON object, not {type(raw).__name__}")
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(raw)
    return raw


# Bounding a body before parsing it: a scan of its bytes that costs a few passes of C over them.

#: Every byte but the ones that make the structure of a JSON text (and its string quotes).
_NOT_STRUCTURE = bytes(byte for byte in range(256) if byte not in b'"[]{},')
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
#: A string, once its escapes are gone and only structural bytes are left of its contents.
_STRING = re.compile(rb'"[^"]*+"')
#: Strings are cut out in windows of this size, so no single call holds the GIL for long.
_SCAN_WINDOW = 1 << 20
#: A `\u` escape of a surrogate: only then can a decoded string hold a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_structure(body: bytes) -> None:
    """Refuses a body nested more deeply than MAX_JSON_DEPTH or holding more than MAX_JSON_VALUES values.

    The depth is exact for valid JSON, the count a close bound (see _value_count); invalid JSON within
    both is left for json.loads to describe.
    """
    too_many = InvalidJSONError(f"request body holds more than the {MAX_JSON_VALUES} JSON values accepted")
    # Escaped backslashes and quotes first (left to right, as a parser reads them), so every quote
    # left opens or closes a string.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Every string is a value or a key, and no object has more keys than values: far more strings
    # than values accepted is refused before the costlier pass that cuts strings out.
    if unescaped.count(b'"') > 4 * MAX_JSON_VALUES + 2:
        raise too_many
    structure = _strip_strings(unescaped.translate(None, _NOT_STRUCTURE))
    if _value_count(structure) > MAX_JSON_VALUES:
        raise too_many
    if _nesting_exceeds(structure.translate(_AS_SQUARE, b","), MAX_JSON_DEPTH):
        raise InvalidJSONError(f"request body is nested more deeply than the {MAX_JSON_DEPTH} levels accepted")


def _value_count(structure: bytes) -> int:
    """How many values `structure` (brackets and commas only) holds: the body, and every array item and
    object member, which is one more than the commas in each array and object. Numbers and literals
    are gone by now, so an empty array or object counts as holding one value: a bound, exact otherwise."""
    return 1 + structure.count(b",") + structure.count(b"[") + structure.count(b"{")


def _strip_strings(structure: bytes) -> bytes:
    """`structure` (quotes, brackets and commas only) without what lies inside its strings."""
    # Two quotes side by side are a string with no structure inside, or the end of one string and
    # the start of the next: removing them keeps every other quote's meaning.
    structure = structure.replace(b'""', b"")
    if structure.count(b'"') % 2:
        structure = structure[: structure.rfind(b'"')]  # an unterminated string: json.loads reports it
    pieces, start = [], 0
    while start < len(structure):
        end = min(start + _SCAN_WINDOW, len(structure))
        if structure.count(b'"', start, end) % 2:
            end = structure.index(b'"', end) + 1  # never cut a string in two
        pieces.append(_STRING.sub(b"", structure[start:end]))
        start = end
    return b"".join(pieces)


def _nesting_exceeds(brackets: bytes, limit: int) -> bool:
    """Whether `brackets` (only `[` and `]`) nest deeper than `limit`: each pass removes one level."""
    depth = 0
    while brackets and depth <= limit:
        inner = brackets.replace(b"[]", b"")
        if len(inner) == len(brackets):
            break
        brackets, depth = inner, depth + 1
    # What is left is unmatched (invalid JSON); its openers still nest whatever follows them.
    return depth + brackets.count(b"[") > limit


def _refuse_lone_surrogates(raw: dict[str, Any]) -> None:
    """Raises InvalidJSONError naming the first string of `raw` that holds a lone surrogate.

    JSON's `\\ud800` escape can make one, Unicode text cannot hold one, and tokenizers fail on it.
    """
    for text, where in _strings(raw, ""):
        found = _SURROGATE.search(text)
        if found is not None:
            raise InvalidJSONError(
                f"request body has a lone surrogate (U+{ord(found.group()):04X}) at character index "
                f"{found.start()} of {where}; text must be valid Unicode"
            )


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string in `value`, with where it is: `'messages.0.content'`, or `a key in 'messages.0'`."""
    if isinstance(value, str):
        yield value, f"'{path}'"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key, f"a key in '{path}'" if path else "a key"
            yield from _strings(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}.{index}")


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
