"""Fetches images named by http(s) URLs (only with --allow-remote-images): bounded in size, time and redirects."""

from __future__ import annotations

import asyncio
import base64

import httpx

from llava_worker.config import WorkerConfig
from llava_worker.errors import ImageError
from llava_worker.http.body import read_limited

#: Redirects followed when fetching a remote image.
MAX_IMAGE_REDIRECTS = 3


def url_scheme(url: str) -> str:
    # Neither urlsplit nor partition: a data URL may be megabytes long, and both would copy it.
    colon = url.find(":")
    return url[:colon].strip().lower() if colon >= 0 else ""


async def fetch_remote_images(urls: list[str], config: WorkerConfig) -> tuple[str, ...]:
    """Each image as the worker's inputs take it: a data URL, or a fetched file in base64."""
    images = list(urls)
    remote = [index for index, url in enumerate(urls) if url_scheme(url) != "data"]
    if not remote:
        return tuple(images)
    async with httpx.AsyncClient(timeout=config.remote_image_timeout) as client:
        for index in remote:
            label = f"image {index + 1}"
            try:
                async with asyncio.timeout(config.remote_image_timeout):
                    data = await fetch_image(client, urls[index], label, config.max_image_bytes)
            except TimeoutError:
                raise ImageError(f"{label} did not arrive within {config.remote_image_timeout:g} s") from None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise ImageError(f"{label} could not be fetched: {exc or type(exc).__name__}") from None
            images[index] = await asyncio.to_thread(_base64, data)
    return tuple(images)


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def fetch_image(client: httpx.AsyncClient, url: str, label: str, max_bytes: int) -> bytes:
    """The body of `url`, following at most MAX_IMAGE_REDIRECTS redirects, each to http(s) only.

    Raises ImageError as soon as the body is known to exceed `max_bytes` (declared or counted).
    """
    for _ in range(MAX_IMAGE_REDIRECTS + 1):
        if url_scheme(url) not in ("http", "https"):
            raise ImageError(f"{label} was redirected to {url!r}; only http(s) URLs are followed")
        async with client.stream("GET", url) as response:
            if response.has_redirect_location:
                url = str(response.url.join(response.headers["location"]))
                continue
            if response.status_code != 200:
                raise ImageError(f"{label} could not be fetched: HTTP {response.status_code} from {url}")
            return await read_limited(
                response.aiter_bytes(),
                response.headers.get("content-length"),
                max_bytes,
                lambda _: ImageError(f"{label} is larger than the {max_bytes} bytes accepted"),
            )
    raise ImageError(f"{label} was redirected more than {MAX_IMAGE_REDIRECTS} times")
