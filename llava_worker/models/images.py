"""Decodes the images of a request (base64, optionally as `data:` URLs) into upright RGB PIL images."""

from __future__ import annotations

import base64
import binascii
import io
import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from llava_worker.config import DEFAULT_IMAGE_FORMATS, parse_image_formats
from llava_worker.errors import ImageError

# The worker enforces its own pixel limit (ImageLimits) before decoding; PIL's warning would only repeat it.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
# Pillow skips what it cannot read of a corrupt EXIF block (reading the orientation) and warns; one
# warning per such request would only fill the log with what the sender got wrong.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


@dataclass(frozen=True)
class ImageLimits:
    """What one image may weigh and be; all are checked before the image is decoded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_request_pixels: int = 80_000_000
    """All the images of one request together."""
    formats: tuple[str, ...] = parse_image_formats(DEFAULT_IMAGE_FORMATS)
    """Pillow's names of the file formats decoded; no other decoder ever reads a request's bytes."""


@dataclass(frozen=True)
class Preprocessing:
    """What the model's image preprocessing does to an image's size: known before decoding, so an
    image whose preprocessing would blow up (a 1 x 300000 strip resized by its short side, or padded
    to a square) is refused before any of that memory is spent."""

    pads_to_square: bool = False
    """Centred on a square of its longer side first (`--pad-images`, original `pad` checkpoints)."""
    shortest_edge: int | None = None
    """Resized so that its shorter side has this many pixels (CLIP's preprocessing)."""

    def largest(self, width: int, height: int) -> tuple[int, int, str] | None:
        """The largest intermediate image, (width, height, what makes it), when it exceeds the input."""
        found: tuple[int, int, str] | None = None
        if self.pads_to_square and width != height:
            side = max(width, height)
            found, width, height = (side, side, "padded to a square"), side, side
        if self.shortest_edge is not None:
            short = min(width, height)
            scale = self.shortest_edge / short
            resized = (math.ceil(width * scale), math.ceil(height * scale))
            if resized[0] * resized[1] > width * height:
                found = (*resized, f"resized so that its shorter side is {self.shortest_edge} px")
        return found


def decode_image(
    encoded: str, index: int, limits: ImageLimits, preprocessing: Preprocessing | None = None
) -> Image.Image:
    """One image from its base64 text, turned upright as its EXIF orientation says; `index` (0-based)
    names it in errors. An image too large as sent, or as `preprocessing` would make it, is refused
    from its header, before it is decoded."""
    return decode_images([encoded], limits, preprocessing, first_index=index)[0]


def decode_images(
    encoded: Sequence[str],
    limits: ImageLimits,
    preprocessing: Preprocessing | None = None,
    decoders: threading.Semaphore | None = None,
    first_index: int = 0,
) -> list[Image.Image]:
    """The images of one request. Every header is read and checked first (each image's size and
    what preprocessing would make of it, and all their pixels together), so nothing is decoded for
    a request that will be refused; `decoders` bounds how many images decode at once, all requests
    together."""
    opened = [
        _open(data, f"image {first_index + index + 1}", limits, preprocessing or Preprocessing())
        for index, data in enumerate(encoded)
    ]
    total = sum(width * height for _, _, width, height in opened)
    if len(opened) > 1 and total > limits.max_request_pixels:
        raise ImageError(
            f"the request's {len(opened)} images have {total} pixels in all, more than the "
            f"{limits.max_request_pixels} accepted"
        )
    images = []
    for raw, label, _, _ in opened:
        if decoders is None:
            images.append(_decode(raw, label, limits))
        else:
            with decoders:
                images.append(_decode(raw, label, limits))
    return images


def _open(encoded: str, label: str, limits: ImageLimits, preprocessing: Preprocessing) -> tuple[bytes, str, int, int]:
    """The image's file bytes and size, from its header alone; refused when too large."""
    raw = _file_bytes(encoded, label, limits)
    try:
        with Image.open(io.BytesIO(raw), formats=limits.formats) as opened:
            width, height = opened.size
    except Image.DecompressionBombError:
        # PIL's own guard, for sizes far beyond any sensible limit, fires already in open().
        raise ImageError(f"{label} has far more than the {limits.max_pixels} pixels accepted") from None
    except UnidentifiedImageError:
        raise ImageError(_unreadable(label, raw, limits.formats)) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{label} could not be decoded: {exc}") from None
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{label} has {width}x{height} = {width * height} pixels, more than the {limits.max_pixels} accepted"
        )
    _check_preprocessed_size(label, width, height, limits, preprocessing)
    return raw, label, width, height


def _decode(raw: bytes, label: str, limits: ImageLimits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw), formats=limits.formats) as opened:
            # load() decodes every pixel now, so a truncated file fails here rather than in the model.
            opened.load()
            # Phones store a photo as the sensor saw it and say in EXIF how to turn it; the model
            # should see it as the user does. Turns the decoded pixels, so nothing is decoded twice.
            ImageOps.exif_transpose(opened, in_place=True)
            # The model expects three channels; palette, greyscale and alpha images are converted.
            return opened.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{label} could not be decoded: {exc}") from None


def _check_preprocessed_size(
    label: str, width: int, height: int, limits: ImageLimits, preprocessing: Preprocessing
) -> None:
    largest = preprocessing.largest(width, height)
    if largest is None:
        return
    new_width, new_height, how = largest
    if new_width * new_height > limits.max_pixels:
        raise ImageError(
            f"{label} is {width}x{height}; {how}, it would be {new_width}x{new_height} = "
            f"{new_width * new_height} pixels, more than the {limits.max_pixels} accepted"
        )


def _file_bytes(encoded: str, label: str, limits: ImageLimits) -> bytes:
    """The image file inside base64 text, or inside a `data:` URL (its scheme and `;base64` in any case)."""
    payload = encoded.strip()
    # RFC 2397: the scheme and the `;base64` marker are case-insensitive (`DATA:image/png;BASE64,`).
    if payload[:5].lower() == "data:":
        header, sep, payload = payload.partition(",")
        if not sep or ";base64" not in header.lower():
            raise ImageError(f"{label} is a data URL that is not base64-encoded")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ImageError(f"{label} is larger than the {limits.max_bytes} bytes accepted")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label} is not valid base64") from None
    if not raw:
        raise ImageError(f"{label} is empty")
    return raw


def _unreadable(label: str, raw: bytes, formats: tuple[str, ...]) -> str:
    """Why no accepted decoder took `raw`: a format outside `formats`, named, or no image at all."""
    accepted = ", ".join(formats)
    found = image_format_of(raw)
    if found is None or found in formats:
        return f"{label} is not in an image format the worker can read ({accepted})"
    return f"{label} looks like a {found} file; accepted image formats: {accepted}"


def image_format_of(raw: bytes) -> str | None:
    """The format whose signature `raw` starts with, by Pillow's signature checks alone: no decoder
    of a refused format reads it."""
    Image.init()
    prefix = raw[:16]  # as much as Image.open gives the checks
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a plug-in's check that trips over a short prefix says "not me"
            continue
    return None


def pad_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """The original's expand2square: the image centred on a square of `colour`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
