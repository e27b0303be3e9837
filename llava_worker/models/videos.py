"""Decodes the videos of a request (base64 files, optionally `data:` URLs) into the frames the model reads.

PyAV (FFmpeg) reads the container. Every cost is bounded before it is paid: the file's size before it
is decoded from base64, its length and frame size from its header before any frame is decoded, and
only the frames up to the last one sampled are decoded (each converted to RGB only if it is kept).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import av
import numpy as np

from llava_worker.errors import ImageError


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 32 * 1024 * 1024
    """Largest video file, after base64 decoding."""
    max_seconds: float = 600.0
    """Longest video, by its header."""
    max_frame_pixels: int = 40_000_000
    """Most pixels in one frame, by its header."""
    frames: int = 16
    """Frames sampled from each video, evenly over its length (fewer if it has fewer)."""
    max_total_pixels: int = 80_000_000
    """Most pixels in all the sampled frames of one video together."""
    max_file_frames: int = 18_000
    """Most frames in the file, by its header: decoding runs up to the last frame sampled, so this
    bounds the decoding work (10 minutes at 30 frames per second)."""


def decode_videos(encoded: tuple[str, ...], limits: VideoLimits) -> list[np.ndarray]:
    """Each video's sampled frames as an array (frames, height, width, 3) of RGB bytes; raises
    ImageError naming the video and what is wrong with it."""
    return [decode_video(data, f"video {index + 1}", limits) for index, data in enumerate(encoded)]


def decode_video(data: str, label: str, limits: VideoLimits) -> np.ndarray:
    raw = _file_bytes(data, label, limits)
    container_format = container_format_of(raw)
    if container_format is None:
        raise ImageError(f"{label} is not a video file the worker reads (MP4/MOV, Matroska/WebM, AVI, MPEG-TS)")
    try:
        container = av.open(io.BytesIO(raw), mode="r", format=container_format, metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise ImageError(f"{label} could not be read as {container_format} ({exc.__class__.__name__})") from None
    with container:
        if not container.streams.video:
            raise ImageError(f"{label} has no video stream")
        stream = container.streams.video[0]
        seconds = _seconds(container, stream)
        if seconds is None:
            raise ImageError(f"{label} does not say in its header how long it is")
        if seconds > limits.max_seconds:
            raise ImageError(f"{label} is {seconds:.1f} s long; at most {limits.max_seconds:g} s accepted")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_frame_pixels:
            raise ImageError(
                f"{label} has frames of {width}x{height} pixels; at most {limits.max_frame_pixels} pixels accepted"
            )
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or 0
        total = stream.frames or round(seconds * float(rate))
        if total < 1:
            raise ImageError(f"{label} does not say in its header how many frames it has")
        if total > limits.max_file_frames:
            raise ImageError(f"{label} has {total} frames; at most {limits.max_file_frames} accepted")
        wanted = sample_indices(total, limits.frames)
        if len(wanted) * width * height > limits.max_total_pixels:
            raise ImageError(
                f"{label}: {len(wanted)} frames of {width}x{height} pixels are more than the "
                f"{limits.max_total_pixels} pixels accepted for one video"
            )
        frames = _decode_frames(container, stream, wanted, label)
    return np.stack(frames)


def container_format_of(raw: bytes) -> str | None:
    """The FFmpeg demuxer for `raw` (mp4, matroska, avi or mpegts), by its signature; None for anything
    else. Naming the demuxer means FFmpeg never probes for one, so its playlist and concat demuxers,
    which open the files and URLs a file names, are never reached."""
    if raw[4:8] == b"ftyp" or raw[4:8] in (b"moov", b"mdat", b"wide", b"free"):
        return "mp4"
    if raw[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if raw[:4] == b"RIFF" and raw[8:12] == b"AVI ":
        return "avi"
    if len(raw) >= 377 and raw[0] == raw[188] == raw[376] == 0x47:
        return "mpegts"
    return None


def sample_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over `total` frames, first and last included (all of
    them when there are no more than `count`)."""
    if total <= count:
        return list(range(total))
    return sorted({int(index) for index in np.linspace(0, total - 1, count).round()})


def _decode_frames(
    container: av.container.InputContainer, stream: av.VideoStream, wanted: list[int], label: str
) -> list[np.ndarray]:
    keep = set(wanted)
    last = wanted[-1]
    frames: list[np.ndarray] = []
    try:
        for index, frame in enumerate(container.decode(stream)):
            if index in keep:
                frames.append(frame.to_ndarray(format="rgb24"))
            if index >= last:
                break
    except (av.FFmpegError, ValueError) as exc:
        raise ImageError(f"{label} could not be decoded ({exc.__class__.__name__})") from None
    if not frames:
        raise ImageError(f"{label} has no frame that could be decoded")
    # A header may promise more frames than the stream has: the last one stands in for the missing.
    frames += [frames[-1]] * (len(wanted) - len(frames))
    return frames


def _seconds(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _file_bytes(data: str, label: str, limits: VideoLimits) -> bytes:
    if data[:5].lower() == "data:":
        comma = data.find(",")
        if comma < 0 or ";base64" not in data[:comma].lower():
            raise ImageError(f"{label} is a data: URL that is not base64")
        data = data[comma + 1 :]
    # Base64 holds 3 bytes in 4 characters: the size is known before decoding.
    if len(data) // 4 * 3 > limits.max_bytes + 3:
        raise ImageError(f"{label} is larger than the {limits.max_bytes} bytes accepted")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label} is not valid base64") from None
    if len(raw) > limits.max_bytes:
        raise ImageError(f"{label} is larger than the {limits.max_bytes} bytes accepted")
    return raw
