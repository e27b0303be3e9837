"""Command line of the worker: the original's flags → WorkerConfig → a running server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from llava_worker.config import WorkerConfig, validate_config
from llava_worker.errors import StartupError

logger = logging.getLogger("llava_worker")


def build_parser() -> argparse.ArgumentParser:
    defaults = WorkerConfig(model_path="")
    parser = argparse.ArgumentParser(
        prog="python -m llava_worker",
        description="Serve a LLaVA-family (or plain language) model to a LLaVA/FastChat controller.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=defaults.host, help="address to listen on; 0.0.0.0 exposes it")
    parser.add_argument("--port", type=int, default=defaults.port, help="port to listen on")
    parser.add_argument(
        "--worker-address",
        default=defaults.worker_address,
        help="URL at which the controller and clients reach this worker",
    )
    parser.add_argument("--controller-address", default=defaults.controller_address, help="URL of the controller")
    parser.add_argument(
        "--model-path",
        default="facebook/opt-350m",
        help="checkpoint directory or Hugging Face hub id (e.g. llava-hf/llava-1.5-7b-hf)",
    )
    parser.add_argument(
        "--model-base",
        default=None,
        help="base language model of a LoRA or projector-only checkpoint (original LLaVA layout), or of a plain LoRA",
    )
    parser.add_argument(
        "--vision-tower",
        default=None,
        help="CLIP tower (hub id or local directory) for an original-format LLaVA checkpoint, "
        "instead of the mm_vision_tower its config names",
    )
    parser.add_argument(
        "--pad-images",
        action="store_true",
        help="llava-hf LLaVA-1.5 checkpoints: pad images to a square of the mean colour, as the original "
        "LLaVA does, instead of centre-cropping them",
    )
    parser.add_argument(
        "--model-name", default=None, help="name announced to the controller (default: from --model-path)"
    )
    parser.add_argument(
        "--device",
        default=defaults.device,
        choices=["cuda", "cpu", "mps"],
        help="where to run the model; without CUDA/MPS the worker falls back to the CPU and says so",
    )
    parser.add_argument(
        "--multi-modal",
        action="store_true",
        help="require image support (normally detected from the loaded model)",
    )
    parser.add_argument(
        "--limit-model-concurrency",
        type=int,
        default=defaults.limit_model_concurrency,
        help="generations that run at once; further requests wait in arrival order",
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=defaults.stream_interval,
        help="send a chunk every N generated tokens",
    )
    parser.add_argument("--no-register", action="store_true", help="do not talk to the controller at all")
    parser.add_argument("--load-8bit", action="store_true", help="quantize the language model to 8 bits")
    parser.add_argument("--load-4bit", action="store_true", help="quantize the language model to 4 bits (NF4)")
    parser.add_argument(
        "--use-flash-attn", action="store_true", help="use FlashAttention-2 (needs the flash-attn package)"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=defaults.heartbeat_interval,
        help="seconds between heartbeats to the controller",
    )
    limits = parser.add_argument_group("limits and operation")
    limits.add_argument(
        "--keepalive-interval",
        type=float,
        default=defaults.keepalive_interval,
        help="seconds between the lone NUL bytes sent to a request that waits for a slot",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=float,
        default=defaults.shutdown_grace,
        help="on SIGTERM/SIGINT, seconds running requests may finish before they are cancelled",
    )
    limits.add_argument("--log-file", default=None, help="also write the log to this file")
    limits.add_argument(
        "--max-request-bytes", type=int, default=defaults.max_request_bytes, help="largest request body"
    )
    limits.add_argument("--max-images", type=int, default=defaults.max_images, help="most images in one request")
    limits.add_argument(
        "--max-image-bytes", type=int, default=defaults.max_image_bytes, help="largest image file, decoded"
    )
    limits.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help="most pixels in one image (checked before decoding it)",
    )
    limits.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt in tokens, image tokens included (default: the model's context length)",
    )
    limits.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let /v1/chat/completions fetch http(s) image URLs (otherwise only data: URLs are accepted)",
    )
    limits.add_argument(
        "--remote-image-timeout",
        type=float,
        default=defaults.remote_image_timeout,
        help="seconds one remote image may take to arrive in full",
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> WorkerConfig:
    args = build_parser().parse_args(argv)
    return WorkerConfig(
        model_path=args.model_path,
        host=args.host,
        port=args.port,
        worker_address=args.worker_address,
        controller_address=args.controller_address,
        model_base=args.model_base,
        vision_tower=args.vision_tower,
        pad_images=args.pad_images,
        model_name=args.model_name,
        device=args.device,
        multi_modal=args.multi_modal,
        limit_model_concurrency=args.limit_model_concurrency,
        stream_interval=args.stream_interval,
        no_register=args.no_register,
        load_8bit=args.load_8bit,
        load_4bit=args.load_4bit,
        use_flash_attn=args.use_flash_attn,
        heartbeat_interval=args.heartbeat_interval,
        keepalive_interval=args.keepalive_interval,
        shutdown_grace=args.shutdown_grace,
        log_file=args.log_file,
        max_request_bytes=args.max_request_bytes,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_prompt_tokens=args.max_prompt_tokens,
        allow_remote_images=args.allow_remote_images,
        remote_image_timeout=args.remote_image_timeout,
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = config_from_args(argv)
    configure_logging(config.log_file)
    try:
        # Checked before torch is imported, so impossible flags are refused at once.
        validate_config(config)
        # Imported here so that `--help` and flag errors answer without loading torch.
        from llava_worker.models.loader import load_model

        loaded = load_model(config)
    except StartupError as exc:
        print(f"llava-worker: error: {exc}", file=sys.stderr)
        sys.exit(2)

    from llava_worker.http.launcher import serve
    from llava_worker.worker import ModelWorker

    worker = ModelWorker(config, loaded)
    logger.info("serving %s on http://%s:%d", worker.model_name, config.host, config.port)
    serve(worker)
    logger.info("stopped")


def configure_logging(log_file: str | None) -> None:
    """Log lines go to stderr, and to `log_file` too when given; stdout and stderr stay untouched."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        try:
            handlers.append(logging.FileHandler(log_file))
        except OSError as exc:
            print(f"llava-worker: error: --log-file {log_file}: {exc.strerror}", file=sys.stderr)
            sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)
