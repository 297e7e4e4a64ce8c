"""A result row (one per counted manifest line, in ``results.jsonl`` and the part files) and the
images it points at."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["succeeded", "failed", "rejected"]


class ImageRef(BaseModel):
    """One stored image, as the result row describes it."""

    uri: str
    sha256: str
    bytes: int
    content_type: str
    width: int
    height: int


class RowError(BaseModel):
    type: str
    message: str
    retryable: bool


class RouteStep(BaseModel):
    """A provider a pool line left, and why (``worker.lines.failover.Left``)."""

    provider: str
    outcome: str
    reason: str


class ReusedFrom(BaseModel):
    """Where a reused line's images were bought: another batch under the same ``--out``."""

    batch: str
    line: int
    job_id: str | None = None


class ResultRow(BaseModel):
    """One row of results.jsonl: exactly one per counted manifest line."""

    line: int
    id: str | None
    status: Status
    prompt: str | None = None
    model: str | None = None
    provider: str | None = None
    fingerprint: str | None = None
    """sha256 of what decides what is bought (``ImageRequest.fingerprint``): the key a later
    batch under the same ``--out`` finds this line's images by."""
    job_id: str | None = None
    attempts: int = 0
    route: list[RouteStep] = Field(default_factory=list)
    """The providers tried before ``provider``, each with why the line moved on."""
    usd: float | None = 0
    """``credits`` in USD; null where the provider's credit has no configured USD price."""
    credits: float = 0
    images: list[ImageRef] = Field(default_factory=list)
    error: RowError | None = None
    metadata: dict[str, Any] | None = None
    submitted_at: str | None = None
    completed_at: str | None = None
    reused_from: ReusedFrom | None = None
    """Set when the images were taken from an earlier batch instead of bought (credits 0)."""
