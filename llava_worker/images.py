"""Decodes the images of a request (base64, optionally as `data:` URLs) into RGB PIL images."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from llava_worker.errors import ImageError


def decode_image(encoded: str, index: int) -> Image.Image:
    """One image from its base64 text; `index` (0-based) names it in errors."""
    label = f"image {index + 1}"
    payload = encoded.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError(f"{label} is a data URL that is not base64-encoded")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label} is not valid base64") from None
    if not raw:
        raise ImageError(f"{label} is empty")
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            # load() decodes every pixel now, so a truncated file fails here rather than in the model.
            opened.load()
            # The model expects three channels; palette, greyscale and alpha images are converted.
            return opened.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{label} is not in an image format the worker can read (JPEG, PNG, ...)") from None
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{label} could not be decoded: {exc}") from None
