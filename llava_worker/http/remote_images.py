"""Fetches images named by http(s) URLs (only with --allow-remote-images).

Every cost is bounded before it is paid: a request's fetches wait for one of `--image-fetchers`
places (refused when `--max-queue` requests wait already), each image and all of a request's images
together have a byte budget, each image a deadline, and redirects are few and re-checked. By default
a host must resolve to public addresses only, and the connection goes to the very address that was
checked, so neither a decimal-IP host nor a DNS answer that changes in between reaches the worker's
own network.

Whatever goes wrong, the client reads one text: what a fetchable image must be. Telling "refused",
"404" and "not an image" apart would let a client map the ports and paths of hosts only the worker
can reach; the worker's log has the reason.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from llava_worker.config import WorkerConfig
from llava_worker.errors import ImageError, QueueFullError
from llava_worker.http.body import read_limited
from llava_worker.models.images import image_format_of

logger = logging.getLogger(__name__)

#: Redirects followed when fetching a remote image.
MAX_IMAGE_REDIRECTS = 3


def url_scheme(url: str) -> str:
    # Neither urlsplit nor partition: a data URL may be megabytes long, and both would copy it.
    colon = url.find(":")
    return url[:colon].strip().lower() if colon >= 0 else ""


class _FetchFailed(Exception):
    """Why one fetch failed, for the log only."""


@dataclass(frozen=True)
class _Target:
    """Where one request goes: the URL with the checked address as its host, and the real host's name."""

    url: httpx.URL
    host_header: str
    server_name: str


class RemoteImages:
    """The remote-image fetching of one worker: `fetch` replaces each http(s) URL by its file in base64."""

    def __init__(self, config: WorkerConfig, check_queue: Callable[[], None]) -> None:
        self._config = config
        self._check_queue = check_queue
        self._places = asyncio.Semaphore(config.image_fetchers)
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Requests waiting for a place to fetch their images."""
        return self._waiting

    def failure_text(self, label: str) -> str:
        config = self._config
        where = "an http(s) URL" if config.allow_private_image_hosts else "an http(s) URL of a public address"
        return (
            f"{label} could not be fetched; a remote image must be {where} that answers 200 within "
            f"{config.remote_image_timeout:g} s (after at most {MAX_IMAGE_REDIRECTS} redirects) with an image file "
            f"({', '.join(config.image_format_names)}) of at most {config.max_image_bytes} bytes, and all the "
            f"images of a request together at most {config.max_request_bytes} bytes"
        )

    async def fetch(self, urls: list[str]) -> tuple[str, ...]:
        """Each image as the worker's inputs take it: a data URL as it is, a fetched file in base64."""
        remote = [index for index, url in enumerate(urls) if url_scheme(url) != "data"]
        if not remote:
            return tuple(urls)
        self._check_queue()
        if self._waiting >= self._config.max_queue:
            raise QueueFullError(self._waiting, self._config.max_queue)
        self._waiting += 1
        try:
            await self._places.acquire()
        finally:
            self._waiting -= 1
        try:
            return await self._fetch_all(urls, remote)
        finally:
            self._places.release()

    async def _fetch_all(self, urls: list[str], remote: list[int]) -> tuple[str, ...]:
        images = list(urls)
        budget = self._config.max_request_bytes
        # Direct connections only: a proxy from the environment would resolve hosts the checks never saw.
        async with httpx.AsyncClient(timeout=self._config.remote_image_timeout, trust_env=False) as client:
            for index in remote:
                label = f"image {index + 1}"
                try:
                    async with asyncio.timeout(self._config.remote_image_timeout):
                        data = await self._fetch_one(client, urls[index], min(budget, self._config.max_image_bytes))
                except TimeoutError:
                    reason = f"no whole answer within {self._config.remote_image_timeout:g} s"
                except _FetchFailed as exc:
                    reason = str(exc)
                except (httpx.HTTPError, httpx.InvalidURL, OSError, UnicodeError, ValueError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    budget -= len(data)
                    images[index] = await asyncio.to_thread(_base64, data)
                    continue
                logger.info("%s (%.200s) not fetched: %s", label, urls[index], reason)
                raise ImageError(self.failure_text(label))
        return tuple(images)

    async def _fetch_one(self, client: httpx.AsyncClient, url: str, max_bytes: int) -> bytes:
        for _ in range(MAX_IMAGE_REDIRECTS + 1):
            if url_scheme(url) not in ("http", "https"):
                raise _FetchFailed(f"redirected to {url[:200]!r}, which is not http(s)")
            target = await self._target(httpx.URL(url))
            extensions = {"sni_hostname": target.server_name} if target.url.scheme == "https" else {}
            request = client.build_request(
                "GET", target.url, headers={"Host": target.host_header}, extensions=extensions
            )
            response = await client.send(request, stream=True)
            try:
                if response.has_redirect_location:
                    url = str(httpx.URL(url).join(response.headers["location"]))
                    continue
                if response.status_code != 200:
                    raise _FetchFailed(f"HTTP {response.status_code}")
                data = await read_limited(
                    response.aiter_bytes(),
                    response.headers.get("content-length"),
                    max_bytes,
                    lambda _: _FetchFailed(f"more than the {max_bytes} bytes left for it"),
                )
            finally:
                await response.aclose()
            if image_format_of(data) not in self._config.image_format_names:
                raise _FetchFailed("the answer is not an image in an accepted format")
            return data
        raise _FetchFailed(f"more than {MAX_IMAGE_REDIRECTS} redirects")

    async def _target(self, url: httpx.URL) -> _Target:
        """The address to connect to for `url`, checked (unless private hosts are allowed)."""
        host = url.host
        if not host:
            raise _FetchFailed("no host in the URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        host_header = url.netloc.decode("ascii")
        if self._config.allow_private_image_hosts:
            return _Target(url, host_header, host)
        answers = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(answer[4][0]) for answer in answers]
        if not addresses:
            raise _FetchFailed(f"{host} resolves to no address")
        private = [address for address in addresses if not is_public_address(address)]
        if private:
            raise _FetchFailed(f"{host} resolves to {private[0]}, which is not a public address")
        return _Target(url.copy_with(host=addresses[0]), host_header, host)


def is_public_address(address: str) -> bool:
    """Whether `address` is globally routable: not private, loopback, link-local, shared, multicast or reserved."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            ip = mapped
    return ip.is_global and not ip.is_multicast


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()
