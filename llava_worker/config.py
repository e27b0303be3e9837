"""WorkerConfig: every setting of one worker process, defined once and passed explicitly."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal, get_args

from llava_worker.errors import StartupError

#: The original worker's hard cap on `max_new_tokens`, kept so clients see the same limits.
MAX_NEW_TOKENS_CAP = 1024
#: `max_new_tokens` when a request does not say.
DEFAULT_MAX_NEW_TOKENS = 256
#: Context length for a model whose config names none (the original's fallback).
DEFAULT_CONTEXT_LENGTH = 2048


#: The image file formats decoded by default (Pillow's names): what browsers, phones and OpenAI's API use.
DEFAULT_IMAGE_FORMATS = "PNG,JPEG,WEBP,GIF,BMP"

#: The devices `--device` accepts.
Device = Literal["cuda", "cpu", "mps"]


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker process; built by the CLI, read everywhere else.

    Each field is a flag of `python -m llava_worker` and its docstring is that flag's help, in `--help`
    and in the README's table (`scripts/flags_table.py`), so write it for the user.
    """

    model_path: str = "facebook/opt-350m"
    """Checkpoint directory or Hugging Face hub id (e.g. `llava-hf/llava-1.5-7b-hf`)."""
    host: str = "localhost"
    """Address to listen on; the default keeps the worker private, `0.0.0.0` exposes it on every interface."""
    port: int = 21002
    """Port to listen on."""
    worker_address: str = "http://localhost:21002"
    """URL at which the controller and clients reach this worker (sent to the controller as the worker's name)."""
    controller_address: str = "http://localhost:21001"
    """URL of the LLaVA/FastChat controller."""
    model_base: str | None = None
    """Base language model of a LoRA or projector-only checkpoint in the original LLaVA layout (e.g.
    `lmsys/vicuna-7b-v1.5`), or of a plain LoRA adapter; refused for full checkpoints."""
    vision_tower: str | None = None
    """CLIP tower (hub id or local directory) of an original-format checkpoint, instead of the
    `mm_vision_tower` its config names: a local copy for machines without network. Refused for other
    checkpoints."""
    pad_images: bool = False
    """llava-hf LLaVA-1.5 checkpoints: pad each image to a square of the mean colour before resizing, as the
    original LLaVA does, instead of centre-cropping it. Refused for other llava-hf models; original-format
    checkpoints already do what their config says."""
    model_name: str | None = None
    """Name announced to the controller; by default the last component of `--model-path`, or
    `<parent>_checkpoint-N` for a `checkpoint-N` directory."""
    device: Device = "cuda"
    """Where to run the model; if the requested accelerator is absent, the worker logs a line and runs on
    the CPU."""
    multi_modal: bool = False
    """Require image support: refuse to start unless the loaded model takes images (normally image support
    is detected from the model)."""
    limit_model_concurrency: int = 5
    """Requests that decode together in one batch; further requests wait in arrival order."""
    max_batch_tokens: int | None = None
    """KV tokens the running requests may hold together, each counting its prompt (image tokens
    included) and its `max_new_tokens`: requests wait in order until theirs fit, and one that never
    could is refused at once. Default on a GPU: what its free memory holds at start-up, less the caches
    and a tenth for activations; elsewhere no limit."""
    max_queue: int = 256
    """Most requests waiting for a slot; further ones are refused at once (HTTP 429, FastChat's error
    code 42903) instead of waiting without end."""
    stream_interval: int = 1
    """Send a chunk every N generated tokens."""
    prefill_chunk_tokens: int | None = None
    """While requests decode, prefill newcomers' prompts (image tokens included) in pieces of at most
    this many tokens per decode step, so running streams keep their pace; the piece grows with the
    square of the ratio of waiting to decoding requests when more wait than decode. 0 prefills each
    prompt at once. Default: 24 on the CPU (where a prompt token costs about a tenth of a decode
    step), 512 on a GPU. Smaller pieces mean steadier streams and a later first token for newcomers."""
    image_cache_mb: int = 256
    """Memory (on the model's device) for image features kept by image content, so an image sent again,
    in the next turn of a chat or by another client, skips the vision tower; 0 turns the cache off."""
    prefix_cache_mb: int = 1024
    """Memory (on the model's device) for the KV states of finished requests, so a request that starts
    like one of them (the next turn of a chat, a shared system prompt) prefills only what is new; 0
    turns the cache off. A token takes 2 x layers x KV heads x head size x bytes per value: 512 KiB for a
    7B Llama in fp16; the start-up log says it for the loaded model."""
    no_register: bool = False
    """Never talk to the controller (serve clients directly)."""
    load_8bit: bool = False
    """Quantize the language model to 8 bits (needs bitsandbytes)."""
    load_4bit: bool = False
    """Quantize the language model to 4 bits, NF4 (needs bitsandbytes)."""
    use_flash_attn: bool = False
    """Use FlashAttention-2 (needs the `flash-attn` package; refused at start-up without it)."""
    heartbeat_interval: float = 15.0
    """Seconds between heartbeats to the controller; also the retry period while it is unreachable."""
    controller_timeout: float = 5.0
    """Seconds before a call to the controller counts as failed."""
    keepalive_interval: float = 2.0
    """Seconds between the lone `\\0` bytes sent to a request that waits for a slot; keep it under the 5 s
    read timeout of LLaVA's controller proxy."""
    shutdown_grace: float = 30.0
    """On SIGTERM/SIGINT, seconds running requests may finish before they are cancelled."""
    log_file: str | None = None
    """Also write the log to this file."""
    max_connections: int = 512
    """Connections the server keeps open at once; one more is answered 503 and closed, so idle or slow
    clients cannot take every file descriptor. Lowered at start-up to fit the process's open-file limit."""
    header_timeout: float = 10.0
    """Seconds a request's headers may take to arrive, counted from the connection (or from the first byte
    of a later request on it); a connection that sends them slower is closed."""
    keep_alive_timeout: int = 5
    """Seconds an idle keep-alive connection stays open."""
    body_timeout: float = 30.0
    """Seconds a request's body may take to arrive; a client that sends it slower is refused."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest request body, in bytes."""
    max_images: int = 16
    """Most images in one request."""
    max_stop_strings: int = 32
    """Most stop strings in one request (OpenAI's API allows 4, LLaVA's web UI sends 1)."""
    max_stop_length: int = 512
    """Longest stop string in one request, in characters."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Largest image file in bytes, after base64 decoding."""
    max_image_pixels: int = 40_000_000
    """Most pixels (width × height) in one image, checked from its header before it is decoded."""
    max_request_pixels: int = 80_000_000
    """Most pixels in all the images of one request together, checked from their headers before any
    is decoded."""
    input_threads: int = 2
    """Threads for heavy input work (requests with images, long prompts), all requests together. Light
    work (short text prompts) has threads of its own, so it never waits behind heavy work."""
    image_decoders: int = 2
    """Images decoded at the same time, all requests together; the others wait their turn, so a burst
    of large images cannot take every core and all the memory at once."""
    image_formats: str = DEFAULT_IMAGE_FORMATS
    """Image file formats the worker decodes, comma-separated, as Pillow names them (e.g. `PNG,JPEG,TIFF`).
    Other files are refused before any decoder reads them, which keeps Pillow's rarely used decoders (and
    the Ghostscript that EPS runs) out of reach of requests."""
    max_videos: int = 1
    """Most videos in one request (for models that take videos: LLaVA-OneVision, LLaVA-NeXT-Video)."""
    max_video_bytes: int = 32 * 1024 * 1024
    """Largest video file in bytes, after base64 decoding."""
    max_video_seconds: float = 600.0
    """Longest video in seconds, read from its header before any frame is decoded."""
    video_frames: int = 16
    """Frames sampled from each video, evenly over its length, for the model to read."""
    max_video_file_frames: int = 18_000
    """Most frames a video file may have (by its header): the frames up to the last one sampled are
    decoded, so this bounds the decoding work."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens, image tokens included; by default only the model's context length bounds
    it."""
    allow_remote_images: bool = False
    """Let `/v1/chat/completions` fetch `http(s)` image URLs; without it only `data:` URLs are accepted."""
    remote_image_timeout: float = 10.0
    """Seconds one remote image may take to arrive in full."""
    allow_private_image_hosts: bool = False
    """Let remote image URLs reach private, loopback, link-local and other non-public addresses (checked
    after the host name is resolved, and the connection made to the checked address). Off by default,
    so that requests cannot make the worker reach into its own network."""
    image_fetchers: int = 4
    """Requests fetching remote images at the same time; the others wait their turn, counted against
    `--max-queue`."""
    serve_api_docs: bool = False
    """Serve FastAPI's interactive API docs and schema (`/docs`, `/redoc`, `/openapi.json`); off by default,
    so an exposed worker does not describe itself to strangers."""

    @property
    def served_model_name(self) -> str:
        """The name the worker announces: `--model-name`, else the original's path rule."""
        if self.model_name:
            return self.model_name
        return model_name_from_path(self.model_path)

    @property
    def image_format_names(self) -> tuple[str, ...]:
        """`--image-formats` as a list of Pillow's format names: `("PNG", "JPEG")`."""
        return parse_image_formats(self.image_formats)


def parse_image_formats(formats: str) -> tuple[str, ...]:
    """Comma-separated format names, upper-cased as Pillow spells them, blanks dropped."""
    return tuple(dict.fromkeys(name.strip().upper() for name in formats.split(",") if name.strip()))


def model_name_from_path(model_path: str) -> str:
    """The original's rule: the last `/`-separated component (one trailing `/` dropped); a
    `checkpoint-N` component is prefixed with its parent's name."""
    parts = model_path.removesuffix("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def validate_config(config: WorkerConfig) -> None:
    """Refuses impossible settings before anything heavy is imported or loaded.

    Raises StartupError with one line that names the flag.
    """
    if config.load_8bit and config.load_4bit:
        raise StartupError("--load-8bit and --load-4bit cannot be used together; choose one")
    if (config.load_8bit or config.load_4bit) and importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load-8bit" if config.load_8bit else "--load-4bit"
        raise StartupError(f"{flag} needs bitsandbytes: pip install 'llava-worker[quant]'")
    if config.use_flash_attn and importlib.util.find_spec("flash_attn") is None:
        raise StartupError("--use-flash-attn needs the flash-attn package: pip install flash-attn")
    if config.device not in get_args(Device):
        raise StartupError(f"--device must be one of {', '.join(get_args(Device))}, not {config.device!r}")
    if config.limit_model_concurrency < 1:
        raise StartupError("--limit-model-concurrency must be at least 1")
    if config.stream_interval < 1:
        raise StartupError("--stream-interval must be at least 1")
    _check_amounts(config)
    _check_image_formats(config.image_format_names)


def _check_amounts(config: WorkerConfig) -> None:
    """Refuses limits, intervals and budgets out of their range."""
    positive = {
        "--heartbeat-interval": config.heartbeat_interval,
        "--controller-timeout": config.controller_timeout,
        "--keepalive-interval": config.keepalive_interval,
        "--max-request-bytes": config.max_request_bytes,
        "--max-connections": config.max_connections,
        "--header-timeout": config.header_timeout,
        "--keep-alive-timeout": config.keep_alive_timeout,
        "--body-timeout": config.body_timeout,
        "--max-images": config.max_images,
        "--max-videos": config.max_videos,
        "--max-video-bytes": config.max_video_bytes,
        "--max-video-seconds": config.max_video_seconds,
        "--video-frames": config.video_frames,
        "--max-video-file-frames": config.max_video_file_frames,
        "--max-queue": config.max_queue,
        "--max-batch-tokens": config.max_batch_tokens if config.max_batch_tokens is not None else 1,
        "--max-stop-strings": config.max_stop_strings,
        "--max-stop-length": config.max_stop_length,
        "--max-image-bytes": config.max_image_bytes,
        "--max-image-pixels": config.max_image_pixels,
        "--max-request-pixels": config.max_request_pixels,
        "--image-decoders": config.image_decoders,
        "--input-threads": config.input_threads,
        "--max-prompt-tokens": config.max_prompt_tokens if config.max_prompt_tokens is not None else 1,
        "--remote-image-timeout": config.remote_image_timeout,
        "--image-fetchers": config.image_fetchers,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise StartupError(f"{flag} must be positive, not {value}")
    not_negative = {
        "--shutdown-grace": config.shutdown_grace,
        "--prefill-chunk-tokens": config.prefill_chunk_tokens or 0,
        "--image-cache-mb": config.image_cache_mb,
        "--prefix-cache-mb": config.prefix_cache_mb,
    }
    for flag, value in not_negative.items():
        if value < 0:
            raise StartupError(f"{flag} must not be negative, not {value}")


def _check_image_formats(names: tuple[str, ...]) -> None:
    """Refuses an `--image-formats` list that is empty or names a format Pillow cannot read."""
    if not names:
        raise StartupError("--image-formats names no format; give at least one, e.g. PNG,JPEG")
    # Imported here: the command line answers --help and flag errors without loading image libraries.
    from PIL import Image

    Image.init()  # registers every decoder Pillow has, so the check knows them all
    for name in names:
        if name not in Image.OPEN:
            raise StartupError(
                f"--image-formats: {name!r} is not an image format the worker can read; "
                f"Pillow reads {', '.join(sorted(Image.OPEN))}"
            )
