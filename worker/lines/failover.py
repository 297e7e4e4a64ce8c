"""A pool line its provider did not take moves on to the next candidate, and never pays twice.

A line moves only when the provider it was sent to has definitely not produced and will not
produce a billable result (``ProviderError.moves``: a refusal, a 5xx, a refused connection, a
402 or 401/403, a job that ended FAILED). A submit that may have been billed (sent, no answer)
stays where it is. Each move is a new attempt (its own idempotency key) and a ``route`` entry
on the line's row. A provider that refused the line itself, or left the batch's pool, is never
tried again for it; one that was only unavailable is, after every other candidate, with backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any

from jobs import policy
from jobs.errors import BatchStop, ImagebatchError, JobFailed, ProviderError
from jobs.routing import queue_members, queue_name
from jobs.settings import CoreSettings
from worker.lines.endings import fail
from worker.lines.records import LineRecord, LineStatus, Transition


class Left(StrEnum):
    """Why a line left a provider: the ``outcome`` of its ``route`` entry."""

    UNAVAILABLE = "unavailable"
    """5xx, a refused connection: the provider may serve the line later."""
    REFUSED = "refused"
    """The provider said no to this line (4xx, its job refused): never tried again for it."""
    OUT = "out"
    """402 / 401 / 403: the provider left the batch's pool."""
    FAILED = "failed"
    """The job ran and ended FAILED: another job (anywhere) may succeed."""
    AMBIGUOUS = "ambiguous"
    """Sent without an answer, moved anyway (``IMAGEBATCH_FAILOVER_AMBIGUOUS``)."""


FINAL = frozenset({Left.REFUSED, Left.OUT})
"""Outcomes after which the line never goes back to that provider."""


def why(exc: ProviderError) -> Left:
    if isinstance(exc, BatchStop):
        return Left.OUT
    if isinstance(exc, JobFailed):
        return Left.FAILED if exc.retryable else Left.REFUSED
    if not exc.moves:
        return Left.AMBIGUOUS
    return Left.UNAVAILABLE if exc.retryable else Left.REFUSED


def move_on(
    settings: CoreSettings,
    rec: LineRecord,
    exc: ProviderError,
    out: Callable[[], Iterable[str]],
    changes: dict[str, Any] | None = None,
    counts: dict[str, float] | None = None,
) -> Transition:
    """The pool line leaves ``rec.provider`` for its next candidate (``out``: the providers
    that left the batch's pool), or fails naming each candidate's reason when none is left."""
    left = why(exc)
    route = (*rec.route, {"provider": rec.provider, "outcome": left.value, "reason": exc.message})
    rec = rec.evolve(**(changes or {}), route=route)
    counts = dict(counts or {})
    never = {e["provider"] for e in route if e["outcome"] in FINAL} | set(out())
    current = queue_members(rec.queue) if rec.queue else rec.pool
    remaining = [c for c in current if c != rec.provider and c not in never]
    tries, wait = rec.tries, 0.0
    if not remaining:
        # Every candidate had its turn: those that may still serve it, from the cheapest.
        remaining = [c for c in rec.pool if c not in never]
        tries += 1
        if not remaining or tries > settings.http_retries:
            reasons = "; ".join(f"{e['provider']}: {e['reason']}" for e in route[-len(rec.pool) :])
            error = ImagebatchError(
                f"no provider of the pool could take it ({reasons})", type=exc.type
            )
            return fail(rec, error, changes={**(changes or {}), "route": route}, counts=counts)
        wait = policy.retry_wait(tries, settings.retry_base_s, settings.retry_max_s, None)
    if rec.reserved and not rec.credits:
        counts["reserved"] = -rec.reserved  # the next provider holds its own price
    return Transition(
        LineStatus.READY,
        {
            **(changes or {}),
            "route": route,
            "queue": queue_name(remaining),
            "attempt": rec.attempt + 1,
            "job_id": "",
            "artifacts": (),
            "tries": tries,
            "polls": 0,
            "ambiguous": 0,
            "reserved": 0.0 if not rec.credits else rec.reserved,
        },
        due_in=wait,
        counts=counts | {"moved": 1},
        leave=(rec.provider, exc.message) if left is Left.OUT else None,
        outcome=f"moved ({left})",
        detail=f"{rec.provider}: {exc.message}; next: {remaining[0]}",
    )
