"""Turns a prompt, its images and videos into model inputs: validation, token mapping, tokenisation."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from llava_worker.errors import ImageError, InvalidRequestError, plural
from llava_worker.models.images import ImageLimits, Preprocessing, decode_images, pad_to_square
from llava_worker.models.loaded import LoadedModel
from llava_worker.models.videos import VideoLimits, decode_videos
from llava_worker.models.vision import ImageSpan, TowerLayout, image_spans, tower_layout

#: The placeholder clients put in the prompt, one per image (LLaVA's convention).
IMAGE_PLACEHOLDER = "<image>"
#: FastChat's API server marks images so; LLaVA's prompts put the image before the text, on its own line.
FASTCHAT_IMAGE_PLACEHOLDER = "$$<image>$$"
#: The placeholder clients put in the prompt, one per video.
VIDEO_PLACEHOLDER = "<video>"


@dataclass
class PreparedInputs:
    """Tensors for `model.generate` / a forward pass, in the model's dtype but still in host memory:
    a request that waits for its turn holds no device memory. `on_device` moves them at admission."""

    tensors: dict[str, Any]
    """`input_ids`, `attention_mask` and, with images, `pixel_values` (+ `image_sizes`)."""
    prompt_tokens: int
    """Length of `input_ids`, image tokens included: what the prompt takes of the context."""
    images: tuple[ImageSpan, ...] | None = ()
    """The prompt's images one by one; None when the model cannot take them apart, and the prompt
    must run through the model's forward whole (alone, not chunked, not cached)."""

    @property
    def input_ids(self) -> torch.Tensor:
        ids: torch.Tensor = self.tensors["input_ids"]
        return ids

    def on_device(self, device: torch.device) -> PreparedInputs:
        """The same inputs on `device` (the images' tower inputs too)."""
        return self._converted(lambda tensor: tensor.to(device))

    def _converted(self, convert: Callable[[torch.Tensor], torch.Tensor]) -> PreparedInputs:
        """The same inputs with `convert` applied to every tensor, the images' tower inputs included."""

        def each(values: dict[str, Any]) -> dict[str, Any]:
            return {name: convert(v) if isinstance(v, torch.Tensor) else v for name, v in values.items()}

        spans = self.images
        if spans:
            spans = tuple(replace(span, pixels=each(span.pixels)) for span in spans)
        return replace(self, tensors=each(self.tensors), images=spans)


def prepare_inputs(
    loaded: LoadedModel,
    prompt: str,
    encoded_images: tuple[str, ...],
    image_limits: ImageLimits,
    max_prompt_tokens: int | None = None,
    decoders: threading.Semaphore | None = None,
    encoded_videos: tuple[str, ...] = (),
    video_limits: VideoLimits | None = None,
) -> PreparedInputs:
    """Validates the images and videos against the prompt and builds the model's inputs.

    Raises ImageError when images (videos) are given to a model that takes none, when their number
    differs from the number of `<image>` (`<video>`) placeholders, or when one cannot be decoded.
    """
    prompt = prompt.replace(FASTCHAT_IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER + "\n")
    _check_image_count(loaded, prompt, len(encoded_images))
    _check_video_count(loaded, prompt, len(encoded_videos))

    if loaded.processor is None:
        encoded = loaded.tokenizer(prompt, return_tensors="pt")
        tensors = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    else:
        images = decode_images(encoded_images, image_limits, preprocessing_of(loaded), decoders)
        if loaded.square_pad_colour is not None:
            images = [pad_to_square(image, loaded.square_pad_colour) for image in images]
        text = prompt
        image_token = loaded.image_token
        if image_token and image_token != IMAGE_PLACEHOLDER:
            # Each model family has its own marker (InternVL: <IMG_CONTEXT>); clients always send <image>.
            text = text.replace(IMAGE_PLACEHOLDER, image_token)
        media: dict[str, Any] = {}
        if encoded_videos:
            video_token = loaded.video_token
            if video_token and video_token != VIDEO_PLACEHOLDER:
                text = text.replace(VIDEO_PLACEHOLDER, video_token)
            media["videos"] = _decode_videos(encoded_videos, video_limits or VideoLimits(), decoders)
        try:
            encoded = loaded.processor(text=[text], images=_per_prompt(loaded, images), return_tensors="pt", **media)
        except (ValueError, OSError) as exc:
            raise ImageError(f"the images could not be prepared for the model: {exc}") from None
        tensors = dict(encoded)
    prompt_tokens = int(tensors["input_ids"].shape[-1])
    if max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
        raise InvalidRequestError(
            f"the prompt is {prompt_tokens} tokens long (image tokens included); at most {max_prompt_tokens} accepted"
        )
    inputs = PreparedInputs(tensors=tensors, prompt_tokens=prompt_tokens, images=image_spans(loaded.model, tensors))
    # Floating point inputs in the model's dtype, still in host memory (see `on_device`).
    return inputs._converted(lambda tensor: tensor.to(loaded.dtype) if tensor.is_floating_point() else tensor)


def _per_prompt(loaded: LoadedModel, images: list[Any]) -> list[Any] | None:
    """The images as the processor takes them for one prompt. OneVision's processor reads a flat list
    as one image per prompt, and so expands every image to all its views; nested, the images of a
    prompt are read as the model reads several images together (base view only)."""
    if not images:
        return None
    if tower_layout(loaded.model) is TowerLayout.ONEVISION:
        return [images]
    return images


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest token, as the tokenizer spells it (a byte-level or byte-fallback
    spelling is never shorter than the text it stands for), special tokens included."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


def preprocessing_of(loaded: LoadedModel) -> Preprocessing:
    """What the model's processor does to an image's size (see `Preprocessing`)."""
    processor = loaded.processor
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    # A SizeDict in transformers 5 (attributes), a plain dict in some processors.
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    # Original checkpoints say in their config whether they pad (`image_aspect_ratio: pad`).
    checkpoint = getattr(processor, "checkpoint", None)
    original_pads = bool(getattr(checkpoint, "pads_to_square", False)) and not getattr(checkpoint, "anyres", False)
    return Preprocessing(
        pads_to_square=loaded.square_pad_colour is not None or original_pads,
        shortest_edge=int(shortest) if shortest else None,
    )


def _decode_videos(
    encoded: tuple[str, ...], limits: VideoLimits, decoders: threading.Semaphore | None
) -> list[np.ndarray]:
    # Decoding shares the image decoders' places: a burst of videos cannot take every core either.
    with decoders or contextlib.nullcontext():
        return decode_videos(encoded, limits)


def _check_video_count(loaded: LoadedModel, prompt: str, videos: int) -> None:
    if not videos:
        return
    if not loaded.takes_videos:
        raise ImageError(f"this model does not accept videos, but the request has {plural(videos, 'video')}")
    placeholders = prompt.count(VIDEO_PLACEHOLDER)
    if placeholders != videos:
        raise ImageError(
            f"{plural(videos, 'video')} given, but the prompt has "
            f"{plural(placeholders, VIDEO_PLACEHOLDER + ' placeholder')}"
        )


def _check_image_count(loaded: LoadedModel, prompt: str, images: int) -> None:
    placeholders = prompt.count(IMAGE_PLACEHOLDER)
    if images and not loaded.takes_images:
        raise ImageError(f"this model does not accept images, but the request has {plural(images, 'image')}")
    if loaded.takes_images and images != placeholders:
        raise ImageError(
            f"{plural(images, 'image')} given, but the prompt has "
            f"{plural(placeholders, IMAGE_PLACEHOLDER + ' placeholder')}"
        )
