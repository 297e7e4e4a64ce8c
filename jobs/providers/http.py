"""HTTP plumbing shared by the adapters: one place turns transport and status errors into
the error taxonomy, so every provider classifies the same failure the same way."""

from __future__ import annotations

import email.utils
import functools
import math
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any

import httpx

from jobs.errors import (
    AmbiguousSubmit,
    BatchStop,
    PermanentProviderError,
    RateLimited,
    TransientProviderError,
)
from jobs.settings import ProviderConfig

USER_AGENT = "imagebatch/0.1 (+https://github.com/imagebatch/imagebatch)"
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
"""Transport errors raised before the request left: retrying cannot buy a second image."""


@functools.cache
def tls() -> ssl.SSLContext:
    """The process's one TLS context: building one loads the CA bundle (~45 ms), and a run
    builds several clients (each provider's, the downloads') before its first submit."""
    return httpx.create_ssl_context()


def make_client(config: ProviderConfig) -> httpx.Client:
    """A pooled client with explicit timeouts; the read timeout is the provider's own."""
    timeout = httpx.Timeout(config.timeout_s, connect=10.0, pool=30.0)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    return httpx.Client(
        timeout=timeout,
        limits=limits,
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
        verify=tls(),
    )


def send(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    submit: bool = False,
    **kwargs: Any,
) -> httpx.Response:
    """Send one request; transport failures become retryable (or ambiguous, for submits)."""
    try:
        return client.request(method, url, **kwargs)
    except NOT_SENT as exc:
        raise TransientProviderError(f"cannot reach provider: {type(exc).__name__}") from None
    except httpx.TransportError as exc:
        if submit:
            raise AmbiguousSubmit(
                f"connection lost after the submit was sent ({type(exc).__name__})"
            ) from None
        raise TransientProviderError(f"provider connection failed: {type(exc).__name__}") from None


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date), if the provider said.

    Anything unreadable (``soon``, empty, a garbled date, ``inf``) is no hint at all: the
    caller's own backoff applies, rather than an exception outside the error taxonomy.
    """
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return _seconds_until(value)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _seconds_until(date: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(date)
        if when.tzinfo is None:  # "-0000" means UTC with no zone said; HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def error_text(response: httpx.Response) -> str:
    """The provider's own error message, whichever envelope it uses, kept short."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)[:300]
    return str(body)[:300]


SECRET_HEADERS = ("x-api-key", "authorization", "api-key")


def redact(text: str, response: httpx.Response) -> str:
    """Remove the credentials we sent from a message built out of the provider's answer."""
    try:
        headers = response.request.headers
    except RuntimeError:
        return text
    for name in SECRET_HEADERS:
        value = headers.get(name)
        if not value:
            continue
        for secret in (value, value.removeprefix("Bearer ")):
            if len(secret) >= 8:
                text = text.replace(secret, "[redacted]")
    return text


def error_code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return str(code) if code is not None else None


def check(response: httpx.Response, provider: str, *, submit: bool = False) -> None:
    """Raise the taxonomy error a non-2xx response means; return quietly on success."""
    status = response.status_code
    if status < 400:
        return
    text = redact(f"{provider} answered {status}: {error_text(response)}", response)
    code = error_code(response)
    if status == 402 or code in ("insufficient_quota", "insufficient_balance"):
        raise BatchStop(text, type="insufficient_credits", status=status)
    if status in (401, 403):
        raise BatchStop(text, type="auth", status=status)
    if status == 429:
        raise RateLimited(text, retry_after=retry_after(response), status=status)
    if status >= 500:
        raise TransientProviderError(
            text, retry_after=retry_after(response), type="provider_unavailable", status=status
        )
    if status == 409 and submit:
        raise PermanentProviderError(text, type="idempotency_conflict", status=status)
    if code == "moderation_blocked" or "safety" in text.lower() or "policy" in text.lower():
        raise PermanentProviderError(text, type="content_policy", status=status)
    raise PermanentProviderError(text, type="provider_rejected", status=status)


def json_object(response: httpx.Response, provider: str, *, submit: bool = False) -> dict[str, Any]:
    """The body as a JSON object; garbage is retryable (and ambiguous for an accepted submit)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    message = f"{provider} sent a malformed response body (HTTP {response.status_code})"
    if submit:
        raise AmbiguousSubmit(message, type="malformed_response")
    raise TransientProviderError(message, type="malformed_response")


KEY_CHECK_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def key_check(
    client: httpx.Client,
    provider: str,
    url: str,
    headers: dict[str, str],
    refused_on: frozenset[int],
) -> bool:
    """Ask a provider's free endpoint whether it takes the key. ``BatchStop`` (``auth``) when
    it answers one of ``refused_on``; True when it answered, False when it could not be asked
    (the provider is away: the first submit will find out, and a run need not stop for it)."""
    try:
        response = client.get(url, headers=headers, timeout=KEY_CHECK_TIMEOUT)
    except httpx.HTTPError:
        return False
    if response.status_code in refused_on:
        text = f"{provider} answered {response.status_code}: {error_text(response)}"
        raise BatchStop(redact(text, response), type="auth", status=response.status_code)
    return response.status_code < 400


class KeyGate:
    """Until a provider has taken this process's key, its submits go one at a time: a refused
    key then costs one 401, not one per line in flight. Where the provider has a free call
    that says whether it takes the key (``check``), that call opens the gate and no paid
    submit waits on another. Else a refusal comes at once, so a submit still running after
    ``PATIENCE_S`` has got past the key and the others go on without waiting. A refusal is
    remembered for ``REFUSAL_S``, and the submits that waited for it fail with it, unsent."""

    PATIENCE_S = 1.5
    REFUSAL_S = 60.0

    def __init__(self, check: Callable[[], bool] | None = None) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._refused: tuple[float, BatchStop] | None = None
        self._check = check

    @contextmanager
    def first(self) -> Iterator[None]:
        """Around one submit, from sending it to reading its status."""
        if self._open:
            yield
            return
        held = self._lock.acquire(timeout=self.PATIENCE_S)
        try:
            refused = self._refused
            if refused is not None and time.monotonic() - refused[0] < self.REFUSAL_S:
                raise refused[1]
            if not self._open and self._check is not None:
                self._open = self._refusing(self._check)
            if self._open:
                if held:
                    self._lock.release()
                    held = False
                yield
                return
            yield from self._refusing_submit()
        finally:
            if held:
                self._lock.release()

    def _refusing(self, attempt: Callable[[], bool]) -> bool:
        try:
            return attempt()
        except BatchStop as exc:
            if exc.type == "auth":
                self._refused = (time.monotonic(), exc)
            raise

    def _refusing_submit(self) -> Iterator[None]:
        try:
            yield
        except BatchStop as exc:
            if exc.type == "auth":
                self._refused = (time.monotonic(), exc)
            raise
        self._open = True
