"""LoadedModel: a loaded checkpoint with what turns requests into its inputs and its output into text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

#: The model classes whose forward reads video frames.
_VIDEO_MODELS = (LlavaOnevisionForConditionalGeneration, LlavaNextVideoForConditionalGeneration)


@dataclass
class LoadedModel:
    """A model with everything needed to turn requests into its inputs and its output into text."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: Any | None
    """The multimodal processor; None for a text-only model."""
    takes_images: bool
    context_length: int
    device: torch.device
    """Where inputs go (the device of the first layers when the model is spread over several)."""
    dtype: torch.dtype
    square_pad_colour: tuple[int, ...] | None = None
    """When set (`--pad-images`), images are centred on a square of this colour before the processor
    sees them, as the original LLaVA prepares them, instead of being centre-cropped."""

    @property
    def takes_videos(self) -> bool:
        """Whether the model reads videos (LLaVA-OneVision, LLaVA-NeXT-Video): frames through its
        video processor, in place of its video token."""
        return (
            isinstance(self.model, _VIDEO_MODELS)
            and getattr(self.processor, "video_processor", None) is not None
            and self.video_token is not None
        )

    @property
    def video_token(self) -> str | None:
        """The placeholder the processor expands into video tokens (`<video>`)."""
        return None if self.processor is None else getattr(self.processor, "video_token", None)

    @property
    def image_token(self) -> str | None:
        """The placeholder the processor expands into image tokens (`<image>` for LLaVA)."""
        if self.processor is None:
            return None
        return getattr(self.processor, "image_token", None)
