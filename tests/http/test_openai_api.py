"""The OpenAI-compatible API, through the official `openai` client against real workers on loopback."""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from llava_worker.http.remote_images import is_public_address
from llava_worker.models.chat_prompt import render_prompt
from tests.support.payloads import TEXT_PROMPT, encode_image, greedy
from tests.support.reference import reference_tokens
from tests.support.servers import RunningWorker, StreamingClient, wait_until

QUESTION = "What is shown here?"


def client_for(worker: RunningWorker) -> openai.OpenAI:
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def data_url(seed: int) -> str:
    return "data:image/png;base64," + encode_image(seed)


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def template_prompt(worker: RunningWorker, messages: list[dict[str, Any]]) -> str:
    """The prompt the model's own template makes, by the same call the worker is expected to make."""
    loaded = worker.worker.loaded
    owner: Any = loaded.processor if loaded.processor is not None else loaded.tokenizer
    return str(owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def expected(worker: RunningWorker, prompt: str, images: list[str], max_tokens: int) -> tuple[str, int, int]:
    """`model.generate`'s greedy text for the prompt, its token count, and the prompt's token count."""
    loaded = worker.worker.loaded
    tokens = reference_tokens(loaded, prompt, images, max_tokens)
    if loaded.processor is not None:
        pil = [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in images]
        prompt_ids = loaded.processor(text=[prompt], images=pil or None)["input_ids"][0]
    else:
        prompt_ids = loaded.tokenizer(prompt)["input_ids"]
    return str(loaded.tokenizer.decode(tokens, skip_special_tokens=True)), len(tokens), len(prompt_ids)


def outcome_count(worker: RunningWorker, outcome: str) -> float:
    metrics = worker.worker.metrics.render().decode()
    match = re.search(rf'^llava_worker_requests_total\{{outcome="{outcome}"\}} (\S+)$', metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def raw_post(worker: RunningWorker, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(worker.url + "/v1/chat/completions", content=content, timeout=60)


def sse_lines(worker: RunningWorker, payload: dict[str, Any], into: list[str] | None = None) -> list[str]:
    """Every non-empty line of a streamed answer, as sent."""
    lines = [] if into is None else into
    with httpx.stream("POST", worker.url + "/v1/chat/completions", json=payload, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                lines.append(line)
    return lines


def test_models_lists_the_served_model(start_worker):
    worker = start_worker("text-only", model_name="my-model")
    client = client_for(worker)
    assert [model.id for model in client.models.list()] == ["my-model"]
    assert client.models.retrieve("my-model").owned_by == "llava-worker"
    with pytest.raises(openai.NotFoundError, match="the model 'other' does not exist; this worker serves 'my-model'"):
        client.models.retrieve("other")


@pytest.mark.parametrize("kind", ["llava-1.5", "llava-next"])
def test_chat_with_an_image_gives_the_greedy_answer_for_the_templated_prompt(start_worker, kind):
    worker = start_worker(kind)
    messages: Any = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, image_part(data_url(1))]},
    ]
    prompt = template_prompt(
        worker,
        [
            {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]},
        ],
    )
    assert prompt.count("<image>") == 1
    text, completion_tokens, prompt_tokens = expected(worker, prompt, [encode_image(1)], 16)

    answer = client_for(worker).chat.completions.create(
        model=worker.worker.model_name,
        messages=messages,
        temperature=0,
        max_tokens=16,
    )
    assert answer.object == "chat.completion"
    assert answer.id.startswith("chatcmpl-")
    assert answer.model == worker.worker.model_name
    [choice] = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.finish_reason == ("length" if completion_tokens == 16 else "stop")
    assert answer.usage is not None
    # The prompt's count includes the image's tokens, as the model sees them.
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert answer.usage.total_tokens == prompt_tokens + completion_tokens
    assert outcome_count(worker, choice.finish_reason) == 1


def test_streamed_conversation_with_two_images_matches_the_answer_in_one_piece(start_worker):
    worker = start_worker("llava-1.5")
    messages: Any = [
        {"role": "user", "content": [image_part(data_url(1)), {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "text", "text": "Compare with"}, image_part(data_url(2))]},
    ]
    prompt = template_prompt(
        worker,
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
            {"role": "user", "content": [{"type": "text", "text": "Compare with"}, {"type": "image"}]},
        ],
    )
    text, completion_tokens, prompt_tokens = expected(worker, prompt, [encode_image(1), encode_image(2)], 20)
    client = client_for(worker)
    request: dict[str, Any] = {
        "model": worker.worker.model_name,
        "messages": messages,
        "temperature": 0,
        "max_completion_tokens": 20,
    }

    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))

    assert whole.choices[0].message.content == text
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    # Role first, then the text in pieces, then the finish reason, then usage alone.
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks[1:-2]]
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, completion_tokens)


def test_text_only_model_streamed_and_not(start_worker):
    worker = start_worker("text-only")
    messages: Any = [
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a story"}, {"type": "text", "text": "now."}]},
    ]
    prompt = template_prompt(
        worker,
        [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me a story\nnow."}],
    )
    text, completion_tokens, prompt_tokens = expected(worker, prompt, [], 24)
    client = client_for(worker)
    request: dict[str, Any] = {"model": worker.worker.model_name, "messages": messages, "temperature": 0}

    whole = client.chat.completions.create(**request, max_tokens=24)
    streamed = client.chat.completions.create(**request, max_tokens=24, stream=True)

    assert whole.choices[0].message.content == text
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    chunks = list(streamed)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == text
    # Without include_usage there is no usage chunk: the finish reason ends it.
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(chunk.usage is None for chunk in chunks)


def test_finish_reasons_length_and_stop(start_worker):
    worker = start_worker("text-only")
    client = client_for(worker)
    name = worker.worker.model_name
    messages: Any = [{"role": "user", "content": "Tell me a story about the sea."}]
    full = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=24)
    full_text = full.choices[0].message.content or ""

    short = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=5)
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 5
    assert full_text.startswith(short.choices[0].message.content or "-")

    # A stop string from the middle of the answer: the text ends just before its first occurrence.
    stop = full_text[len(full_text) // 2 :][:3]
    cut = full_text[: full_text.index(stop)]
    stopped = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=24, stop=stop)
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == (cut, "stop")
    streamed = client.chat.completions.create(
        model=name, messages=messages, temperature=0, max_tokens=24, stop=["zzz", stop], stream=True
    )
    chunks = list(streamed)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(start_worker):
    worker = start_worker("text-only")
    client = client_for(worker)

    def sample(seed: int) -> str:
        answer = client.chat.completions.create(
            model=worker.worker.model_name,
            messages=[{"role": "user", "content": "Tell me a story about the sea."}],
            temperature=1.0,
            max_tokens=16,
            seed=seed,
        )
        return answer.choices[0].message.content or ""

    assert sample(7) == sample(7)
    # Really sampled: other seeds give other answers.
    assert len({sample(seed) for seed in (1, 2, 3, 7)}) > 1


def test_unsupported_and_malformed_requests_get_openai_errors(start_worker):
    worker = start_worker("llava-1.5")
    client = client_for(worker)
    name = worker.worker.model_name
    hello: Any = [{"role": "user", "content": "Hello"}]
    refused: list[tuple[dict[str, Any], str, str]] = [
        ({"n": 2}, "n", "n > 1 (several choices per request) is not supported by this worker"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tools",
            "'tools' (tool and function calling) is not supported",
        ),
        ({"tool_choice": "none"}, "tool_choice", "'tool_choice' (tool and function calling) is not supported"),
        ({"logprobs": True}, "logprobs", "'logprobs' is not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format", "response_format of type 'json_object'"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias", "'logit_bias' is not supported"),
        (
            {"temperature": 2.5},
            "temperature",
            "invalid request: 'temperature': Input should be less than or equal to 2",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options", "'stream_options' is only allowed when"),
        ({"seed": 2**64}, "seed", "invalid request: 'seed': Input should be less than 18446744073709551616"),
    ]
    for extra, param, message in refused:
        with pytest.raises(openai.BadRequestError, match=re.escape(message)) as caught:
            client.chat.completions.create(model=name, messages=hello, **extra)
        assert caught.value.param == param
        assert caught.value.type == "invalid_request_error"

    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4o' does not exist") as not_found:
        client.chat.completions.create(model="gpt-4o", messages=hello)
    assert (not_found.value.code, not_found.value.param) == ("model_not_found", "model")

    remote: Any = [{"role": "user", "content": [image_part("https://example.com/cat.png")]}]
    with pytest.raises(openai.BadRequestError, match="image 1 is a remote URL, and this worker does not fetch") as off:
        client.chat.completions.create(model=name, messages=remote)
    assert off.value.code == "remote_images_disabled"
    local_file: Any = [{"role": "user", "content": [image_part("file:///etc/passwd")]}]
    with pytest.raises(openai.BadRequestError, match="image 1 has a URL of scheme 'file'; only data: URLs"):
        client.chat.completions.create(model=name, messages=local_file)
    # Found only when the inputs are prepared, yet before the first token: still an HTTP error.
    broken: Any = [{"role": "user", "content": [image_part("data:image/png;base64,%%%")]}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="image 1 is not valid base64"):
            client.chat.completions.create(model=name, messages=broken, stream=stream)
    literal: Any = [{"role": "user", "content": [{"type": "text", "text": "<image>"}, image_part(data_url(1))]}]
    with pytest.raises(openai.BadRequestError, match="message text must not contain '<image>'"):
        client.chat.completions.create(model=name, messages=literal)

    raw: list[tuple[bytes | dict[str, Any], str, str | None]] = [
        (b"{not json", "request body is not valid JSON", None),
        (b"[1, 2]", "request body must be a JSON object, not list", None),
        ({"model": name}, "invalid request: 'messages': Field required", "messages"),
        ({"model": name, "messages": "hi"}, "invalid request: 'messages': Input should be a valid list", "messages"),
        ({"model": name, "messages": [{"role": "tool", "content": "x"}]}, "'messages.0.role': Input should be", None),
        ({"model": name, "messages": [{"role": "user", "content": 5}]}, "must be a string or a list of content", None),
        ({"model": name, "messages": hello, "max_tokens": "10"}, "'max_tokens': Input should be a valid integer", None),
        ({"model": name, "messages": hello, "stop": 5}, "'stop': Input should be a valid list", "stop"),
        (
            {"model": name, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "a part of type 'image_url' needs the field 'image_url'",
            "messages.0.content.0",
        ),
    ]
    for body, message, raw_param in raw:
        response = raw_post(worker, body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"].startswith(message) or message in error["message"], error
        assert error["type"] == "invalid_request_error"
        if raw_param is not None:
            assert error["param"] == raw_param

    # Each was counted once as invalid, the two bad images (found only when the inputs are
    # prepared) too; none started generating, none counts as an error, and the worker still answers.
    assert outcome_count(worker, "invalid") == len(refused) + len(raw) + 4 + 2
    assert outcome_count(worker, "error") == 0
    answer = client.chat.completions.create(model=name, messages=hello, temperature=0, max_tokens=4)
    assert answer.choices[0].finish_reason == "length"


def test_a_template_that_writes_bos_does_not_double_it(start_worker):
    loaded = start_worker("text-only").worker.loaded
    tokenizer = copy.copy(loaded.tokenizer)
    tokenizer.chat_template = "{{ bos_token }}" + loaded.tokenizer.chat_template
    messages = [{"role": "user", "content": "Hello"}]
    prompt = render_prompt(dataclasses.replace(loaded, tokenizer=tokenizer), messages, images=0)
    # Tokenizing adds the one BOS the model expects, as it does for the template without it.
    assert prompt == render_prompt(loaded, messages, images=0) == "USER: Hello ASSISTANT:"
    assert tokenizer(prompt)["input_ids"].count(tokenizer.bos_token_id) == 1


def test_images_sent_to_a_text_only_model_are_refused(start_worker):
    worker = start_worker("text-only")
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, image_part(data_url(1))]}]
    with pytest.raises(openai.BadRequestError, match="this model does not accept images, but the request has 1 image"):
        client_for(worker).chat.completions.create(model=worker.worker.model_name, messages=messages)


def test_request_limits_apply(start_worker):
    worker = start_worker("llava-1.5", max_request_bytes=20_000, max_images=1)
    client = client_for(worker)
    name = worker.worker.model_name
    with pytest.raises(
        openai.BadRequestError, match=r"request body of \d+ bytes is larger than the 20000 bytes accepted"
    ):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "word " * 5_000}])
    two: Any = [{"role": "user", "content": [image_part(data_url(1)), image_part(data_url(1))]}]
    with pytest.raises(openai.BadRequestError, match="too many images: 2 given, at most 1 accepted"):
        client.chat.completions.create(model=name, messages=two)
    long_worker = start_worker("text-only")
    too_long: Any = [{"role": "user", "content": "sea " * 1_000}]
    with pytest.raises(openai.BadRequestError, match="leaves no room for new tokens") as caught:
        client_for(long_worker).chat.completions.create(model=long_worker.worker.model_name, messages=too_long)
    assert caught.value.code == "context_length_exceeded"
    # So long that its length alone proves it cannot fit: refused before tokenizing, the same code.
    far_too_long: Any = [{"role": "user", "content": "sea " * 20_000}]
    with pytest.raises(openai.BadRequestError, match="cannot fit the model's context of 512 tokens") as caught:
        client_for(long_worker).chat.completions.create(model=long_worker.worker.model_name, messages=far_too_long)
    assert caught.value.code == "context_length_exceeded"


def test_a_draining_worker_refuses_with_503(start_worker):
    worker = start_worker("text-only")
    worker.worker.draining = True
    with pytest.raises(openai.InternalServerError, match="the worker is shutting down") as caught:
        client_for(worker).chat.completions.create(
            model=worker.worker.model_name, messages=[{"role": "user", "content": "Hello"}]
        )
    assert caught.value.status_code == 503
    assert outcome_count(worker, "rejected") == 1


def test_waits_in_the_shared_queue_with_sse_keepalives(start_worker):
    worker = start_worker("text-only", limit_model_concurrency=1, keepalive_interval=0.05)
    name = worker.worker.model_name
    # The one slot is taken by a request on the worker's own protocol.
    busy = StreamingClient(worker.url, greedy(TEXT_PROMPT, max_new_tokens=450))
    busy.start()
    wait_until(lambda: len(busy.chunks) >= 2, 20, "the one slot to be taken")
    lines: list[str] = []
    payload = {
        "model": name,
        "messages": [{"role": "user", "content": "Hello"}],
        "temperature": 0,
        "max_tokens": 8,
        "stream": True,
    }
    waiting = threading.Thread(target=sse_lines, args=(worker, payload, lines), daemon=True)
    waiting.start()
    try:
        wait_until(lambda: worker.worker.gate.waiting == 1, 10, "the chat request to wait for the slot")
        wait_until(lambda: lines.count(": keepalive") >= 2, 10, "keepalive comments")
        # Nothing but the opening role chunk and comments while it waits.
        assert all(line == ": keepalive" or '"role": "assistant"' in line for line in lines), lines
    finally:
        busy.hang_up.set()
        busy.join(timeout=30)
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    # A role chunk opens the stream at once; comments keep it open; then the answer, and [DONE].
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    assert lines[-1] == "data: [DONE]"
    assert "\0" not in "".join(lines)
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1] if line.startswith("data: ")]
    text = "".join(event["choices"][0]["delta"].get("content") or "" for event in events)
    prompt = template_prompt(worker, [{"role": "user", "content": "Hello"}])
    assert text == expected(worker, prompt, [], 8)[0]


def test_a_client_that_hangs_up_frees_its_slot(start_worker):
    worker = start_worker("text-only", limit_model_concurrency=1)
    client = client_for(worker)
    name = worker.worker.model_name
    messages: Any = [{"role": "user", "content": "Tell me a story about the sea."}]
    stream = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=450, stream=True)
    for _ in range(3):
        next(stream)
    stream.close()
    wait_until(lambda: worker.worker.gate.queue_length == 0, 10, "the slot to be given back")
    assert outcome_count(worker, "cancelled") == 1
    answer = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=4)
    assert answer.choices[0].finish_reason == "length"


def test_an_error_midway_ends_the_stream_with_an_error_event_and_done(start_worker):
    worker = start_worker("text-only")
    payload = {
        "model": worker.worker.model_name,
        "messages": [{"role": "user", "content": "Tell me a story about the sea."}],
        "temperature": 0,
        "max_tokens": 450,
        "stream": True,
    }
    lines: list[str] = []
    reader = threading.Thread(target=sse_lines, args=(worker, payload, lines), daemon=True)
    reader.start()
    wait_until(lambda: len(lines) >= 3, 20, "the answer to start", interval=0.005)
    worker.worker.engine.abort_all()  # what a drain does when its grace period is over
    reader.join(timeout=30)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["message"] == "the worker is shutting down"
    assert error["type"] == "server_error"
    assert outcome_count(worker, "error") == 1


# Remote images, against a small HTTP server of the test's own on 127.0.0.1.

PNG = base64.b64decode(encode_image(1))
BIG = 50_000


class Hits(dict[str, int]):
    """Requests per path, and the Host header of each in order."""

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[str] = []


class ImageHandler(BaseHTTPRequestHandler):
    hits: Hits

    def do_GET(self) -> None:
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        self.hits.hosts.append(self.headers.get("Host", ""))
        plain = {"/cat.png": (PNG, "image/png"), "/page": (b"<html>a web page, not an image</html>", "text/html")}
        if self.path in plain:
            body, kind = plain[self.path]
            self.answer(200, body, {"Content-Type": kind})
        elif self.path in ("/moved", "/to-file", "/loop"):
            target = {"/moved": "/cat.png", "/to-file": "file:///etc/passwd", "/loop": "/loop"}[self.path]
            self.answer(302, b"", {"Location": target})
        elif self.path == "/big":
            # Declares too much and sends nothing: only the declared length can refuse it in time.
            self.send_response(200)
            self.send_header("Content-Length", str(BIG))
            self.end_headers()
            self.wfile.flush()
            time.sleep(3)
            self.write(b"\0" * BIG)
        elif self.path == "/endless":
            # HTTP/1.0 without Content-Length, never ending: only counting the bytes refuses it in time.
            self.send_response(200)
            self.end_headers()
            for _ in range(500):
                if not self.write(b"\0" * 65_536):
                    return
                time.sleep(0.01)
        elif self.path == "/slow":
            # Declares a small image but sends a byte every 0.1 s, so no single read ever times out.
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                if not self.write(b"\0"):
                    return
                time.sleep(0.1)
        else:
            self.answer(404, b"not here")

    def answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.write(body)

    def write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return False  # the worker gave up on it, as it should
        return True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[tuple[str, Hits]]:
    hits = Hits()
    handler = type("Handler", (ImageHandler,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def ask_about(worker: RunningWorker, *urls: str) -> str:
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, *map(image_part, urls)]}]
    answer = client_for(worker).chat.completions.create(
        model=worker.worker.model_name,
        messages=messages,
        temperature=0,
        max_tokens=12,
    )
    return answer.choices[0].message.content or ""


def test_remote_images_are_fetched_when_allowed(start_worker, image_server):
    base, hits = image_server
    worker = start_worker("llava-1.5", allow_remote_images=True, allow_private_image_hosts=True)
    prompt = template_prompt(
        worker,
        [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}, {"type": "image"}]}],
    )
    reference = expected(worker, prompt, [encode_image(1), encode_image(2)], 12)[0]
    # In order, remote and inline mixed; through a redirect too.
    assert ask_about(worker, base + "/cat.png", data_url(2)) == reference
    assert ask_about(worker, base + "/moved", data_url(2)) == reference
    assert ask_about(worker, data_url(1), data_url(2)) == reference
    assert hits == {"/cat.png": 2, "/moved": 1}


def test_remote_images_are_refused_when_not_allowed(start_worker, image_server):
    base, hits = image_server
    worker = start_worker("llava-1.5")
    with pytest.raises(openai.BadRequestError, match="image 1 is a remote URL, and this worker does not fetch images"):
        ask_about(worker, base + "/cat.png")
    assert hits == {}


def fetch_refusal(worker: RunningWorker, *urls: str) -> str:
    with pytest.raises(openai.BadRequestError) as refused:
        ask_about(worker, *urls)
    return str(refused.value.body["message"])  # type: ignore[index]


def test_remote_image_refusals_all_read_the_same(start_worker, image_server):
    """Refused, not found, not an image, too big, redirected away: one text, so that a client cannot
    map what only the worker can reach."""
    base, hits = image_server
    worker = start_worker(
        "llava-1.5",
        allow_remote_images=True,
        allow_private_image_hosts=True,
        remote_image_timeout=0.5,
        max_image_bytes=10_000,
    )
    closed_port = base.rsplit(":", 1)[0] + ":1"
    urls = ["/big", "/endless", "/to-file", "/loop", "/missing", "/page"]
    texts = {fetch_refusal(worker, base + path) for path in urls} | {fetch_refusal(worker, closed_port + "/cat.png")}
    assert len(texts) == 1, texts
    text = texts.pop()
    assert text.startswith("image 1 could not be fetched; a remote image must be an http(s) URL that answers 200")
    assert "of at most 10000 bytes" in text
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/cat.png"):
        with pytest.raises(openai.BadRequestError, match="only data: and http\\(s\\) URLs are accepted"):
            ask_about(worker, url)

    # A server that trickles: the whole image must arrive in time, and the worker keeps serving meanwhile.
    failure: list[BaseException] = []

    def ask_slow() -> None:
        try:
            ask_about(worker, base + "/slow")
        except openai.BadRequestError as exc:
            failure.append(exc)

    started = time.monotonic()
    slow = threading.Thread(target=ask_slow, daemon=True)
    slow.start()
    wait_until(lambda: hits.get("/slow") == 1, 5, "the slow image to be requested")
    assert httpx.get(worker.url + "/health", timeout=0.3).status_code == 200
    slow.join(timeout=10)
    assert time.monotonic() - started < 3
    assert len(failure) == 1 and "image 1 could not be fetched" in str(failure[0])
    assert ask_about(worker, base + "/cat.png")


def test_remote_images_on_private_addresses_are_refused_by_default(start_worker, image_server):
    base, hits = image_server
    worker = start_worker("llava-1.5", allow_remote_images=True)
    port = base.rsplit(":", 1)[1]
    # Loopback by name, by number, in decimal and hex (which resolve to 127.0.0.1), and over IPv6.
    hosts = ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "127.1", "[::1]", "[::ffff:127.0.0.1]"]
    texts = {fetch_refusal(worker, f"http://{host}:{port}/cat.png") for host in hosts}
    assert len(texts) == 1, texts
    assert texts.pop().startswith(
        "image 1 could not be fetched; a remote image must be an http(s) URL of a public address that answers 200"
    )
    assert hits == {}, "nothing was fetched"


def test_a_checked_host_is_connected_to_at_the_address_that_was_checked(start_worker, image_server, monkeypatch):
    """The host is resolved once, checked, and that address dialled, under the URL's own Host header
    (a second resolution could answer differently). Loopback stands in for a public address here."""
    base, hits = image_server
    worker = start_worker("llava-1.5", allow_remote_images=True)
    resolved: list[str] = []

    def public(address: str) -> bool:
        resolved.append(address)
        return True

    monkeypatch.setattr("llava_worker.http.remote_images.is_public_address", public)
    port = base.rsplit(":", 1)[1]
    assert ask_about(worker, f"http://localhost:{port}/moved")
    assert hits == {"/moved": 1, "/cat.png": 1}
    assert hits.hosts == [f"localhost:{port}", f"localhost:{port}"]
    assert resolved and all(address in ("127.0.0.1", "::1") for address in resolved)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),  # cloud metadata services live here
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
    ],
)
def test_which_addresses_count_as_public(address, public):
    assert is_public_address(address) is public


def test_remote_images_share_one_byte_budget_per_request(start_worker, image_server):
    base, _ = image_server
    budget = int(len(PNG) * 2.5)
    worker = start_worker(
        "llava-1.5", allow_remote_images=True, allow_private_image_hosts=True, max_request_bytes=budget
    )
    assert ask_about(worker, base + "/cat.png", base + "/cat.png")
    text = fetch_refusal(worker, base + "/cat.png", base + "/cat.png", base + "/cat.png")
    assert text.startswith("image 3 could not be fetched") and f"together at most {budget} bytes" in text


def test_remote_fetches_are_bounded_in_concurrency_and_counted_against_the_queue(start_worker, image_server):
    base, hits = image_server
    worker = start_worker(
        "llava-1.5",
        allow_remote_images=True,
        allow_private_image_hosts=True,
        remote_image_timeout=3,
        image_fetchers=1,
        max_queue=1,
    )
    outcomes: list[BaseException | str] = []

    def ask(path: str) -> None:
        try:
            outcomes.append(ask_about(worker, base + path))
        except openai.APIError as exc:
            outcomes.append(exc)

    first = threading.Thread(target=ask, args=("/slow",), daemon=True)
    first.start()
    wait_until(lambda: hits.get("/slow") == 1, 5, "the slow image to be fetched")
    second = threading.Thread(target=ask, args=("/cat.png",), daemon=True)
    second.start()
    remote_images = worker.app.state.remote_images
    wait_until(lambda: remote_images.waiting == 1, 5, "the second request to wait for the place")
    with pytest.raises(openai.RateLimitError) as third:
        ask_about(worker, base + "/cat.png")
    assert third.value.code == "queue_full"
    assert "/cat.png" not in hits, "neither waiting request fetched while the slow one held the place"
    first.join(10)
    second.join(30)
    assert hits["/cat.png"] == 1
    assert isinstance(outcomes[0], openai.BadRequestError) and isinstance(outcomes[1], str)
