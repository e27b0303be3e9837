"""GenerationRequest: everything the engine needs to run one request, handed over in one object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llava_worker.engine.sampling import SamplingParams
from llava_worker.engine.streams import GenerationOutput
from llava_worker.models.inputs import PreparedInputs


@dataclass(frozen=True)
class GenerationRequest:
    """One request for the engine: its inputs, how to decode them, and when to stop."""

    inputs: PreparedInputs
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends before the first one generated."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation besides the model's end of sequence."""
    stream_interval: int = 1
    """Publish text every this many generated tokens."""
    on_done: Callable[[GenerationOutput], None] | None = None
    """Runs on the submitter's event loop once the request has left the engine, however it ended."""
