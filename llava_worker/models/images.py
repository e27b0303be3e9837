"""Decodes the images of a request (base64, optionally as `data:` URLs) into RGB PIL images."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from llava_worker.errors import ImageError

# The worker enforces its own pixel limit (ImageLimits) before decoding; PIL's warning would only repeat it.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageLimits:
    """What one image may weigh; both are checked before the image is decoded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


def decode_image(encoded: str, index: int, limits: ImageLimits) -> Image.Image:
    """One image from its base64 text; `index` (0-based) names it in errors."""
    label = f"image {index + 1}"
    payload = encoded.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError(f"{label} is a data URL that is not base64-encoded")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ImageError(f"{label} is larger than the {limits.max_bytes} bytes accepted")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label} is not valid base64") from None
    if not raw:
        raise ImageError(f"{label} is empty")
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            # open() has read only the header: a decompression bomb is refused before it is decoded.
            width, height = opened.size
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"{label} has {width}x{height} = {width * height} pixels, more than the "
                    f"{limits.max_pixels} accepted"
                )
            # load() decodes every pixel now, so a truncated file fails here rather than in the model.
            opened.load()
            # The model expects three channels; palette, greyscale and alpha images are converted.
            return opened.convert("RGB")
    except Image.DecompressionBombError:
        # PIL's own guard, for sizes far beyond any sensible limit, fires already in open().
        raise ImageError(f"{label} has far more than the {limits.max_pixels} pixels accepted") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label} is not in an image format the worker can read (JPEG, PNG, ...)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{label} could not be decoded: {exc}") from None


def pad_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """The original's expand2square: the image centred on a square of `colour`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
