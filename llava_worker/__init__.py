"""llava-worker: a LLaVA model worker that speaks the LLaVA/FastChat controller protocol."""

__version__ = "0.1.0"
