"""The tiny checkpoints the engine tests run on, by kind (keys of `build_all`)."""

from __future__ import annotations

import importlib.util

import pytest

#: InternVL's processor needs torchvision (a video processor); without it those cases are skipped.
needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="InternVL's and OneVision's processors need torchvision"
)
INTERNVL = pytest.param("internvl", marks=needs_torchvision)
ONEVISION = pytest.param("llava-onevision", marks=needs_torchvision)
NEXT_VIDEO = pytest.param("llava-next-video", marks=needs_torchvision)
#: The vision-language kinds, one per family the engine takes images apart for.
IMAGE_KINDS = [
    "llava-1.5",
    "llava-next",
    INTERNVL,
    "llava-next-llama3",
    "llava-next-chatml",
    "llava-interleave",
    ONEVISION,
    NEXT_VIDEO,
]
#: Those and a text-only model.
KINDS = ["text-only", *IMAGE_KINDS]
