"""Fetch a finished image and prove it is whole before anything is uploaded.

A result URL is provider-controlled input: only http(s) is fetched, private and loopback
addresses are refused unless they are the configured provider's own host (the simulator),
bodies are capped, truncation is detected, and the bytes must decode as the expected format.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from jobs.errors import DownloadError, ImageMissing, ImageRefused
from jobs.fetch import imagecheck
from jobs.manifest.request import CONTENT_TYPES
from jobs.providers.base import Artifact

MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Fetched:
    """Verified image bytes and what the result row says about them."""

    data: bytes
    sha256: str
    content_type: str
    extension: str
    width: int
    height: int


def fetch(
    client: httpx.Client,
    artifact: Artifact,
    *,
    max_bytes: int,
    expected_format: str | None = None,
    trusted_hosts: frozenset[str] = frozenset(),
) -> Fetched:
    """The artifact's bytes, verified. Raises ``DownloadError`` (retry) or ``ImageMissing``."""
    if artifact.data is not None:
        if len(artifact.data) > max_bytes:
            raise ImageRefused(f"inline image is {len(artifact.data)} bytes, over the cap")
        return verify(artifact.data, expected_format)
    if not artifact.url:
        raise ImageRefused("the provider returned an image with neither URL nor data")
    url = artifact.url
    for _ in range(MAX_REDIRECTS + 1):
        # Redirects are followed by hand so that every hop passes the same address check.
        check_url(url, trusted_hosts)
        try:
            with client.stream("GET", url, follow_redirects=False) as response:
                if response.is_redirect and "location" in response.headers:
                    url = str(response.url.join(response.headers["location"]))
                    continue
                return read_image(response, max_bytes, expected_format)
        except httpx.HTTPError as exc:
            raise DownloadError(f"image download failed: {type(exc).__name__}") from None
    raise DownloadError(f"image URL redirected more than {MAX_REDIRECTS} times")


def read_image(response: httpx.Response, max_bytes: int, expected_format: str | None) -> Fetched:
    """The response's body, capped, checked against Content-Length, and verified."""
    if response.status_code in (403, 404, 410):
        # Right after a job finishes this is usually a CDN that has not caught up; the caller
        # looks again before it believes the image is gone.
        raise ImageMissing(f"image URL answered {response.status_code}")
    if response.status_code >= 400:
        raise DownloadError(f"image URL answered {response.status_code}")
    declared = response.headers.get("content-length")
    if declared is not None and int(declared) > max_bytes:
        raise ImageRefused(f"image is {declared} bytes, over the {max_bytes}-byte cap")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise ImageRefused(f"image is over the {max_bytes}-byte cap")
    if declared is not None and len(body) != int(declared):
        raise DownloadError(f"image truncated: {len(body)} of {declared} bytes")
    return verify(bytes(body), expected_format)


def verify(data: bytes, expected_format: str | None = None) -> Fetched:
    """Prove the bytes are a whole PNG/JPEG/WebP (``jobs.fetch.imagecheck``: CRCs, stated length,
    end markers); anything cut or garbled is a failed download, to be fetched again."""
    try:
        shape = imagecheck.inspect(data)
    except imagecheck.BadImage as exc:
        raise DownloadError(f"image is not whole: {exc}") from None
    if expected_format is not None and shape.format != expected_format:
        raise DownloadError(f"image is {shape.format}, but {expected_format} was asked for")
    return Fetched(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=CONTENT_TYPES[shape.format],
        extension=shape.format,
        width=shape.width,
        height=shape.height,
    )


def check_url(url: str, trusted_hosts: frozenset[str]) -> None:
    """Refuse non-http(s) URLs and internal addresses (SSRF) unless the host is trusted."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageRefused(f"refusing to fetch a {parts.scheme or 'schemeless'} URL")
    host = parts.hostname
    if host in trusted_hosts:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise DownloadError(f"cannot resolve image host {host}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise ImageRefused(f"refusing to fetch from internal address of {host}")
