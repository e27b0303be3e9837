"""Limits on input: each bad request gets a clear error at once, and the next one is served normally."""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib
from typing import Any

import pytest
import requests

from tests.support.payloads import PROMPT_1, TEXT_PROMPT, encode_image, greedy
from tests.support.servers import RunningWorker, StreamingClient, wait_until


def post_raw(worker: RunningWorker, body: Any, timeout: float = 30) -> tuple[int, list[dict[str, Any]]]:
    """Posts raw bytes (or a generator of bytes, sent chunked) and returns the status and chunks."""
    with requests.post(worker.url + "/worker_generate_stream", data=body, stream=True, timeout=timeout) as r:
        return r.status_code, [json.loads(c) for c in r.iter_lines(delimiter=b"\0") if c]


def assert_refused(status_and_chunks: tuple[int, list[dict[str, Any]]], message: str) -> None:
    _, chunks = status_and_chunks
    assert len(chunks) == 1, chunks
    assert chunks[0]["error_code"] == 1
    assert chunks[0]["text"].startswith(message), chunks[0]["text"]


def assert_still_serving(worker: RunningWorker) -> None:
    kind_has_images = worker.worker.loaded.takes_images
    payload = greedy(PROMPT_1, [encode_image(1)]) if kind_has_images else greedy(TEXT_PROMPT)
    assert worker.generate(payload)[-1]["error_code"] == 0
    wait_until(lambda: worker.status()["queue_length"] == 0, 10, "the queue to empty")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels but carries almost no data: a decompression bomb
    as far as its header goes. Decoding it in full would need width*height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_request_body_larger_than_the_limit(start_worker):
    worker = start_worker("text-only", max_request_bytes=10_000)
    body = json.dumps({"prompt": "word " * 5_000}).encode()
    status, chunks = post_raw(worker, body)
    assert status == 400
    assert_refused((status, chunks), f"request body of {len(body)} bytes is larger than the 10000 bytes accepted")
    # Sent chunked, without a Content-Length: counted while it arrives.
    assert_refused(post_raw(worker, iter([body[:6000], body[6000:]])), "request body is larger than the 10000 bytes")
    assert_still_serving(worker)


def test_too_many_images(start_worker):
    worker = start_worker("llava-1.5", max_images=2)
    prompt = "USER: <image><image><image> ASSISTANT:"
    assert_refused(
        post_raw(worker, json.dumps(greedy(prompt, [encode_image(i) for i in range(3)]))),
        "too many images: 3 given, at most 2 accepted",
    )
    assert_still_serving(worker)


def test_image_file_larger_than_the_limit(start_worker):
    worker = start_worker("llava-1.5", max_image_bytes=1_000)
    chunks = worker.generate(greedy(PROMPT_1, [encode_image(1, (64, 64))]))
    assert chunks == [{"text": "image 1 is larger than the 1000 bytes accepted", "error_code": 1}]


def test_decompression_bomb_is_refused_before_it_is_decoded(start_worker):
    worker = start_worker("llava-1.5")
    bomb = base64.b64encode(png_header_only(10_000, 10_000)).decode()
    huge = base64.b64encode(png_header_only(50_000, 50_000)).decode()
    started = time.monotonic()
    assert worker.generate(greedy(PROMPT_1, [bomb])) == [
        {"text": "image 1 has 10000x10000 = 100000000 pixels, more than the 40000000 accepted", "error_code": 1}
    ]
    assert worker.generate(greedy(PROMPT_1, [huge])) == [
        {"text": "image 1 has far more than the 40000000 pixels accepted", "error_code": 1}
    ]
    # Decoding either in full would take far longer (and 100 MB to 2.5 GB of memory).
    assert time.monotonic() - started < 5
    assert_still_serving(worker)


def test_prompt_longer_than_the_token_limit(start_worker):
    worker = start_worker("llava-1.5", max_prompt_tokens=30)
    chunks = worker.generate(greedy(PROMPT_1, [encode_image(1)]))
    text = chunks[-1]["text"]
    assert chunks[-1]["error_code"] == 1
    # The image's 16 tokens count too: the text alone is under 30 tokens.
    assert text.startswith("the prompt is ") and text.endswith(
        "tokens long (image tokens included); at most 30 accepted"
    )
    assert_still_serving(start_worker("llava-1.5"))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "request body is not valid JSON"),
        (b"{not json", "request body is not valid JSON"),
        (b"\xff\xfe", "request body is not valid JSON"),
        (b'"a string"', "request body must be a JSON object, not str"),
        (b"{}", "invalid request: 'prompt': Field required"),
        (b'{"prompt": 5}', "invalid request: 'prompt': Input should be a valid string"),
        (b'{"prompt": "x", "images": "abc"}', "invalid request: 'images': Input should be a valid list"),
        (b'{"prompt": "x", "images": [1]}', "invalid request: 'images.0': Input should be a valid string"),
        (b'{"prompt": "x", "temperature": -1}', "invalid request: 'temperature': Input should be greater than"),
        (b'{"prompt": "x", "temperature": 11}', "invalid request: 'temperature': Input should be less than"),
        (b'{"prompt": "x", "temperature": "hot"}', "invalid request: 'temperature': Input should be a valid number"),
        (b'{"prompt": "x", "top_p": -0.1}', "invalid request: 'top_p': Input should be greater than or equal to 0"),
        (b'{"prompt": "x", "seed": 18446744073709551616}', "invalid request: 'seed': Input should be less than"),
        (b'{"prompt": "x", "top_p": 1.5}', "invalid request: 'top_p': Input should be less than or equal to 1"),
        (b'{"prompt": "x", "max_new_tokens": 0}', "invalid request: 'max_new_tokens': Input should be greater"),
        (b'{"prompt": "x", "max_new_tokens": "10"}', "invalid request: 'max_new_tokens': Input should be a valid"),
        (b'{"prompt": "x", "max_new_tokens": 2.5}', "invalid request: 'max_new_tokens': Input should be a valid"),
        (b'{"prompt": "x", "stop": 5}', "invalid request: 'stop"),
    ],
)
def test_malformed_parameters(start_worker, body, message):
    worker = start_worker("text-only")
    status, chunks = post_raw(worker, body)
    assert status == 400
    assert_refused((status, chunks), message)
    assert_still_serving(worker)


def test_bad_requests_are_refused_without_waiting_for_a_slot(start_worker):
    worker = start_worker("llava-1.5", limit_model_concurrency=1, keepalive_interval=0.2)
    busy = StreamingClient(worker.url, greedy(PROMPT_1, [encode_image(1)], max_new_tokens=450))
    busy.start()
    try:
        wait_until(lambda: len(busy.chunks) >= 2, 20, "the one slot to be taken")
        started = time.monotonic()
        assert_refused(post_raw(worker, b'{"prompt": 1}'), "invalid request")
        assert_refused(post_raw(worker, json.dumps(greedy(PROMPT_1, ["%%%"]))), "image 1 is not valid base64")
        assert time.monotonic() - started < 3
        assert worker.worker.gate.waiting == 0
    finally:
        busy.hang_up.set()
        busy.join(timeout=30)
    assert_still_serving(worker)
