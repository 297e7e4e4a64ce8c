"""What a group's job said about each of its lines, as the transition that ends or retries
the line: images (stored like any other line's), a refusal (the line fails with the reason),
or no answer yet (a new attempt in a later group, or the synchronous provider if allowed).

Pure decisions, as ``worker.lines.steps`` are: the group job applies them."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from jobs.errors import ImagebatchError, TransientProviderError
from jobs.providers.openai_batch import OpenAIBatch, RequestResult
from jobs.settings import CoreSettings, GroupConfig
from worker.lines.endings import fail, regenerate, stopped_error
from worker.lines.groups import GroupRecord
from worker.lines.records import BatchStatus, LineRecord, LineStatus, Transition
from worker.lines.steps import Context


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def sent(group: GroupRecord, rec: LineRecord, request_id: str | None = None) -> dict[str, Any]:
    """What every line leaving its group records: it was submitted (when the job was made)
    and under which request, and it is in no group any more."""
    changes: dict[str, Any] = {"group": ""}
    if group.created_at and not rec.submitted_at:
        changes["submitted_at"] = iso(group.created_at)
    if request_id or group.job_id:
        changes["job_id"] = request_id or group.job_id
    return changes


def stopped(meta: dict[str, str]) -> bool:
    """The batch was cancelled or stopped: a line not bought now is not bought at all."""
    status = meta.get("status", BatchStatus.RUNNING)
    return status in (BatchStatus.CANCELLED, BatchStatus.STOPPING)


def images(
    ctx: Context,
    config: GroupConfig,
    adapter: OpenAIBatch,
    group: GroupRecord,
    rec: LineRecord,
    result: RequestResult,
) -> Transition:
    """The request succeeded: its images (decoded now, kept in Redis until they are stored,
    so a crash cannot lose what was paid for) and the line's share of the job's cost."""
    body = result.body or {}
    try:
        artifacts = adapter.artifacts(body)
    except TransientProviderError as exc:
        return again(ctx.settings, config, ctx.batch, group, rec, exc, result.request_id)
    if len(artifacts) != rec.request.n or any(a.data is None for a in artifacts):
        problem = TransientProviderError(
            f"{adapter.name} returned {len(artifacts)} images for n={rec.request.n}",
            type="malformed_response",
        )
        return again(ctx.settings, config, ctx.batch, group, rec, problem, result.request_id)
    credits = adapter.cost(rec.request, body, len(artifacts))
    stored = [{"blob": ctx.put_blob(rec.idx, k, a.data or b"")} for k, a in enumerate(artifacts)]
    changes = sent(group, rec, result.request_id) | {
        "artifacts": tuple(stored),
        "credits": round(rec.credits + credits, 6),
        "tries": 0,
        "misses": 0,
        "fetched_at": time.time(),
    }
    return Transition(
        LineStatus.FETCHED,
        changes,
        due_in=ctx.settings.lease_s,
        outcome="completed",
        payload=tuple(artifacts),
    )


def refused(
    group: GroupRecord, rec: LineRecord, exc: ImagebatchError, request_id: str | None = None
) -> Transition:
    """The request was refused (its content, a field): the line fails with the reason."""
    return fail(rec.evolve(**sent(group, rec, request_id)), exc)


def again(
    settings: CoreSettings,
    config: GroupConfig,
    meta: dict[str, str],
    group: GroupRecord,
    rec: LineRecord,
    exc: ImagebatchError,
    request_id: str | None = None,
) -> Transition:
    """No images, but a later request may have them (a 5xx, a batch that expired or was
    cancelled before the request ran): a new attempt in a later group, or, where the user
    allows it, on the synchronous provider at its full price. A cancelled batch buys none."""
    changes = sent(group, rec, request_id)
    if stopped(meta):
        return fail(rec.evolve(**changes), stopped_error(meta))
    tried = rec.attempt - rec.first_attempt + 1
    if config.fallback and tried < settings.max_attempts:
        return Transition(
            LineStatus.READY,
            changes
            | {
                "provider": config.fallback,
                "attempt": rec.attempt + 1,
                "job_id": "",
                "artifacts": (),
                "tries": 0,
                "polls": 0,
            },
            counts={"fallbacks": 1},
            outcome=f"to {config.fallback}",
            detail=f"{exc.message}; attempt {rec.attempt + 1} on {config.fallback} (full price)",
        )
    t = regenerate(settings, rec.evolve(**changes), exc)
    if t.status is LineStatus.READY:
        t = replace(t, changes=changes | t.changes, outcome="to a later group")
    return t
