"""Hostile inputs over real HTTP: odd JSON, odd images and undocumented routes get clear refusals."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from typing import Any

import pytest
import requests
from PIL import Image

from llava_worker.config import WorkerConfig, validate_config
from llava_worker.errors import ImageError, StartupError
from llava_worker.models.images import ImageLimits, decode_image, decode_images
from llava_worker.testing.tiny import make_test_image
from tests.support.payloads import PROMPT_1, PROMPT_2, TEXT_PROMPT, encode_image, greedy
from tests.support.servers import RunningWorker

SURROGATE_PROMPT = "USER: hi \\ud800 ASSISTANT:"  # JSON text: the escape of a lone high surrogate
DEEP = "request body is nested more deeply than the 64 levels accepted"
HUGE_INT = "request body has an integer longer than the 4300 digits accepted"
SURROGATE = "request body has a lone surrogate (U+D800) at character index 9 of 'prompt'"


def generate_body(prompt: str = '"' + TEXT_PROMPT + '"', **raw_fields: str) -> bytes:
    """A `/worker_generate_stream` body with fields given as raw JSON text (so they can be hostile)."""
    fields = {"prompt": prompt, "temperature": "0", "max_new_tokens": "4", **raw_fields}
    return ("{" + ", ".join(f'"{name}": {value}' for name, value in fields.items()) + "}").encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE_BODIES = {
    "deep-whole-body": (nested(100_000).encode(), DEEP),
    "deep-ignored-field": (generate_body(junk=nested(100_000)), DEEP),
    "just-too-deep": (generate_body(junk=nested(64)), DEEP),  # 65 levels with the body's own object
    "huge-int-ignored-field": (generate_body(junk="9" * 5000), HUGE_INT),
    "huge-int-parameter": (generate_body(max_new_tokens="1" + "0" * 5000), HUGE_INT),
    "lone-surrogate": (generate_body(prompt=f'"{SURROGATE_PROMPT}"'), SURROGATE),
}


def stream_refusal(worker: RunningWorker, body: bytes) -> tuple[int, list[dict[str, Any]]]:
    with requests.post(worker.url + "/worker_generate_stream", data=body, stream=True, timeout=60) as r:
        content = r.content
    assert content.endswith(b"\0"), content[:200]  # a LLaVA stream, not a plain-text error page
    return r.status_code, [json.loads(chunk) for chunk in content.split(b"\0") if chunk]


def assert_serves_afterwards(worker: RunningWorker) -> None:
    assert worker.generate(greedy(TEXT_PROMPT, max_new_tokens=4))[-1]["error_code"] == 0


@pytest.mark.parametrize("case", list(HOSTILE_BODIES))
def test_hostile_json_is_refused_clearly_on_every_route(start_worker, caplog, case):
    body, message = HOSTILE_BODIES[case]
    worker = start_worker("text-only")
    caplog.set_level(logging.WARNING)

    status, chunks = stream_refusal(worker, body)
    assert status == 400
    assert len(chunks) == 1 and chunks[0]["error_code"] == 1
    assert chunks[0]["text"].startswith(message), chunks[0]["text"]

    # FastChat reads `/worker_generate` answers only with status 200.
    answer = requests.post(worker.url + "/worker_generate", data=body, timeout=60)
    assert answer.status_code == 200, answer.text[:200]
    assert answer.json()["error_code"] == 1 and answer.json()["text"].startswith(message)

    counted = requests.post(worker.url + "/count_token", data=body, timeout=60)
    assert counted.headers["content-type"] == "application/json", counted.text[:200]
    assert counted.json()["error_code"] == 1 and counted.json()["text"].startswith(message)

    # A refusal the client caused: no traceback in the log.
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert_serves_afterwards(worker)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (nested(100_000).encode(), DEEP),
        (b'{"model": "text-only", "messages": [], "junk": ' + nested(100_000).encode() + b"}", DEEP),
        (b'{"model": "text-only", "seed": 1' + b"0" * 5000 + b', "messages": []}', HUGE_INT),
        (
            b'{"model": "text-only", "messages": [{"role": "user", "content": "hi \\udc00"}]}',
            "request body has a lone surrogate (U+DC00) at character index 3 of 'messages.0.content'",
        ),
    ],
    ids=["deep-whole-body", "deep-ignored-field", "huge-int", "lone-surrogate"],
)
def test_hostile_json_gets_an_openai_error(start_worker, caplog, body, message):
    worker = start_worker("text-only", model_name="text-only")
    caplog.set_level(logging.WARNING)
    answer = requests.post(worker.url + "/v1/chat/completions", data=body, timeout=60)
    assert answer.status_code == 400, answer.text[:200]
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(message), error
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_64_levels_of_nesting_are_accepted(start_worker):
    worker = start_worker("text-only")
    chunks = stream_refusal(worker, generate_body(junk=nested(63)))[1]
    assert chunks[-1]["error_code"] == 0


def test_a_huge_wide_body_does_not_stall_the_event_loop(start_worker):
    worker = start_worker("text-only")
    # 30 MB of empty arrays in a field the worker ignores: cheap to send, costly to parse.
    body = generate_body(junk="[" + "[]," * 10_000_000 + "[]]")
    answers: list[requests.Response] = []
    sender = threading.Thread(
        target=lambda: answers.append(requests.post(worker.url + "/worker_generate", data=body, timeout=120))
    )
    sender.start()
    slowest = 0.0
    polls = 0
    while sender.is_alive():
        started = time.monotonic()
        assert requests.get(worker.url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        polls += 1
        time.sleep(0.02)
    sender.join()
    assert polls >= 3
    assert slowest < 1.0, f"/health took {slowest:.2f} s while the body was parsed"
    assert answers[0].json() == {
        "text": "request body holds more than the 1000000 JSON values accepted",
        "error_code": 1,
    }
    assert_serves_afterwards(worker)


def test_count_token_keeps_the_body_limit(start_worker):
    worker = start_worker("text-only", max_request_bytes=10_000)
    body = json.dumps({"model": "m", "prompt": "word " * 5_000}).encode()
    answer = requests.post(worker.url + "/count_token", data=body, timeout=60)
    assert answer.json() == {
        "count": 0,
        "error_code": 1,
        "text": f"request body of {len(body)} bytes is larger than the 10000 bytes accepted",
    }
    small = requests.post(worker.url + "/count_token", json={"model": "m", "prompt": "word"}, timeout=60)
    assert small.json()["error_code"] == 0


# Images: data URLs of any case, EXIF orientation, an allow-list of formats.


def test_upper_case_data_urls_are_images(start_worker):
    worker = start_worker("llava-1.5", model_name="llava")
    image = encode_image(1)
    plain = worker.generate(greedy(PROMPT_1, [image]))[-1]
    assert plain["error_code"] == 0
    for url in (f"DATA:image/png;BASE64,{image}", f"Data:IMAGE/PNG;Base64,{image}"):
        assert worker.generate(greedy(PROMPT_1, [url]))[-1] == plain

    def chat(url: str) -> dict[str, Any]:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
        payload: dict[str, Any] = {
            "model": "llava",
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": 8,
        }
        answer = requests.post(worker.url + "/v1/chat/completions", json=payload, timeout=60)
        assert answer.status_code == 200, answer.text
        return dict(answer.json()["choices"][0]["message"])

    assert chat(f"DATA:IMAGE/PNG;BASE64,{image}") == chat(f"data:image/png;base64,{image}")


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_exif_orientation_is_applied_when_decoding():
    # Orientation 6: the camera was turned a quarter clockwise; the stored 40x30 picture is upright as 30x40.
    stored = make_test_image(7, (40, 30))
    decoded = decode_image(encoded(jpeg_with_orientation(stored, 6)), 0, ImageLimits())
    assert decoded.size == (30, 40)
    as_stored = Image.open(io.BytesIO(jpeg_with_orientation(stored, 6))).convert("RGB")
    assert decoded.tobytes() == as_stored.transpose(Image.Transpose.ROTATE_270).tobytes()
    # Without an orientation tag nothing turns.
    assert decode_image(encoded(jpeg_with_orientation(stored, 1)), 0, ImageLimits()).size == (40, 30)


def test_a_phone_photo_reaches_the_model_upright(start_worker):
    worker = start_worker("llava-1.5")
    jpeg = jpeg_with_orientation(make_test_image(7, (40, 30)), 6)
    # The very pixels the JPEG decodes to, stored sideways (as taken) and upright (as meant), losslessly.
    as_stored = Image.open(io.BytesIO(jpeg)).convert("RGB")
    upright = as_stored.transpose(Image.Transpose.ROTATE_270)

    def answer(data: bytes) -> Any:
        return worker.generate(greedy(PROMPT_1, [encoded(data)], max_new_tokens=12))[-1]

    from_phone = answer(jpeg)
    assert from_phone["error_code"] == 0
    assert from_phone == answer(png(upright))
    # The model does tell the two orientations apart, so the equality above is not a coincidence.
    assert answer(png(as_stored)) != from_phone


def image_file(fmt: str) -> bytes:
    buffer = io.BytesIO()
    make_test_image(3, (40, 30)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(("fmt", "name"), [("TIFF", "TIFF"), ("EPS", "EPS"), ("ICO", "ICO")])
def test_image_formats_outside_the_allow_list_are_refused(start_worker, fmt, name):
    worker = start_worker("llava-1.5")
    chunks = worker.generate(greedy(PROMPT_1, [encoded(image_file(fmt))]))
    assert chunks == [
        {
            "text": f"image 1 looks like a {name} file; accepted image formats: PNG, JPEG, WEBP, GIF, BMP",
            "error_code": 1,
        }
    ]
    for accepted in ("PNG", "JPEG"):
        assert worker.generate(greedy(PROMPT_1, [encoded(image_file(accepted))]))[-1]["error_code"] == 0
    # A format let in by --image-formats is read.
    tiff = start_worker("llava-1.5", image_formats="png,jpeg,tiff")
    assert tiff.generate(greedy(PROMPT_1, [encoded(image_file("TIFF"))]))[-1]["error_code"] == 0


def test_image_formats_are_checked_at_start_up():
    with pytest.raises(StartupError, match="--image-formats: 'NOPE' is not an image format"):
        validate_config(WorkerConfig(image_formats="PNG,NOPE"))
    with pytest.raises(StartupError, match="--image-formats names no format"):
        validate_config(WorkerConfig(image_formats=" , "))
    validate_config(WorkerConfig(image_formats="png, Jpeg"))


def test_unreadable_images_still_get_the_plain_message():
    with pytest.raises(ImageError, match="image 1 is not in an image format the worker can read"):
        decode_image(encoded(b"hello, not an image at all"), 0, ImageLimits())


# Routes nobody needs on an exposed worker.


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_api_docs_are_off_unless_asked_for(start_worker, path):
    assert requests.get(start_worker("text-only").url + path, timeout=30).status_code == 404
    assert requests.get(start_worker("text-only", serve_api_docs=True).url + path, timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (["s"] * 5, "too many stop strings: 5 given, at most 4 accepted (--max-stop-strings)"),
        (["x" * 41], "a stop string is 41 characters long; at most 40 accepted (--max-stop-length)"),
    ],
    ids=["too-many", "too-long"],
)
def test_stop_lists_are_bounded_on_every_route(start_worker, stop, message):
    """Stop strings are matched at every token on the engine thread: a list past the limits is refused
    before any work, on the LLaVA route and the OpenAI one, and the worker serves on."""
    worker = start_worker("text-only", model_name="text-only", max_stop_strings=4, max_stop_length=40)
    # On the LLaVA route, as every refusal found once the request is read: one error chunk.
    chunks = worker.generate(greedy(TEXT_PROMPT, max_new_tokens=4, stop=stop))
    assert len(chunks) == 1 and chunks[0]["error_code"] == 1 and chunks[0]["text"] == message
    body = {"model": "text-only", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stop": stop}
    answer = requests.post(worker.url + "/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text[:200]
    assert answer.json()["error"]["message"] == message
    # Within the limits a stop list is honoured, however it is split across tokens.
    full = worker.generate(greedy(TEXT_PROMPT, max_new_tokens=12))[-1]["text"].removeprefix(TEXT_PROMPT)
    stops = ["never there", full[3:6], full[5:9]]
    cut = worker.generate(greedy(TEXT_PROMPT, max_new_tokens=12, stop=stops))[-1]["text"].removeprefix(TEXT_PROMPT)
    assert cut == full[:3]
    assert_serves_afterwards(worker)


class HeldModel:
    """The engine's model, holding its first decode step until released (bounded), so a request keeps
    its slot for as long as the test needs."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.holding = threading.Event()
        self.release = threading.Event()

    def __call__(self, **kwargs: Any) -> Any:
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if tokens is not None and tokens.shape[1] == 1 and not self.release.is_set():
            self.holding.set()
            self.release.wait(30)
        return self._model(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def test_a_full_queue_refuses_at_once_and_the_others_are_served(start_worker):
    worker = start_worker("text-only", model_name="text-only", limit_model_concurrency=1, max_queue=1)
    held = HeldModel(worker.worker.engine._model)
    worker.worker.engine._model = held
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        results[name] = worker.generate(greedy(TEXT_PROMPT, max_new_tokens=4))

    threads = [threading.Thread(target=run, args=(name,)) for name in ("running", "waiting")]
    try:
        threads[0].start()
        assert held.holding.wait(30), "the first request holds the slot"
        threads[1].start()
        deadline = time.monotonic() + 30
        while worker.worker.gate.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.worker.gate.waiting == 1
        message = "the worker is overloaded: 1 requests are already waiting for a slot (at most 1, --max-queue)"
        # The LLaVA/FastChat stream: 429 and FastChat's ENGINE_OVERLOADED code, at once.
        status, chunks = stream_refusal(worker, json.dumps(greedy(TEXT_PROMPT, max_new_tokens=4)).encode())
        assert status == 429 and chunks[0]["error_code"] == 42903 and chunks[0]["text"].startswith(message)
        body: dict[str, Any] = {"model": "text-only", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        answer = requests.post(worker.url + "/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 429, answer.text[:200]
        assert answer.json()["error"]["code"] == "queue_full"
        fastchat = requests.post(
            worker.url + "/worker_generate", json=greedy(TEXT_PROMPT, max_new_tokens=4), timeout=60
        )
        assert fastchat.json()["error_code"] == 42903
    finally:
        held.release.set()
        for thread in threads:
            thread.join(60)
    assert [results[name][-1]["error_code"] for name in ("running", "waiting")] == [0, 0]
    assert_serves_afterwards(worker)


def thin_png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 255).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("kind", "settings", "size", "message"),
    [
        (
            "llava-1.5",
            {},
            (1, 300_000),
            "image 1 is 1x300000; resized so that its shorter side is 32 px, it would be 32x9600000 = 307200000 "
            "pixels, more than the 40000000 accepted",
        ),
        (
            "llava-1.5",
            {"pad_images": True},
            (15_000, 1),
            "image 1 is 15000x1; padded to a square, it would be 15000x15000 = 225000000 pixels, more than the "
            "40000000 accepted",
        ),
        (
            "llava-next",
            {},
            (200_000, 1),
            "image 1 is 200000x1; resized so that its shorter side is 32 px, it would be 6400000x32 = 204800000 "
            "pixels, more than the 40000000 accepted",
        ),
    ],
    ids=["shortest-edge", "pad-to-square", "llava-next"],
)
def test_thin_images_are_refused_before_preprocessing_blows_them_up(start_worker, kind, settings, size, message):
    """A strip of a few hundred bytes within the pixel limit would become gigabytes once resized by its
    short side or padded to a square: it is refused from its header, and the worker serves on."""
    worker = start_worker(kind, **settings)
    image = thin_png(*size)
    assert len(image) < 2000
    chunks = worker.generate(greedy(PROMPT_1, [image], max_new_tokens=4))
    assert chunks == [{"text": message, "error_code": 1}]
    assert worker.generate(greedy(PROMPT_1, [encode_image(1)], max_new_tokens=4))[-1]["error_code"] == 0


def test_a_request_s_images_are_bounded_in_pixels_together_before_any_is_decoded(start_worker):
    worker = start_worker("llava-1.5", max_request_pixels=1_000_000)
    big = thin_png(600, 600)  # 360 000 pixels, a few hundred bytes
    prompt = "USER: <image>\n<image>\n<image>\nCompare them. ASSISTANT:"
    chunks = worker.generate(greedy(prompt, [big, big, big], max_new_tokens=4))
    assert chunks == [
        {
            "text": "the request's 3 images have 1080000 pixels in all, more than the 1000000 accepted",
            "error_code": 1,
        }
    ]
    assert worker.generate(greedy(PROMPT_2, [big, big], max_new_tokens=4))[-1]["error_code"] == 0


class CountingSemaphore:
    """A semaphore that records how many holders it had at once."""

    def __init__(self, value: int) -> None:
        self._semaphore = threading.BoundedSemaphore(value)
        self._lock = threading.Lock()
        self.holders = 0
        self.most = 0

    def __enter__(self) -> None:
        self._semaphore.acquire()
        with self._lock:
            self.holders += 1
            self.most = max(self.most, self.holders)
        time.sleep(0.01)  # hold it a moment, so overlapping holders would show

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.holders -= 1
        self._semaphore.release()


def test_images_decode_a_bounded_number_at_a_time_across_requests():
    decoders = CountingSemaphore(1)
    images = [encode_image(seed) for seed in range(3)]
    threads = [threading.Thread(target=decode_images, args=(images, ImageLimits(), None, decoders)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert decoders.most == 1


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(start_worker):
    """Megabytes of prompt (within the body limit) would take the tokenizer seconds: no token is
    longer than the vocabulary's longest, so the length alone proves it cannot fit."""
    worker = start_worker("text-only")
    context = worker.worker.context_length
    longest = max(len(token) for token in worker.worker.loaded.tokenizer.get_vocab())
    most = 2 * context * longest
    prompt = "a " * 2_500_000  # 5 MB
    began = time.monotonic()
    chunks = worker.generate(greedy(prompt, max_new_tokens=4))
    assert time.monotonic() - began < 5
    assert chunks == [
        {
            "text": f"the prompt is {len(prompt)} characters long: it cannot fit the model's context of {context} "
            f"tokens (at most {most} characters accepted)",
            "error_code": 1,
        }
    ]
    # Just within the bound, the prompt is tokenized and answered as the original answers a prompt
    # that leaves no room (error code 0).
    near = "a " * (most // 2)
    assert worker.generate(greedy(near, max_new_tokens=4))[-1]["error_code"] == 0
    assert_serves_afterwards(worker)


def test_heavy_input_work_cannot_make_short_text_requests_wait(start_worker):
    """Input work runs in pools of the worker's own: with every heavy thread busy (images, long
    prompts), a short text request is still prepared and answered at once; the image request waits
    for a heavy thread and is then served."""
    worker = start_worker("llava-1.5", input_threads=1)
    busy = threading.Event()
    release = threading.Event()

    def occupy() -> None:
        busy.set()
        release.wait(30)

    blocker = worker.worker._heavy_inputs.submit(occupy)
    assert busy.wait(10)
    image_result: dict[str, Any] = {}
    image_thread = threading.Thread(
        target=lambda: image_result.update(
            chunks=worker.generate(greedy(PROMPT_1, [encode_image(1)], max_new_tokens=4))
        )
    )
    try:
        image_thread.start()
        began = time.monotonic()
        assert worker.generate(greedy(TEXT_PROMPT, max_new_tokens=4))[-1]["error_code"] == 0
        assert time.monotonic() - began < 5
        assert "chunks" not in image_result, "the image request waits for the heavy thread"
    finally:
        release.set()
        blocker.result(30)
        image_thread.join(30)
    assert image_result["chunks"][-1]["error_code"] == 0


def raw_connection(worker: RunningWorker) -> socket.socket:
    host, port = worker.url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    return connection


def test_a_body_sent_too_slowly_is_refused_and_the_connection_freed(start_worker):
    worker = start_worker("text-only", body_timeout=1.0)
    with raw_connection(worker) as connection:
        connection.sendall(
            b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        began = time.monotonic()
        answer = b""
        while b"\0" not in answer and time.monotonic() - began < 10:
            answer += connection.recv(65536)
    assert time.monotonic() - began < 5
    assert b"the request body did not arrive within 1 s" in answer
    assert_serves_afterwards(worker)


def test_idle_connections_are_closed_and_capped(start_worker):
    worker = start_worker("text-only", keep_alive_timeout=1, max_connections=3)
    # An idle keep-alive connection is closed after the timeout.
    with raw_connection(worker) as connection:
        connection.sendall(b"POST /worker_get_status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        answer = b""
        while b"queue_length" not in answer:
            answer += connection.recv(65536)
        assert b"200 OK" in answer
        began = time.monotonic()
        assert connection.recv(65536) == b"", "closed by the server"
        assert time.monotonic() - began < 5
    # Past the cap, the server answers 503 at once instead of holding more connections.
    idle = [raw_connection(worker) for _ in range(3)]
    try:
        time.sleep(0.2)
        refused = requests.post(worker.url + "/worker_get_status", timeout=10)
        assert refused.status_code == 503
    finally:
        for connection in idle:
            connection.close()
    wait_until_served = time.monotonic() + 10
    while time.monotonic() < wait_until_served:
        if requests.post(worker.url + "/worker_get_status", timeout=10).status_code == 200:
            break
        time.sleep(0.1)
    assert_serves_afterwards(worker)


def read_until_closed(connection: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    began = time.monotonic()
    connection.settimeout(within)
    answer = b""
    while True:
        try:
            data = connection.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        answer += data
    return answer, time.monotonic() - began


def test_headers_sent_too_slowly_or_never_close_the_connection(start_worker):
    worker = start_worker("text-only", header_timeout=1.0, keep_alive_timeout=30)
    # A connection that never sends a byte.
    with raw_connection(worker) as silent:
        answer, took = read_until_closed(silent, 10)
    assert answer == b"" and took < 4
    # Headers a byte at a time: each byte would have reset uvicorn's keep-alive timer.
    with raw_connection(worker) as slow:
        began = time.monotonic()
        closed = False
        for byte in b"POST /worker_get_status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n":
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - began > 6:
                break
        if not closed:
            answer, _ = read_until_closed(slow, 5)
            assert b"queue_length" not in answer
    assert time.monotonic() - began < 6
    # The deadline counts again for a later request on a kept-alive connection.
    with raw_connection(worker) as kept:
        kept.sendall(b"POST /worker_get_status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        answer = b""
        while b"queue_length" not in answer:
            answer += kept.recv(65536)
        kept.sendall(b"POST /worker_get")  # ... and nothing more
        answer, took = read_until_closed(kept, 10)
    assert answer == b"" and took < 4
    assert_serves_afterwards(worker)


HALF_CLOSED_REQUESTS = {
    "/worker_generate_stream": greedy(TEXT_PROMPT, max_new_tokens=6),
    "/worker_generate": greedy(TEXT_PROMPT, max_new_tokens=6),
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6},
}


@pytest.mark.parametrize("route", list(HALF_CLOSED_REQUESTS))
def test_a_client_that_half_closes_after_its_request_gets_its_answer(start_worker, route):
    """Like `nc -N`: the request is sent, the client shuts its sending side, then reads."""
    worker = start_worker("text-only")
    payload = dict(HALF_CLOSED_REQUESTS[route])
    if route.startswith("/v1"):
        payload["model"] = worker.worker.model_name
    body = json.dumps(payload).encode()
    with raw_connection(worker) as connection:
        connection.sendall(
            f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        connection.shutdown(socket.SHUT_WR)
        answer, took = read_until_closed(connection, 30)
    assert took < 30, "the server closes the connection after the answer"
    final = answer[answer.index(b"HTTP/1.1 2") :]  # interim `100 Continue` lines may come first
    assert final.startswith(b"HTTP/1.1 200 OK"), answer[:300]
    body_text = final.split(b"\r\n\r\n", 1)[1]
    if route == "/worker_generate_stream":
        assert b'"error_code": 0' in body_text
    elif route == "/worker_generate":
        assert b'"error_code":0' in body_text.replace(b" ", b"")
    else:
        assert b'"finish_reason"' in body_text
    assert_serves_afterwards(worker)
