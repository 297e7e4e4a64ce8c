"""The provider-neutral image request: one validated manifest line, and the checks on it
(ids safe as storage keys, input image URLs a provider can reach, priced fields not overridden)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import socket
import unicodedata
from collections.abc import Collection, Mapping
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from jobs.text import shown

Size = Literal["auto", "1024x1024", "1536x1024", "1024x1536"]
Quality = Literal["auto", "low", "medium", "high"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["auto", "transparent", "opaque"]
InputFidelity = Literal["auto", "low", "high"]
Moderation = Literal["auto", "low"]

DEFAULT_MODEL = "gpt-image-1.5"
SIZES: tuple[str, ...] = ("auto", "1024x1024", "1536x1024", "1024x1536")
"""The sizes every model takes (``Size``)."""
FREE_SIZE_MODELS = frozenset({"gpt-image-2", "gpt-image-2-2026-04-21"})
"""Models that also take any ``WIDTHxHEIGHT``; the provider's adapter checks its rules
(``jobs.providers.openai_models``)."""
FREE_SIZE = re.compile(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}")
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {v: k for k, v in CONTENT_TYPES.items()} | {"image/jpg": "jpeg"}


class ImageRequest(BaseModel):
    """One validated manifest line. Unknown fields are errors: a typo must not buy a wrong image."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: str = Field(min_length=1, max_length=32000)
    id: str | None = None
    model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=200)
    provider: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = None
    """One of ``Size``; a model of ``FREE_SIZE_MODELS`` also takes ``WIDTHxHEIGHT``."""
    quality: Quality | None = None
    output_format: OutputFormat | None = None
    background: Background | None = None
    input_images: list[str] | None = Field(default=None, max_length=16)
    input_fidelity: InputFidelity | None = None
    moderation: Moderation | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    provider_params: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        return value

    @field_validator("size")
    @classmethod
    def _size_fits_the_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or value in SIZES:
            return value
        if info.data.get("model") in FREE_SIZE_MODELS and FREE_SIZE.fullmatch(value):
            return value
        free = " (or WIDTHxHEIGHT for gpt-image-2)" if FREE_SIZE.fullmatch(value) else ""
        raise ValueError(f"size '{shown(value)}' is not one of {', '.join(SIZES)}{free}")

    @field_validator("id")
    @classmethod
    def _id_is_a_safe_key(cls, value: str | None) -> str | None:
        # The id becomes part of an S3 key / file path: ASCII letters, digits and -_. only,
        # so no ../, no slashes or backslashes, no control or look-alike characters.
        if value is None:
            return None
        if not ID_PATTERN.fullmatch(value) or set(value) == {"."}:
            raise ValueError(
                "id must be 1-128 ASCII letters, digits, '-', '_' or '.' (and not only dots)"
            )
        return value

    @field_validator("input_images")
    @classmethod
    def _input_images_are_reachable_urls(cls, value: list[str] | None) -> list[str] | None:
        for index, url in enumerate(value or []):
            if url.startswith("data:image/"):
                continue
            problem: str | None
            if not url.startswith(("https://", "http://")):
                problem = f"'{shown(url, 60)}' is not an http(s) or data URL"
            else:
                problem = unreachable(url)
            if problem is not None:
                raise ValueError(f"input_images[{index}]: {problem}")
        return value

    @property
    def line_id(self) -> str:
        """The given id, or one derived from the content so re-runs find the same line."""
        if self.id is not None:
            return self.id
        content = self.model_dump(exclude={"id"}, exclude_none=True)
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return f"line-{digest[:16]}"

    def fingerprint(self, provider: str) -> str:
        """sha256 of everything that decides what is bought: the line's id, the provider that
        buys it (a line's own, else the batch's) and every request field but ``metadata``
        (copied into the row, never sent). Equal fingerprints under one ``--out`` mean the
        same images were bought: the stored ones are taken instead of buying again."""
        bought = self.model_dump(exclude={"id", "provider", "metadata"}, exclude_none=True)
        bought |= {"id": self.line_id, "provider": provider}
        text = json.dumps(bought, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def extension(self) -> str:
        return self.output_format or "png"

    def extra_params(self, modelled: Collection[str]) -> dict[str, Any]:
        """``provider_params`` without the body keys the adapter sets itself.

        ``validate()`` already rejects a line that sets one; dropping them here as well means
        a request that skipped validation still cannot buy more than it was priced at.
        """
        return {k: v for k, v in (self.provider_params or {}).items() if k not in modelled}


OVERRIDE_RULE = "(provider_params may not override a field imagebatch prices and maps)"


def overridden(request: ImageRequest, modelled: Mapping[str, str | None]) -> list[tuple[str, str]]:
    """One problem per ``provider_params`` key that would replace a body key the adapter sets.

    Args:
        request: the validated line.
        modelled: each body key the adapter sets, with the manifest field that sets it
            (``None`` when imagebatch alone decides it, such as a webhook URL).

    Returns:
        ``("provider_params", reason)`` pairs, empty when nothing is overridden.
    """
    problems: list[tuple[str, str]] = []
    for key in request.provider_params or {}:
        if key not in modelled:
            continue
        field = modelled[key]
        if field is None:
            fix = "imagebatch controls it"
        else:
            fix = f"set it with the manifest's own field '{field}' instead"
        problems.append(("provider_params", f"provider_params.{shown(key)}: {fix} {OVERRIDE_RULE}"))
    return problems


_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)
"""The IPv4 spellings ``inet_aton`` (and so curl, browsers and most fetchers) read as an
address: ``127.1``, ``2130706433``, ``0x7f.0.0.1``."""
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
"""Full stops that IDNA maps to '.' in a host name."""
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unreachable(url: str) -> str | None:
    """Why a provider can never fetch this http(s) URL, or None if it may.

    Only the URL's text is judged, with no DNS lookup, so validation stays fast and works
    offline: a host that is literally a non-global address (or ``localhost``) is one the
    provider's servers cannot reach; a URL that parsers read differently (a backslash, a
    space, a control character) could be fetched from somewhere else than it appears to say.
    """
    if not url.isprintable() or re.search(r"[\s\\]", url):
        return f"'{shown(url, 60)}' is not a valid URL (a space, backslash or control character)"
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        return f"'{shown(url, 60)}' is not a valid URL"
    if not hostname:
        return f"'{shown(url, 60)}' has no host"
    # Fetchers percent-decode and IDNA-map the host: judge it as they will read it.
    host = unicodedata.normalize("NFKC", unquote(hostname)).translate(_DOTS).lower().rstrip(".")
    try:
        kind = "loopback" if host == "localhost" or host.endswith(".localhost") else None
        kind = kind or _kind(_literal_address(host))
    except ValueError:
        return f"'{shown(url, 60)}' is not a valid URL (its host is not a valid IPv4 address)"
    if kind is None:
        return None
    rest = url[len(parts.scheme) + 3 + len(parts.netloc) :]
    where = shown(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}", 80)
    where += rest if rest in ("", "/") else "/…" if rest.startswith("/") else "…"
    return f"{where} is a {kind} address the provider cannot reach"


def _literal_address(host: str) -> IPAddress | None:
    """The address ``host`` spells, None for a name; ValueError for a malformed numeric host."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _NUMERIC_HOST.fullmatch(host):
            return None
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise ValueError(host) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _kind(address: IPAddress | None) -> str | None:
    """The reason ``address`` is not reachable from the internet, None if it is."""
    if address is None:
        return None
    kinds = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("non-global", not address.is_global),
    )
    return next((kind for kind, matches in kinds if matches), None)
