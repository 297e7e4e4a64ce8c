"""The error taxonomy. Each class knows whether trying again can help, so tasks never guess.

    ImagebatchError
    ├── ConfigError                 setup is wrong; nothing was submitted (exit 2)
    ├── ManifestError               a manifest line is unusable (line, field, reason)
    ├── ProviderError
    │   ├── TransientProviderError  network, timeout, 5xx, malformed JSON: retry later
    │   │   ├── RateLimited         429: back-pressure; slows every worker, costs no try
    │   │   └── AmbiguousSubmit     the submit may have been accepted; never blindly re-bought
    │   ├── PermanentProviderError  4xx, validation, content policy: the line fails
    │   ├── JobFailed               the provider ran the job and it ended FAILED/CANCELLED
    │   └── BatchStop               401/403/402: every later submit would fail the same way
    ├── DownloadError               result image missing, truncated or not an image (retryable)
    │   ├── ImageMissing            404/403/410 on a result URL: CDN lag, or gone; look again
    │   ├── ImageExpired            the URL is gone for good; only a new job can help
    │   └── ImageRefused            unsafe URL or over the size cap: the line fails
    └── StorageError
        └── ObjectExists            the key exists with other bytes; we never overwrite

``type`` is the short reason that ends up in result rows (``error.type``).
"""

from __future__ import annotations

import re
from typing import Any


class ImagebatchError(Exception):
    """Root of every error imagebatch raises on purpose."""

    retryable: bool = False
    type: str = "error"

    def __init__(self, message: str, *, type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if type is not None:
            self.type = type

    def as_row_error(self) -> dict[str, Any]:
        """The ``error`` object of a result row."""
        return {"type": self.type, "message": self.message, "retryable": self.retryable}


class ConfigError(ImagebatchError):
    """A setting is missing or wrong; the message names it and how to fix it."""

    type = "config"


class ManifestError(ImagebatchError):
    """One manifest line cannot be used; it becomes a ``rejected`` row, others go on."""

    type = "rejected"

    def __init__(self, line: int, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.line = line
        self.field = field


class ProviderError(ImagebatchError):
    """The provider's API said no, or could not be reached."""

    type = "provider_error"
    moves: bool = True
    """The provider has not produced and will not produce a billable result for this request:
    a pool may give the line to another of its providers without paying twice."""
    provider_fault: bool = False
    """The provider itself is failing (5xx, timeouts, refused connections): counts toward its
    cooldown. A 429 is back-pressure, a refusal is about the request: neither counts."""

    def __init__(self, message: str, *, type: str | None = None, status: int | None = None) -> None:
        super().__init__(message, type=type)
        self.status = status


class TransientProviderError(ProviderError):
    """Trying the same request again later can succeed (network, timeout, 5xx, 429)."""

    retryable = True
    type = "provider_unreachable"
    provider_fault = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        type: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, type=type, status=status)
        self.retry_after = retry_after


class RateLimited(TransientProviderError):
    """429: the provider wants fewer requests or fewer jobs at once. Never a failed try."""

    type = "rate_limited"
    provider_fault = False

    @property
    def kind(self) -> str:
        """``concurrency`` when the provider says too many jobs run at once, else ``rate``."""
        return "concurrency" if "concurren" in self.message.lower() else "rate"

    @property
    def named_limit(self) -> int | None:
        """The concurrency limit the message names, if any: "Too many concurrent jobs (limit
        16)", "max 16 concurrent", "at most 16 jobs", "concurrency_limit=16"."""
        for match in _NAMED_LIMIT.finditer(self.message):
            value = int(match.group(1) or match.group(2))
            if value > 0:
                return value
        return None


_NAMED_LIMIT = re.compile(
    r"\b(?:limit|max(?:imum)?|at\s+most|up\s+to)\b(?:\s+(?:of|is))?\s*[:=]?\s*(\d+)\b"
    r"|\bconcurren\w*(?:\s+(?:limit|jobs|requests))?\s*[:=]\s*(\d+)\b",
    re.IGNORECASE,
)


class AmbiguousSubmit(TransientProviderError):
    """The connection broke after the request was sent: the job may exist and may be billed."""

    type = "ambiguous_submit"
    moves = False


class PermanentProviderError(ProviderError):
    """The request itself is wrong or refused (4xx, content policy); retrying buys nothing."""

    type = "provider_rejected"


class JobFailed(ProviderError):
    """The job ran and ended FAILED or CANCELLED; ``retryable`` says whether a new job may help."""

    type = "job_failed"

    def __init__(self, message: str, *, retryable: bool, type: str | None = None) -> None:
        super().__init__(message, type=type)
        self.retryable = retryable


class BatchStop(ProviderError):
    """Auth or credit trouble: no later submit of this batch can succeed, so stop them all."""

    type = "insufficient_credits"


class DownloadError(ImagebatchError):
    """A finished image could not be fetched intact; fetching again may work."""

    retryable = True
    type = "download_failed"


class ImageMissing(DownloadError):
    """A result URL answered 404/403/410. Right after a job finishes this is usually a CDN
    that has not caught up; only if it stays so (or the job says expired) is it gone."""

    type = "image_missing"


class ImageExpired(DownloadError):
    """The result URL is gone (404/expired): the job must be run again to get the image."""

    retryable = False
    type = "image_expired"


class ImageRefused(DownloadError):
    """The result points somewhere we will not fetch from, or is too large to keep."""

    retryable = False
    type = "image_refused"


class StorageError(ImagebatchError):
    """The output store refused or failed a write."""

    retryable = True
    type = "storage_failed"


class ObjectExists(StorageError):
    """The key already holds different bytes; imagebatch never overwrites an image."""

    retryable = False
    type = "object_exists"
