"""`/worker_generate_stream` over real HTTP on tiny checkpoints: wire format, exact output, errors."""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import pytest
import requests

from llava_worker.models.loaded import LoadedModel
from llava_worker.protocol import EXCEEDS_CONTEXT_TEXT
from tests.support.kinds import needs_torchvision
from tests.support.payloads import PROMPT_1, PROMPT_2, TEXT_PROMPT, encode_image, greedy
from tests.support.reference import reference_text, reference_tokens
from tests.support.servers import StreamingClient, wait_until


def test_wire_format_is_nul_delimited_json_that_only_grows(start_worker):
    worker = start_worker("llava-1.5")
    payload = greedy(PROMPT_1, [encode_image(1)], max_new_tokens=8)
    with requests.post(worker.url + "/worker_generate_stream", json=payload, stream=True, timeout=60) as r:
        body = r.content
    assert body.endswith(b"\0")
    pieces = body.split(b"\0")[:-1]
    assert len(pieces) >= 2
    previous = ""
    for piece in pieces:
        chunk = json.loads(piece)
        # Byte for byte what the original worker writes: json.dumps with its default separators.
        assert piece == json.dumps({"text": chunk["text"], "error_code": 0}).encode()
        assert chunk["text"].startswith(PROMPT_1)
        assert chunk["text"].startswith(previous) and chunk["text"] != previous
        previous = chunk["text"]


@pytest.mark.parametrize(
    ("kind", "prompt", "images"),
    [
        ("llava-1.5", PROMPT_1, [encode_image(1)]),
        ("llava-1.5", PROMPT_2, [encode_image(2), encode_image(3)]),
        ("llava-next", PROMPT_1, [encode_image(1, (64, 40))]),
        ("llava-next", PROMPT_2, [encode_image(2, (30, 70)), encode_image(3, (50, 50))]),
        ("text-only", TEXT_PROMPT, []),
        pytest.param("internvl", PROMPT_2, [encode_image(4), encode_image(5, (50, 20))], marks=needs_torchvision),
    ],
    ids=[
        "llava-1.5-one-image",
        "llava-1.5-two-images",
        "llava-next-one",
        "llava-next-two-sizes",
        "text-only",
        "internvl-two-images",
    ],
)
def test_streamed_text_equals_greedy_generate(start_worker, kind, prompt, images):
    worker = start_worker(kind)
    chunks = worker.generate(greedy(prompt, images or None, max_new_tokens=24))
    expected = reference_text(worker.worker.loaded, prompt, images, 24)
    assert expected.strip(), "the tiny model should produce visible text"
    assert chunks[-1] == {"text": prompt + expected, "error_code": 0}


def test_output_depends_on_the_image(start_worker):
    worker = start_worker("llava-1.5")
    first = worker.generate(greedy(PROMPT_1, [encode_image(1)]))[-1]["text"]
    second = worker.generate(greedy(PROMPT_1, [encode_image(7)]))[-1]["text"]
    assert first != second


def test_data_url_and_jpeg_images_are_accepted(start_worker):
    worker = start_worker("llava-1.5")
    jpeg = encode_image(4, fmt="JPEG")
    plain = worker.generate(greedy(PROMPT_1, [jpeg]))[-1]
    as_url = worker.generate(greedy(PROMPT_1, ["data:image/jpeg;base64," + jpeg]))[-1]
    assert plain["error_code"] == 0 and plain == as_url


@pytest.mark.parametrize(
    ("prompt", "count", "message"),
    [
        (PROMPT_1, 2, "2 images given, but the prompt has 1 <image> placeholder"),
        (PROMPT_2, 1, "1 image given, but the prompt has 2 <image> placeholders"),
        (PROMPT_1, 0, "0 images given, but the prompt has 1 <image> placeholder"),
    ],
)
def test_wrong_image_count_is_a_clear_error_and_the_worker_goes_on(start_worker, prompt, count, message):
    worker = start_worker("llava-1.5")
    chunks = worker.generate(greedy(prompt, [encode_image(i) for i in range(count)]))
    assert chunks == [{"text": message, "error_code": 1}]
    assert worker.generate(greedy(PROMPT_1, [encode_image(1)]))[-1]["error_code"] == 0
    assert worker.status()["queue_length"] == 0


def _truncated_png() -> str:
    raw = base64.b64decode(encode_image(5, (64, 64)))
    return base64.b64encode(raw[: len(raw) // 2]).decode()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("not base64 at all!", "image 1 is not valid base64"),
        (base64.b64encode(b"plain text, not an image").decode(), "image 1 is not in an image format"),
        (_truncated_png(), "image 1 could not be decoded"),
        ("", "image 1 is empty"),
    ],
    ids=["not-base64", "not-an-image", "truncated", "empty"],
)
def test_undecodable_image_is_a_clear_error(start_worker, image, message):
    worker = start_worker("llava-1.5")
    chunks = worker.generate(greedy(PROMPT_1, [image]))
    assert len(chunks) == 1 and chunks[0]["error_code"] == 1
    assert chunks[0]["text"].startswith(message)
    assert worker.generate(greedy(PROMPT_1, [encode_image(1)]))[-1]["error_code"] == 0


def test_images_sent_to_a_text_only_model_are_refused(start_worker):
    worker = start_worker("text-only")
    chunks = worker.generate(greedy(PROMPT_1, [encode_image(1)]))
    assert chunks == [{"text": "this model does not accept images, but the request has 1 image", "error_code": 1}]


def test_prompt_that_fills_the_context_gets_the_originals_message(start_worker):
    worker = start_worker("text-only")
    loaded = worker.worker.loaded
    long_prompt = "word " * loaded.context_length
    assert worker.generate(greedy(long_prompt)) == [{"text": long_prompt + EXCEEDS_CONTEXT_TEXT, "error_code": 0}]


def test_max_new_tokens_is_capped_at_the_room_left(start_worker, caplog):
    worker = start_worker("text-only")
    loaded = worker.worker.loaded
    prompt = "a" + " a" * 400
    prompt_tokens = len(loaded.tokenizer(prompt)["input_ids"])
    room = loaded.context_length - prompt_tokens
    assert 0 < room < 200
    with caplog.at_level(logging.INFO, logger="llava_worker.worker"):
        chunks = worker.generate(greedy(prompt, max_new_tokens=1000))
        expected_log = f"length, {prompt_tokens} prompt tokens (0 reused), {room} new tokens"
        # The request's log line is written once it has left the engine, a moment after the last chunk.
        wait_until(lambda: any(expected_log in r.message for r in caplog.records), 10, "the request log")
    assert chunks[-1]["text"] == prompt + reference_text(loaded, prompt, [], room)


def _pieces(loaded: LoadedModel, tokens: list[int]) -> list[str]:
    """The text each token adds, as a streaming client sees it."""
    texts = [str(loaded.tokenizer.decode(tokens[:i], skip_special_tokens=True)) for i in range(len(tokens) + 1)]
    return [texts[i + 1][len(texts[i]) :] for i in range(len(tokens))]


def test_stop_string_inside_a_token_and_across_tokens(start_worker):
    worker = start_worker("llava-1.5")
    loaded = worker.worker.loaded
    images = [encode_image(1)]
    tokens = reference_tokens(loaded, PROMPT_1, images, 40)
    full = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    pieces = _pieces(loaded, tokens)
    starts = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    # A stop string that lies strictly inside one token, and one that spans two; each the first of its kind.
    inside = next(p[1:3] for i, p in enumerate(pieces) if i >= 2 and len(p) >= 4 and full.find(p[1:3]) == starts[i] + 1)
    across = next(
        stop
        for i in range(2, len(pieces) - 1)
        if len(pieces[i]) >= 2
        and len(pieces[i + 1]) >= 2
        and full.find(stop := pieces[i][-2:] + pieces[i + 1][:2]) == starts[i] + len(pieces[i]) - 2
    )
    for stop in (inside, across):
        chunks = worker.generate(greedy(PROMPT_1, images, max_new_tokens=40, stop=stop))
        expected = full[: full.find(stop)]
        assert chunks[-1] == {"text": PROMPT_1 + expected, "error_code": 0}, stop
        assert all(stop not in chunk["text"][len(PROMPT_1) :] for chunk in chunks)
        # Generation stopped at the stop string rather than running to max_new_tokens.
        assert len(chunks) < len(pieces) - 2


def test_stream_interval_sends_a_chunk_every_n_tokens(start_worker):
    worker = start_worker("text-only", stream_interval=3)
    loaded = worker.worker.loaded
    tokens = reference_tokens(loaded, TEXT_PROMPT, [], 9)
    chunks = worker.generate(greedy(TEXT_PROMPT, max_new_tokens=9))
    expected = [TEXT_PROMPT + loaded.tokenizer.decode(tokens[:n], skip_special_tokens=True) for n in (3, 6, 9)]
    assert [chunk["text"] for chunk in chunks] == expected


def test_sampling_parameters_are_accepted(start_worker):
    worker = start_worker("text-only")
    chunks = worker.generate({"prompt": TEXT_PROMPT, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 10})
    assert chunks[-1]["error_code"] == 0 and len(chunks[-1]["text"]) > len(TEXT_PROMPT)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b'{"images": []}', "invalid request: 'prompt': Field required"),
        (b'{"prompt": "hi", "temperature": "hot"}', "invalid request: 'temperature'"),
        (b'{"prompt": "hi", "top_p": 1.5}', "invalid request: 'top_p'"),
        (b'{"prompt": "hi", "max_new_tokens": 0}', "invalid request: 'max_new_tokens'"),
        (b'{"prompt": "hi", "images": "abc"}', "invalid request: 'images'"),
    ],
)
def test_malformed_requests_get_a_clear_error(start_worker, body, message):
    worker = start_worker("text-only")
    with requests.post(worker.url + "/worker_generate_stream", data=body, stream=True, timeout=30) as r:
        chunks = [json.loads(c) for c in r.iter_lines(delimiter=b"\0") if c]
    assert len(chunks) == 1 and chunks[0]["error_code"] == 1
    assert chunks[0]["text"].startswith(message), chunks[0]["text"]


def _inject_failure(monkeypatch, model, should_fail) -> None:
    """Makes the model's forward pass raise whenever `should_fail(input_ids)` says so."""
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if should_fail(kwargs["input_ids"]):
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)


def test_a_failing_decode_step_ends_the_stream_at_once(start_worker, monkeypatch):
    worker = start_worker("text-only")
    _inject_failure(monkeypatch, worker.worker.loaded.model, lambda ids: ids.shape[1] == 1)
    started = time.monotonic()
    chunks = worker.generate(greedy(TEXT_PROMPT), timeout=10)
    assert time.monotonic() - started < 5  # not the 15 s streamer timeout of the original
    assert chunks[-1] == {"text": "generation failed: RuntimeError: injected failure", "error_code": 1}
    monkeypatch.undo()
    assert worker.generate(greedy(TEXT_PROMPT))[-1]["error_code"] == 0
    wait_until(lambda: worker.status()["queue_length"] == 0, 10, "the slot to come back")


def test_a_failing_prefill_ends_only_its_own_request(start_worker, monkeypatch):
    worker = start_worker("text-only")
    loaded = worker.worker.loaded
    doomed = "USER: this one fails. ASSISTANT:"
    doomed_length = len(loaded.tokenizer(doomed)["input_ids"])
    assert doomed_length != len(loaded.tokenizer(TEXT_PROMPT)["input_ids"])
    _inject_failure(monkeypatch, loaded.model, lambda ids: ids.shape[1] == doomed_length)
    survivor = StreamingClient(worker.url, greedy(TEXT_PROMPT, max_new_tokens=200))
    survivor.start()
    wait_until(lambda: len(survivor.chunks) >= 3, 20, "the first request to be decoding")
    failed = worker.generate(greedy(doomed))
    survivor.join(timeout=60)
    assert failed == [{"text": "generation failed: RuntimeError: injected failure", "error_code": 1}]
    assert survivor.chunks[-1]["text"] == TEXT_PROMPT + reference_text(loaded, TEXT_PROMPT, [], 200)


def _long_request() -> dict[str, Any]:
    return greedy(TEXT_PROMPT, max_new_tokens=450)


def test_concurrency_limit_and_queue_length_while_requests_wait(start_worker):
    worker = start_worker("text-only", limit_model_concurrency=2)
    clients = [StreamingClient(worker.url, _long_request()) for _ in range(4)]
    for client in clients:
        client.start()
    gate = worker.worker.gate
    wait_until(lambda: gate.running == 2 and gate.waiting == 2, 20, "2 running and 2 waiting")
    assert worker.status()["queue_length"] == 4
    for client in clients:
        client.hang_up.set()
    for client in clients:
        client.join(timeout=30)
    wait_until(lambda: worker.status()["queue_length"] == 0, 20, "every slot to come back")
    assert gate.running == 0


def test_disconnect_mid_stream_frees_the_slot_and_stops_generating(start_worker, caplog):
    worker = start_worker("text-only", limit_model_concurrency=1)
    client = StreamingClient(worker.url, _long_request())
    with caplog.at_level(logging.INFO, logger="llava_worker.worker"):
        client.start()
        wait_until(lambda: len(client.chunks) >= 3, 20, "the first chunks")
        client.hang_up.set()
        client.join(timeout=30)
        wait_until(lambda: worker.status()["queue_length"] == 0, 10, "the slot to come back")
        # The one slot is free again: the next request is served at once.
        assert worker.generate(greedy(TEXT_PROMPT, max_new_tokens=4))[-1]["error_code"] == 0
    cancelled = [r.message for r in caplog.records if ": cancelled," in r.message]
    assert len(cancelled) == 1
    new_tokens = int(cancelled[0].split(" new tokens")[0].rsplit(", ", 1)[1])
    assert new_tokens < 100, cancelled[0]


@pytest.mark.parametrize("route", ["/worker_generate", "/v1/chat/completions"])
def test_a_client_leaving_a_non_streamed_request_stops_its_generation(start_worker, caplog, route):
    worker = start_worker("text-only", limit_model_concurrency=1)
    if route == "/worker_generate":
        body = _long_request()
    else:
        messages = [{"role": "user", "content": "Tell me a story about the sea."}]
        body = {"model": worker.worker.model_name, "messages": messages, "max_tokens": 450, "temperature": 0}
    with caplog.at_level(logging.INFO, logger="llava_worker.worker"):
        # The client gives up after a fraction of a second and closes its connection.
        with pytest.raises(requests.ReadTimeout):
            requests.post(worker.url + route, json=body, timeout=(5, 0.3))
        wait_until(lambda: worker.status()["queue_length"] == 0, 10, "the slot to come back")
        assert worker.generate(greedy(TEXT_PROMPT, max_new_tokens=4))[-1]["error_code"] == 0
    cancelled = [r.message for r in caplog.records if ": cancelled," in r.message]
    assert len(cancelled) == 1, [r.message for r in caplog.records]
    new_tokens = int(cancelled[0].split(" new tokens")[0].rsplit(", ", 1)[1])
    assert new_tokens < 400, cancelled[0]


def test_a_non_streamed_request_given_up_while_waiting_leaves_the_queue(start_worker):
    worker = start_worker("text-only", limit_model_concurrency=1)
    running = StreamingClient(worker.url, _long_request())
    running.start()
    wait_until(lambda: len(running.chunks) >= 2, 20, "the first request to run")
    with pytest.raises(requests.ReadTimeout):
        requests.post(worker.url + "/worker_generate", json=_long_request(), timeout=(5, 0.3))
    wait_until(lambda: worker.status()["queue_length"] == 1, 10, "the waiter to leave the queue")
    assert running.is_alive(), "the first request should still be running"
    running.hang_up.set()
    running.join(timeout=30)
