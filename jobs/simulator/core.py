"""Transport-neutral request/response values and each provider's error envelope.

Surfaces return a ``Response`` instead of writing to the socket, so faults such as a dropped
connection or a truncated body are data the server acts on, not special code paths.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

PROVIDERS = ("apiframe", "openai", "aimlapi", "omixa", "oxen")
GARBLED_JSON = b'{"status": "ok", "data": [<!-- upstream proxy error -->'
"""A body that starts like JSON and is not: what a broken proxy or a cut-off write looks like."""

ErrorKind = Literal[
    "auth",
    "forbidden",
    "invalid",
    "not_found",
    "conflict",
    "credits",
    "policy",
    "rate_limit",
    "upstream",
    "unavailable",
    "timeout",
]

_STATUS: dict[ErrorKind, int] = {
    "auth": 401,
    "forbidden": 403,
    "invalid": 400,
    "not_found": 404,
    "conflict": 409,
    "credits": 402,
    "policy": 400,
    "rate_limit": 429,
    "upstream": 502,
    "unavailable": 503,
    "timeout": 504,
}
_STATUS_OVERRIDES: dict[tuple[str, ErrorKind], int] = {
    ("openai", "credits"): 429,
    ("omixa", "invalid"): 422,
}
_OPENAI_TYPES: dict[ErrorKind, tuple[str, str | None]] = {
    "auth": ("invalid_request_error", "invalid_api_key"),
    "forbidden": ("invalid_request_error", None),
    "invalid": ("invalid_request_error", "invalid_value"),
    "not_found": ("invalid_request_error", None),
    "conflict": ("invalid_request_error", None),
    "credits": ("insufficient_quota", "insufficient_quota"),
    "policy": ("image_generation_user_error", "moderation_blocked"),
    "rate_limit": ("requests", "rate_limit_exceeded"),
    "upstream": ("server_error", None),
    "unavailable": ("server_error", None),
    "timeout": ("server_error", None),
}
_OMIXA_TYPES: dict[ErrorKind, tuple[str, str]] = {
    "auth": ("authentication_error", "invalid_api_key"),
    "forbidden": ("permission_error", "model_not_allowed"),
    "invalid": ("invalid_request_error", "validation_error"),
    "not_found": ("invalid_request_error", "not_found"),
    "conflict": ("invalid_request_error", "conflict"),
    "credits": ("billing_error", "insufficient_balance"),
    "policy": ("invalid_request_error", "content_policy_violation"),
    "rate_limit": ("rate_limit_error", "rate_limit_exceeded"),
    "upstream": ("provider_error", "upstream_error"),
    "unavailable": ("provider_error", "no_route_available"),
    "timeout": ("provider_error", "upstream_timeout"),
}


@dataclass(frozen=True)
class Request:
    """One parsed HTTP request; ``headers`` keys are lower-case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)
    base_url: str = ""
    """Scheme and authority the client used, so returned URLs work from where it stands."""

    def json(self) -> Any:
        """The body as JSON; raises ``ValueError`` when it is not."""
        return json.loads(self.body or b"null")


@dataclass
class Response:
    """What to send back. ``drop`` closes without answering; ``truncate_to`` cuts the body."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    truncate_to: int | None = None
    stream: Iterable[bytes] | None = None
    """Sent chunked as it is produced, instead of ``body``: files too big to build first."""


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, body, headers=dict(headers or {}))


def error_response(
    provider: str,
    kind: ErrorKind,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    extra: Mapping[str, Any] | None = None,
    retry_after: float | None = None,
) -> Response:
    """The error in ``provider``'s own envelope and status code for this kind of failure."""
    status = _STATUS_OVERRIDES.get((provider, kind), _STATUS[kind])
    payload: dict[str, Any]
    if provider in ("openai", "aimlapi"):
        etype, default_code = _OPENAI_TYPES[kind]
        inner = {"message": message, "type": etype, "param": param, "code": code or default_code}
        payload = {"error": inner}
    elif provider == "omixa":
        etype, default_code = _OMIXA_TYPES[kind]
        payload = {"error": {"message": message, "type": etype, "code": code or default_code}}
    else:
        payload = {"error": message}
    payload.update(extra or {})
    headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return json_response(status, payload, headers)


Handler = Callable[[Request], Response]


class Surface(Protocol):
    """One simulated provider API: its routes (relative to its prefix) and its auth check."""

    provider: str

    def route(self, method: str, path: str) -> tuple[str, Handler] | None:
        """``(ledger label, handler)`` for this request, or None when no route matches."""
        ...

    def authenticate(self, req: Request) -> Response | None:
        """An error response when the credentials are missing or refused, else None."""
        ...

    def generate(self, req: Request) -> Response:
        """The paid submit: the only route that spends the submit bucket with scope ``submits``."""
        ...


def number(value: float) -> float | int:
    """Whole amounts as JSON integers (``24``, not ``24.0``), as the providers send them."""
    return int(value) if float(value).is_integer() else value


def go_duration(seconds: float) -> str:
    """Seconds in OpenAI's ``x-ratelimit-reset-*`` format (Go's): ``120ms``, ``1.5s``, ``6m0s``."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def iso_ms(ms: int) -> str:
    """Unix milliseconds as APIFrame's ISO timestamp, ``2026-05-02T09:00:31.000Z``."""
    moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
