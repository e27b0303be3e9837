"""Videos: decoded by PyAV within their limits, frames sampled evenly, and OneVision's answer about a
video equal to `generate` with the same frames, on the worker's own route and the OpenAI one."""

from __future__ import annotations

import base64
import io
from typing import Any

import av
import numpy as np
import openai
import pytest
import requests
import torch

from llava_worker.errors import ImageError
from llava_worker.models.videos import VideoLimits, decode_video, sample_indices
from tests.support.kinds import needs_torchvision
from tests.support.payloads import encode_image

QUESTION = "<|im_start|>user\n<video>\nWhat happens here?<|im_end|>\n<|im_start|>assistant\n"


def make_clip(frames: int = 12, size: tuple[int, int] = (48, 40), rate: int = 6, container: str = "mp4") -> bytes:
    """A small clip of random frames, encoded as the tests' own video file."""
    width, height = size
    buffer = io.BytesIO()
    rng = np.random.default_rng(frames * 1000 + width)
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            picture = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def every_frame(raw: bytes) -> list[np.ndarray]:
    """All the clip's frames, decoded by the test on its own."""
    with av.open(io.BytesIO(raw), mode="r") as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("container", ["mp4", "matroska", "avi", "mpegts"])
def test_frames_are_sampled_evenly_from_each_container(container):
    raw = make_clip(frames=12, container=container)
    frames = decode_video(b64(raw), "video 1", VideoLimits(frames=4))
    everything = every_frame(raw)
    assert frames.shape == (4, 40, 48, 3)
    for got, index in zip(frames, sample_indices(len(everything), 4), strict=True):
        np.testing.assert_array_equal(got, everything[index])


def test_sample_indices():
    assert sample_indices(12, 4) == [0, 4, 7, 11]
    assert sample_indices(3, 8) == [0, 1, 2]


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        (b64(make_clip()), VideoLimits(max_bytes=1000), "video 1 is larger than the 1000 bytes accepted"),
        (b64(make_clip(frames=30, rate=2)), VideoLimits(max_seconds=5), "video 1 is 15.0 s long; at most 5 s accepted"),
        (b64(make_clip()), VideoLimits(max_frame_pixels=100), "frames of 48x40 pixels; at most 100 pixels"),
        (b64(make_clip()), VideoLimits(frames=8, max_total_pixels=10_000), "8 frames of 48x40 pixels are more than"),
        (b64(make_clip(frames=30)), VideoLimits(max_file_frames=20), "video 1 has 30 frames; at most 20 accepted"),
        (encode_image(1), VideoLimits(), "video 1 is not a video file the worker reads"),
        (b64(b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n"), VideoLimits(), "not a video file the worker reads"),
        ("not base64!", VideoLimits(), "video 1 is not valid base64"),
        (b64(make_clip()[:600]), VideoLimits(), "video 1"),
    ],
    ids=[
        "bytes",
        "seconds",
        "frame-pixels",
        "total-pixels",
        "file-frames",
        "an-image",
        "a-playlist",
        "base64",
        "truncated",
    ],
)
def test_videos_over_a_limit_or_unreadable_are_refused_by_name(data, limits, message):
    with pytest.raises(ImageError, match=message.replace("(", r"\(")):
        decode_video(data, "video 1", limits)


def video_reference(loaded: Any, prompt: str, raw: bytes, frames: int, max_new_tokens: int) -> str:
    everything = every_frame(raw)
    picked = np.stack([everything[index] for index in sample_indices(len(everything), frames)])
    inputs = loaded.processor(text=[prompt], videos=[picked], return_tensors="pt")
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return str(loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


VIDEO_QUESTIONS = {
    "llava-onevision": (QUESTION, "<|im_start|>user\n<image>\n<video>\nAnd now?<|im_end|>\n<|im_start|>assistant\n"),
    "llava-next-video": ("USER: <video>\nWhat happens here? ASSISTANT:", "USER: <image>\n<video>\nAnd now? ASSISTANT:"),
}


@needs_torchvision
@pytest.mark.parametrize("kind", list(VIDEO_QUESTIONS))
def test_a_video_model_answers_about_a_video_as_generate_does(start_worker, kind):
    worker = start_worker(kind, video_frames=4)
    question, mixed = VIDEO_QUESTIONS[kind]
    raw = make_clip(frames=12)
    expected = video_reference(worker.worker.loaded, question, raw, 4, 10)
    payload: dict[str, Any] = {"prompt": question, "videos": [b64(raw)], "temperature": 0, "max_new_tokens": 10}
    assert worker.generate(payload)[-1] == {"text": question + expected, "error_code": 0}
    whole = requests.post(worker.url + "/worker_generate", json=payload, timeout=60).json()
    assert whole["text"] == question + expected and whole["error_code"] == 0
    # The OpenAI route: a video_url part, rendered by the checkpoint's own template.
    client = openai.OpenAI(base_url=worker.url + "/v1", api_key="none")
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(raw)}},
                {"type": "text", "text": "What happens here?"},
            ],
        }
    ]
    answer = client.chat.completions.create(
        model=worker.worker.model_name, messages=messages, max_tokens=10, temperature=0
    )
    assert answer.choices[0].message.content == expected
    # An image and a video in one request.
    chunks = worker.generate({**payload, "prompt": mixed, "images": [encode_image(2)]})
    assert chunks[-1]["error_code"] == 0


@pytest.mark.parametrize(
    ("kind", "payload", "message"),
    [
        (
            "llava-1.5",
            {"prompt": "USER: <video>\nHi ASSISTANT:"},
            "this model does not accept videos, but the request has 1 video",
        ),
        pytest.param(
            "llava-onevision",
            {"prompt": "<video><video> Hi"},
            "1 video given, but the prompt has 2 <video> placeholders",
            marks=needs_torchvision,
        ),
        pytest.param(
            "llava-onevision",
            {"prompt": "<video> Hi", "max_video_bytes": 1},
            "video 1 is larger than",
            marks=needs_torchvision,
        ),
    ],
)
def test_video_refusals_are_clear(start_worker, kind, payload, message):
    settings = {"max_video_bytes": payload.pop("max_video_bytes")} if "max_video_bytes" in payload else {}
    worker = start_worker(kind, **settings)
    body = {**payload, "videos": [b64(make_clip())], "max_new_tokens": 4}
    chunks = worker.generate(body)
    assert chunks[-1]["error_code"] != 0 and message in chunks[-1]["text"], chunks


@needs_torchvision
def test_the_openai_route_takes_videos_as_data_urls_only(start_worker):
    worker = start_worker("llava-onevision")
    client = openai.OpenAI(base_url=worker.url + "/v1", api_key="none")
    messages: Any = [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}]}
    ]
    with pytest.raises(openai.BadRequestError, match="video 1 must be sent as a data: URL"):
        client.chat.completions.create(model=worker.worker.model_name, messages=messages, max_tokens=4)
