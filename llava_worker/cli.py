"""Command line of the worker: flags generated from WorkerConfig → WorkerConfig → a running server."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence

from llava_worker.config import WorkerConfig, validate_config
from llava_worker.errors import StartupError
from llava_worker.flags import config_flags
from llava_worker.logs import RepeatLimit

logger = logging.getLogger("llava_worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava_worker",
        description="Serve a LLaVA-family (or plain language) model to a LLaVA/FastChat controller.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag in config_flags():
        # The formatter %-formats help texts to fill in the defaults.
        parser.add_argument(flag.option, dest=flag.name, help=flag.help.replace("%", "%%"), **flag.argparse_kwargs)
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> WorkerConfig:
    args = build_parser().parse_args(argv)
    return WorkerConfig(**{flag.name: getattr(args, flag.name) for flag in config_flags()})


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
    # The model, tokenizer and libraries are hundreds of thousands of objects that live as long as
    # the process: out of the collector's sight, a full collection takes milliseconds instead of
    # pausing every stream for a fifth of a second.
    gc.collect()
    gc.freeze()
    logger.info("serving %s on http://%s:%d", worker.model_name, config.host, config.port)
    serve(worker)
    logger.info("stopped")


def configure_logging(log_file: str | None) -> None:
    """Log lines go to stderr, and to `log_file` too when given; stdout and stderr stay untouched.
    Lines that repeat in a burst are dropped past a few (RepeatLimit), so no fault can flood the log."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        try:
            handlers.append(logging.FileHandler(log_file))
        except OSError as exc:
            print(f"llava-worker: error: --log-file {log_file}: {exc.strerror}", file=sys.stderr)
            sys.exit(2)
    repeat_limit = RepeatLimit()
    for handler in handlers:
        handler.addFilter(repeat_limit)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)
