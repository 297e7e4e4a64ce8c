"""``jobs.download``: a result URL is provider-controlled input, and the bytes must be whole.

Unit tests over ``httpx.MockTransport``: no request ever leaves the process. Name resolution
is replaced too (``socket.getaddrinfo`` in ``jobs.download``), so a host name never reaches
a real DNS server; literal addresses are parsed numerically only.
"""

from __future__ import annotations

import base64
import hashlib
import io
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from jobs.errors import DownloadError, ImageMissing, ImageRefused
from jobs.fetch.download import fetch, verify
from jobs.providers.base import Artifact

CDN = "https://cdn.example.com"
PUBLIC_ADDRESS = "93.184.216.34"
# Host names the fake resolver knows; anything else is "does not resolve".
RESOLVES = {
    "cdn.example.com": PUBLIC_ADDRESS,
    "rebind.example.com": "10.0.0.7",
    "metadata.example.com": "169.254.169.254",
    "localhost": "127.0.0.1",
    "cdn2.example.com": "93.184.216.35",
}
MAX = 5 * 1024 * 1024


def image_bytes(fmt: str = "png", size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    mode = "RGBA" if fmt == "png" else "RGB"
    Image.new(mode, size, (200, 30, 90, 255)[: len(mode)]).save(buffer, format=fmt.upper())
    return buffer.getvalue()


PNG = image_bytes("png")
JPEG = image_bytes("jpeg", (40, 30))
WEBP = image_bytes("webp", (30, 20))


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Resolve from ``RESOLVES``; literal addresses are parsed numerically (no lookup ever)."""
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def fake(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        looked_up.append(host)
        try:
            return real(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass
        if host not in RESOLVES:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (RESOLVES[host], port or 443))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)  # the socket module jobs.download uses
    return looked_up


class Transport:
    """A mock transport answering from a route table, recording every request it sees."""

    def __init__(self, routes: dict[str, Callable[[httpx.Request], httpx.Response]]) -> None:
        self.routes = routes
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.seen.append(url)
        if url not in self.routes:
            return httpx.Response(404, content=b"no such mock route")
        return self.routes[url](request)


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[httpx.Client, Transport]]]:
    """``serve({url: handler})`` → a client configured like ``Runtime.downloads`` (which
    follows redirects) whose only transport is the mock."""
    clients: list[httpx.Client] = []

    def make(
        routes: dict[str, Callable[[httpx.Request], httpx.Response]],
    ) -> tuple[httpx.Client, Transport]:
        transport = Transport(routes)
        client = httpx.Client(
            transport=httpx.MockTransport(transport),
            timeout=httpx.Timeout(5.0),
            follow_redirects=True,
        )
        clients.append(client)
        return client, transport

    yield make
    for client in clients:
        client.close()


def body(data: bytes, **headers: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: httpx.Response(200, headers=headers, content=data)


def status(code: int) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: httpx.Response(code, content=b'{"error": "gone"}')


# -- whole images --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt", "content_type", "size"),
    [
        (PNG, "png", "image/png", (64, 48)),
        (JPEG, "jpeg", "image/jpeg", (40, 30)),
        (WEBP, "webp", "image/webp", (30, 20)),
    ],
)
def test_a_whole_image_is_fetched_with_its_sha256_size_and_content_type(
    serve: Any, data: bytes, fmt: str, content_type: str, size: tuple[int, int]
) -> None:
    # Given a CDN URL that serves a whole image (the server even lies about its type)
    client, transport = serve({f"{CDN}/a.{fmt}": body(data, **{"Content-Type": "text/plain"})})
    # When it is fetched asking for that format
    got = fetch(client, Artifact(url=f"{CDN}/a.{fmt}"), max_bytes=MAX, expected_format=fmt)
    # Then the bytes are returned untouched and described from the bytes themselves
    assert got.data == data
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert (got.width, got.height) == size
    assert got.content_type == content_type and got.extension == fmt
    assert transport.seen == [f"{CDN}/a.{fmt}"]


def test_inline_base64_data_is_verified_without_any_request(serve: Any) -> None:
    client, transport = serve({})
    encoded = base64.b64encode(JPEG).decode()
    got = fetch(
        client,
        Artifact(data=base64.b64decode(encoded), content_type="image/jpeg"),
        max_bytes=MAX,
        expected_format="jpeg",
    )
    assert got.data == JPEG and got.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert (got.width, got.height, got.content_type) == (40, 30, "image/jpeg")
    assert transport.seen == []


def test_a_chunked_body_without_content_length_is_accepted_when_whole(serve: Any) -> None:
    def chunked(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([PNG[:100], PNG[100:]]))

    client, _ = serve({f"{CDN}/c.png": chunked})
    got = fetch(client, Artifact(url=f"{CDN}/c.png"), max_bytes=MAX, expected_format="png")
    assert got.data == PNG


# -- broken downloads: retryable ---------------------------------------------------------


def test_a_body_shorter_than_its_content_length_is_a_retryable_download_error(
    serve: Any,
) -> None:
    # Given a CDN that declares the full length but cuts the body in half
    half = PNG[: len(PNG) // 2]
    client, _ = serve({f"{CDN}/t.png": body(half, **{"Content-Length": str(len(PNG))})})
    # When it is fetched, then the truncation is caught before anything is stored
    with pytest.raises(DownloadError) as caught:
        fetch(client, Artifact(url=f"{CDN}/t.png"), max_bytes=MAX, expected_format="png")
    assert type(caught.value) is DownloadError
    assert caught.value.retryable and caught.value.type == "download_failed"
    assert "truncated" in caught.value.message


def test_a_truncated_image_without_content_length_does_not_decode(serve: Any) -> None:
    # A body cut in half with no Content-Length to compare against: only decoding catches it.
    cut = PNG[: len(PNG) // 2]

    def chunked(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([cut]))

    client, _ = serve({f"{CDN}/t.png": chunked})
    with pytest.raises(DownloadError) as caught:
        fetch(client, Artifact(url=f"{CDN}/t.png"), max_bytes=MAX, expected_format="png")
    assert type(caught.value) is DownloadError and caught.value.retryable


def test_a_connection_cut_mid_body_is_a_retryable_download_error(serve: Any) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset by peer", request=request)

    client, _ = serve({f"{CDN}/r.png": broken})
    with pytest.raises(DownloadError) as caught:
        fetch(client, Artifact(url=f"{CDN}/r.png"), max_bytes=MAX)
    assert type(caught.value) is DownloadError and caught.value.retryable


@pytest.mark.parametrize("code", [500, 502, 503, 429])
def test_a_server_error_from_the_cdn_is_retryable(serve: Any, code: int) -> None:
    client, _ = serve({f"{CDN}/e.png": status(code)})
    with pytest.raises(DownloadError) as caught:
        fetch(client, Artifact(url=f"{CDN}/e.png"), max_bytes=MAX)
    assert type(caught.value) is DownloadError and caught.value.retryable
    assert str(code) in caught.value.message


@pytest.mark.parametrize(
    "data",
    [
        b"<html><body>Access denied</body></html>",
        b"",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        b"GIF89a" + b"\x00" * 64,
    ],
    ids=["html", "empty", "png-magic-garbage", "gif-header"],
)
def test_bytes_that_are_not_a_png_jpeg_or_webp_are_a_download_error(
    serve: Any, data: bytes
) -> None:
    client, _ = serve({f"{CDN}/x.png": body(data, **{"Content-Type": "image/png"})})
    with pytest.raises(DownloadError) as caught:
        fetch(client, Artifact(url=f"{CDN}/x.png"), max_bytes=MAX, expected_format="png")
    assert type(caught.value) is DownloadError and caught.value.retryable


def test_a_real_gif_is_refused_as_not_png_jpeg_or_webp() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    with pytest.raises(DownloadError, match="not PNG, JPEG or WebP"):
        verify(buffer.getvalue())


def test_a_png_when_jpeg_was_asked_for_is_a_download_error(serve: Any) -> None:
    client, _ = serve({f"{CDN}/p.jpeg": body(PNG, **{"Content-Type": "image/jpeg"})})
    with pytest.raises(DownloadError) as caught:
        fetch(client, Artifact(url=f"{CDN}/p.jpeg"), max_bytes=MAX, expected_format="jpeg")
    assert type(caught.value) is DownloadError
    assert "png" in caught.value.message and "jpeg" in caught.value.message


# -- gone for good: only a new job helps ---------------------------------------------------


@pytest.mark.parametrize("code", [404, 410, 403])
def test_a_missing_image_is_image_missing_so_the_caller_looks_again(serve: Any, code: int) -> None:
    """A 404 right after a job finishes is usually CDN lag: not yet a reason to buy again."""
    client, _ = serve({f"{CDN}/gone.png": status(code)})
    with pytest.raises(ImageMissing) as caught:
        fetch(client, Artifact(url=f"{CDN}/gone.png"), max_bytes=MAX)
    assert caught.value.type == "image_missing"


# -- refused: never fetched, or not kept -----------------------------------------------------


def test_a_declared_length_over_the_cap_is_refused(serve: Any) -> None:
    client, _ = serve({f"{CDN}/big.png": body(PNG, **{"Content-Length": str(len(PNG))})})
    with pytest.raises(ImageRefused) as caught:
        fetch(client, Artifact(url=f"{CDN}/big.png"), max_bytes=len(PNG) - 1)
    assert not caught.value.retryable and caught.value.type == "image_refused"


def test_a_streamed_body_over_the_cap_is_refused_without_reading_it_all(serve: Any) -> None:
    sent: list[int] = []

    def endless() -> Iterator[bytes]:
        for k in range(1000):
            sent.append(k)
            yield b"\x00" * 1024

    client, _ = serve({f"{CDN}/huge.png": lambda _r: httpx.Response(200, content=endless())})
    with pytest.raises(ImageRefused):
        fetch(client, Artifact(url=f"{CDN}/huge.png"), max_bytes=10 * 1024)
    assert len(sent) < 1000, "the whole endless body was read"


def test_an_inline_image_over_the_cap_is_refused(serve: Any) -> None:
    client, _ = serve({})
    with pytest.raises(ImageRefused):
        fetch(client, Artifact(data=PNG), max_bytes=len(PNG) - 1)


def test_an_artifact_with_neither_url_nor_data_is_refused(serve: Any) -> None:
    client, _ = serve({})
    with pytest.raises(ImageRefused):
        fetch(client, Artifact(), max_bytes=MAX)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://cdn.example.com/a.png",
        "gopher://cdn.example.com/a.png",
        "data:image/png;base64,AAAA",
        "//cdn.example.com/a.png",
        "cdn.example.com/a.png",
        "http:///a.png",
    ],
)
def test_a_non_http_url_is_refused_and_never_requested(
    serve: Any, no_dns: list[str], url: str
) -> None:
    client, transport = serve({url: body(PNG)})
    with pytest.raises(ImageRefused):
        fetch(client, Artifact(url=url), max_bytes=MAX)
    assert transport.seen == [] and no_dns == []


INTERNAL = [
    "http://127.0.0.1/a.png",
    "http://127.0.0.1:8080/a.png",
    "http://10.1.2.3/a.png",
    "http://192.168.1.1/a.png",
    "http://172.16.0.1/a.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/a.png",
    "http://[::ffff:127.0.0.1]/a.png",
    "http://[fe80::1]/a.png",
    "http://0.0.0.0/a.png",
    "http://2130706433/a.png",
    "http://localhost/a.png",
    "https://rebind.example.com/a.png",
    "https://metadata.example.com/a.png",
]


@pytest.mark.parametrize("url", INTERNAL)
def test_a_private_loopback_or_link_local_host_is_refused_and_never_requested(
    serve: Any, url: str
) -> None:
    client, transport = serve({url: body(PNG)})
    with pytest.raises(ImageRefused) as caught:
        fetch(client, Artifact(url=url), max_bytes=MAX)
    assert not caught.value.retryable and caught.value.type == "image_refused"
    assert transport.seen == []


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://127.0.0.1:8765/cdn/images/a.png", "127.0.0.1"),
        ("http://10.1.2.3/a.png", "10.1.2.3"),
        ("http://169.254.169.254/a.png", "169.254.169.254"),
        ("http://[::1]:8765/a.png", "::1"),
    ],
)
def test_a_private_host_is_fetched_when_it_is_trusted(serve: Any, url: str, host: str) -> None:
    # Given the provider's own (local) host is trusted, as the simulator's is
    client, transport = serve({url: body(PNG)})
    got = fetch(
        client,
        Artifact(url=url),
        max_bytes=MAX,
        expected_format="png",
        trusted_hosts=frozenset({host}),
    )
    assert got.data == PNG
    assert transport.seen == [url]


def test_trusting_one_private_host_does_not_trust_another(serve: Any) -> None:
    client, transport = serve({"http://10.1.2.3/a.png": body(PNG)})
    with pytest.raises(ImageRefused):
        fetch(
            client,
            Artifact(url="http://10.1.2.3/a.png"),
            max_bytes=MAX,
            trusted_hosts=frozenset({"127.0.0.1"}),
        )
    assert transport.seen == []


def test_an_unresolvable_host_is_a_retryable_download_error(serve: Any) -> None:
    client, transport = serve({})
    with pytest.raises(DownloadError) as caught:
        fetch(client, Artifact(url="https://nowhere.invalid/a.png"), max_bytes=MAX)
    assert type(caught.value) is DownloadError and caught.value.retryable
    assert transport.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://127.0.0.1:6379/",
        "http://10.1.2.3/a.png",
    ],
)
def test_a_public_url_redirecting_to_an_internal_address_is_refused(
    serve: Any, target: str
) -> None:
    # Given a public CDN URL that answers 302 to an internal address (the download client,
    # like Runtime.downloads, follows redirects)
    start = f"{CDN}/redirect.png"

    def redirect(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": target})

    client, transport = serve({start: redirect, target: body(PNG)})
    # When it is fetched
    # Then the internal address is never requested: the redirect is refused
    with pytest.raises(ImageRefused):
        fetch(client, Artifact(url=start), max_bytes=MAX, expected_format="png")
    assert target not in transport.seen, f"followed a redirect to {target}"


def test_a_redirect_between_public_hosts_is_still_followed(serve: Any) -> None:
    # Refusing internal redirects must not break CDNs that redirect to another public host
    start, target = f"{CDN}/moved.png", "https://cdn2.example.com/a.png"

    def redirect(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": target})

    client, transport = serve({start: redirect, target: body(PNG)})
    got = fetch(client, Artifact(url=start), max_bytes=MAX, expected_format="png")
    assert got.data == PNG and transport.seen == [start, target]
