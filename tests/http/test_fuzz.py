"""Property-based fuzzing of every route, over real HTTP on loopback, against one worker (the tiny
LLaVA-1.5): whatever arrives — JSON of any shape, near-valid requests with odd values, raw bytes —
the answer comes in time, is never a 5xx, is well formed for its protocol, and the worker serves a
good request afterwards.

Hypothesis runs derandomized, so CI sees the same few thousand cases every time.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_worker.config import WorkerConfig
from llava_worker.worker import ModelWorker
from tests.support.payloads import TEXT_PROMPT, encode_image, greedy
from tests.support.servers import ModelCache, RunningWorker, free_port

#: Seconds any one answer may take: generation is bounded by the small token counts below.
ANSWER_WITHIN = 30.0

FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def worker(checkpoints: dict[str, Path], models: ModelCache) -> Iterator[RunningWorker]:
    base = WorkerConfig(model_path=str(checkpoints["llava-1.5"]), device="cpu", no_register=True)
    port = free_port()
    config = replace(base, worker_address=f"http://127.0.0.1:{port}", max_request_bytes=1 << 20, max_images=4)
    server = RunningWorker(ModelWorker(config, models.get(config)), port).start()
    yield server
    # The worker survived everything: a good request is served as ever.
    answer = server.generate(greedy(TEXT_PROMPT, max_new_tokens=4))
    server.stop()
    assert answer[-1]["error_code"] == 0


# Values. JSON of any shape, and the awkward values of each JSON type.

ODD_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**400, 1e308, -1e-308, 0.5, 1.5, 1e-9])
ODD_FLOATS = st.floats(allow_nan=True, allow_infinity=True) | ODD_NUMBERS
ODD_TEXT = st.text(max_size=40) | st.sampled_from(["", "\ud800", "\x00", "<image>", "<image>" * 5, "</s>", " " * 200])
JSON_LEAVES = st.none() | st.booleans() | st.integers() | ODD_FLOATS | ODD_TEXT
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(ODD_TEXT, children, max_size=4),
    max_leaves=12,
)

SMALL_IMAGE = encode_image(3)
IMAGES = st.sampled_from(
    [
        SMALL_IMAGE,
        "data:image/png;base64," + SMALL_IMAGE,
        "DATA:image/png;base64," + SMALL_IMAGE,
        "not base64!",
        base64.b64encode(b"GIF89a garbage").decode(),
        base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0").decode(),
        SMALL_IMAGE[: len(SMALL_IMAGE) // 2],
        "",
    ]
)
PROMPTS = st.sampled_from(["USER: <image>\nWhat is it? ASSISTANT:", TEXT_PROMPT, "<image><image>", ""]) | ODD_TEXT
NEW_TOKENS = st.integers(-3, 6) | st.sampled_from([10**6, 2**70, "4", None, 2.5])


def maybe(**fields: Any) -> st.SearchStrategy[dict[str, Any]]:
    """Dictionaries with any subset of `fields`, each drawn from its strategy."""
    return st.fixed_dictionaries({}, optional=fields)


#: Values a well-formed request may have for each sampling field.
SAMPLING_FIELDS = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "seed": st.integers(0, 2**32),
}
IMAGE_PROMPTS = st.sampled_from(
    [
        ("USER: <image>\nWhat is it? ASSISTANT:", 1),
        ("USER: <image>\nCompare it with <image>\nplease. ASSISTANT:", 2),
        ("<image><image>", 2),
    ]
)
VALID_GENERATE = st.one_of(
    st.fixed_dictionaries(
        {"prompt": st.sampled_from([TEXT_PROMPT, "Hi"]) | ODD_TEXT, "max_new_tokens": st.integers(1, 6)},
        optional={**SAMPLING_FIELDS, "echo": st.booleans(), "stop_token_ids": st.lists(st.integers(0, 99), max_size=3)},
    ),
    st.tuples(IMAGE_PROMPTS, st.integers(1, 6), st.fixed_dictionaries({}, optional=SAMPLING_FIELDS)).map(
        lambda case: {"prompt": case[0][0], "images": [SMALL_IMAGE] * case[0][1], "max_new_tokens": case[1]} | case[2]
    ),
)
WILD_GENERATE = st.fixed_dictionaries(
    {"max_new_tokens": NEW_TOKENS},
    optional={
        "prompt": PROMPTS,
        "images": st.lists(IMAGES, max_size=5) | ANY_JSON,
        "videos": st.lists(IMAGES, max_size=2) | ANY_JSON,
        "temperature": ODD_FLOATS | ANY_JSON,
        "top_p": ODD_FLOATS,
        "top_k": st.integers() | ODD_FLOATS,
        "stop": ODD_TEXT | st.lists(ODD_TEXT, max_size=40) | ANY_JSON,
        "stop_token_ids": st.lists(st.integers(), max_size=5) | ANY_JSON,
        "echo": st.booleans() | ANY_JSON,
        "presence_penalty": ODD_FLOATS,
        "frequency_penalty": ODD_FLOATS,
        "seed": st.integers() | ANY_JSON,
        "model": ANY_JSON,
    },
)


def one_field_off(valid: st.SearchStrategy[dict[str, Any]], fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid request with one field set to an odd value (or removed)."""
    odd = ODD_FLOATS | ODD_TEXT | ANY_JSON | st.lists(IMAGES, max_size=5) | NEW_TOKENS
    return st.tuples(valid, st.sampled_from(fields), odd, st.booleans()).map(
        lambda case: (
            {key: value for key, value in case[0].items() if not (case[3] and key == case[1])}
            | ({} if case[3] else {case[1]: case[2]})
        )
    )


#: Valid requests (which generate), valid ones with one field off, and anything of the right shape.
GENERATE_BODIES = st.one_of(
    VALID_GENERATE,
    one_field_off(VALID_GENERATE, ["prompt", "images", "max_new_tokens", *SAMPLING_FIELDS, "echo", "stop_token_ids"]),
    WILD_GENERATE,
)

CONTENT_PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": ODD_TEXT}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": IMAGES}) | ANY_JSON}
    ),
    st.fixed_dictionaries(
        {"type": st.just("video_url"), "video_url": st.fixed_dictionaries({"url": IMAGES}) | ANY_JSON}
    ),
    ANY_JSON,
)
MESSAGES = st.lists(
    maybe(
        role=st.sampled_from(["system", "user", "assistant", "tool", "robot"]) | ANY_JSON,
        content=ODD_TEXT | st.lists(CONTENT_PARTS, max_size=3) | ANY_JSON,
        name=ODD_TEXT,
    ),
    max_size=4,
)


def chat_bodies(model: str) -> st.SearchStrategy[dict[str, Any]]:
    user_parts = st.lists(
        st.sampled_from(
            [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + SMALL_IMAGE}},
            ]
        ),
        min_size=1,
        max_size=3,
    )
    valid_messages = st.tuples(st.booleans(), st.sampled_from(["Hi", "Tell me a story."]) | ODD_TEXT | user_parts).map(
        lambda case: (
            ([{"role": "system", "content": "Be brief."}] if case[0] else []) + [{"role": "user", "content": case[1]}]
        )
    )
    chat_fields = {
        "stream": st.booleans(),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3),
        "seed": st.integers(0, 2**32),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.just(1),
    }
    valid = st.fixed_dictionaries(
        {"model": st.just(model), "messages": valid_messages, "max_tokens": st.integers(1, 6)}, optional=chat_fields
    )
    wild = st.fixed_dictionaries(
        {"max_tokens": NEW_TOKENS},
        optional={
            "model": st.just(model) | ANY_JSON,
            "messages": MESSAGES | ANY_JSON,
            "stream": st.booleans() | ANY_JSON,
            "temperature": ODD_FLOATS,
            "n": st.integers(-1, 3),
            "stop": ODD_TEXT | st.lists(ODD_TEXT, max_size=6),
            "stream_options": maybe(include_usage=st.booleans() | ANY_JSON) | ANY_JSON,
            "logprobs": st.booleans(),
            "max_completion_tokens": NEW_TOKENS,
            "response_format": ANY_JSON,
            "tools": ANY_JSON,
        },
    )
    fields = ["model", "messages", "max_tokens", "max_completion_tokens", "logprobs", "tools", *chat_fields]
    return st.one_of(valid, one_field_off(valid, fields), wild)


def as_body(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


RAW_BODIES = st.binary(max_size=200) | st.sampled_from([b"", b"{", b"[" * 5000, b'{"prompt": "' + b"a" * 2000])


# What every answer must be.


def check_answer(path: str, answer: requests.Response) -> None:
    assert answer.status_code < 500 or answer.status_code == 503, (path, answer.status_code, answer.content[:300])
    if path == "/worker_generate_stream":
        chunks = [json.loads(chunk) for chunk in answer.content.split(b"\0") if chunk]
        assert chunks, "at least one chunk, even for a refusal"
        final = chunks[-1]
        assert isinstance(final["text"], str) and isinstance(final["error_code"], int)
        assert answer.status_code == 200 or final["error_code"] != 0
    elif path.startswith("/v1/") and answer.status_code >= 400:
        error = answer.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
    elif answer.headers.get("content-type", "").startswith("application/json"):
        answer.json()  # well-formed


def send(worker: RunningWorker, path: str, body: bytes) -> requests.Response:
    answer = requests.post(
        worker.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=ANSWER_WITHIN
    )
    check_answer(path, answer)
    return answer


# The properties, one per route family.


@settings(FUZZ, max_examples=600)
@given(body=GENERATE_BODIES)
def test_the_generate_stream_route_answers_any_request_well(worker, body):
    send(worker, "/worker_generate_stream", as_body(body))


@settings(FUZZ, max_examples=300)
@given(body=GENERATE_BODIES)
def test_the_generate_route_answers_any_request_well(worker, body):
    answer = send(worker, "/worker_generate", as_body(body))
    assert answer.status_code != 200 or isinstance(answer.json()["error_code"], int)


@settings(FUZZ, max_examples=600)
@given(data=st.data())
def test_the_chat_completions_route_answers_any_request_well(worker, data):
    body = data.draw(chat_bodies(worker.worker.model_name))
    answer = send(worker, "/v1/chat/completions", as_body(body))
    if answer.status_code == 200 and not answer.headers["content-type"].startswith("text/event-stream"):
        assert answer.json()["choices"][0]["message"]["role"] == "assistant"


@settings(FUZZ, max_examples=700)
@given(
    path=st.sampled_from(
        [
            "/worker_generate_stream",
            "/worker_generate",
            "/v1/chat/completions",
            "/count_token",
            "/worker_get_status",
            "/model_details",
            "/worker_get_conv_template",
        ]
    ),
    body=RAW_BODIES | ANY_JSON.map(as_body) | maybe(prompt=ODD_TEXT | ANY_JSON, model=ANY_JSON).map(as_body),
)
def test_every_post_route_answers_any_bytes_well(worker, path, body):
    send(worker, path, body)


@settings(FUZZ, max_examples=200)
@given(
    path=st.sampled_from(["/health", "/ready", "/metrics", "/v1/models", "/v1/models/"])
    .flatmap(lambda path: st.just(path) | st.text(max_size=30).map(lambda tail: path + tail))
    .filter(lambda path: "#" not in path and "?" not in path),
)
def test_every_get_route_answers_any_path_well(worker, path):
    answer = requests.get(worker.url + path.replace("\\", "%5C"), timeout=ANSWER_WITHIN)
    assert answer.status_code < 500, (path, answer.status_code, answer.content[:300])
