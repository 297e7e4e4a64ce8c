"""How a line ends, or starts over: its result row, a failure (giving back what its budget
held), a new job for a line whose job produced nothing usable, and the reason a stopped batch
gives its lines that were never bought."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobs import policy
from jobs.clock import now_iso
from jobs.errors import ImagebatchError
from jobs.output.rows import ResultRow
from jobs.routing import POOLED
from jobs.settings import CoreSettings
from worker.lines.records import BatchStatus, LineRecord, LineStatus, Transition


def stopped_error(meta: Mapping[str, str]) -> ImagebatchError:
    """Why a line of a cancelled or stopped batch ends without being bought: the one wording
    the submit step, the feeder and the drain all use."""
    if meta.get("status") == BatchStatus.CANCELLED:
        return ImagebatchError("the batch was cancelled", type="cancelled")
    return ImagebatchError(
        meta.get("stop_message") or "the batch stopped", type=meta.get("stop_reason") or "stopped"
    )


def make_row(rec: LineRecord, status: str, error: ImagebatchError | None = None) -> ResultRow:
    request = rec.request
    return ResultRow.model_validate(
        {
            "line": rec.line,
            "id": rec.id,
            "status": status,
            "prompt": request.prompt,
            "model": request.model,
            "provider": rec.provider,
            "fingerprint": request.fingerprint(POOLED if rec.pool else rec.provider),
            "job_id": rec.job_id or None,
            "attempts": rec.attempt if rec.submitted_at else 0,
            "route": _route(rec, status, error),
            "credits": round(rec.credits, 6),
            "images": list(rec.images) if status == "succeeded" else [],
            "error": error.as_row_error() if error is not None else None,
            "metadata": request.metadata,
            "submitted_at": rec.submitted_at or None,
            "completed_at": now_iso(),
        }
    )


def _route(rec: LineRecord, status: str, error: ImagebatchError | None) -> list[dict[str, str]]:
    """A pool line's route: the providers it left, then the one it ended at."""
    route = list(rec.route)
    ended_elsewhere = not route or route[-1]["provider"] != rec.provider
    if rec.pool and rec.submitted_at and (status == "succeeded" or ended_elsewhere):
        reason = error.message if error is not None else ""
        route.append({"provider": rec.provider, "outcome": status, "reason": reason})
    return route


def fail(
    rec: LineRecord,
    exc: ImagebatchError,
    *,
    changes: dict[str, Any] | None = None,
    counts: dict[str, float] | None = None,
    stop: tuple[str, str] | None = None,
    outcome: str | None = None,
) -> Transition:
    """The line ends ``failed`` with ``exc`` as its reason; what its budget held is given
    back (the one place a hold is released) unless it was billed."""
    rec = rec.evolve(**(changes or {}))
    counts = dict(counts or {})
    if rec.reserved and not rec.credits:
        counts["reserved"] = -rec.reserved
    return Transition(
        LineStatus.FAILED,
        row=make_row(rec, "failed", exc),
        counts=counts,
        stop=stop,
        outcome=outcome or f"failed ({exc.type})",
        detail=exc.message,
    )


def regenerate(
    settings: CoreSettings,
    rec: LineRecord,
    exc: ImagebatchError,
    counts: dict[str, float] | None = None,
) -> Transition:
    """The job ended without usable images: buy a new one if the line has attempts left."""
    tried = rec.attempt - rec.first_attempt + 1
    counts = dict(counts or {})
    if not exc.retryable or tried >= settings.max_attempts:
        return fail(rec, exc, counts=counts)
    if exc.type == "image_expired":
        counts["rebought_after_expiry"] = 1  # the expired job was paid for: owned up to
    wait = policy.backoff(tried, settings.retry_base_s, settings.retry_max_s)
    changes = {"attempt": rec.attempt + 1, "job_id": "", "artifacts": (), "tries": 0, "polls": 0}
    return Transition(
        LineStatus.READY,
        changes,
        due_in=wait,
        counts=counts,
        outcome="new job",
        detail=f"{exc.message}; attempt {rec.attempt + 1} in {wait:.1f}s",
    )
