"""The three steps of a line, as functions from its record (and the outside world) to one
``Transition``. They decide; ``worker.dispatch.runner`` applies. Nothing here touches Redis directly
but through ``Context``, so each step is tested on its own against a simulator.

Each step is safe to run twice: a submit reuses the attempt's idempotency key (a repeated
POST returns the job already bought), a poll only reads, a store writes objects that refuse
other bytes and accept the same bytes again.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from jobs import policy
from jobs.clock import now_iso
from jobs.errors import (
    AmbiguousSubmit,
    BatchStop,
    ImagebatchError,
    JobFailed,
    ProviderError,
    RateLimited,
    TransientProviderError,
)
from jobs.pricing import currency
from jobs.providers.base import Artifact, Finished, Pending, Provider
from jobs.settings import CoreSettings
from jobs.storage import Store
from worker.lines.endings import fail, regenerate, stopped_error
from worker.lines.failover import move_on
from worker.lines.faults import crash_point
from worker.lines.records import (
    BatchStatus,
    LimitEvent,
    LineRecord,
    LineStatus,
    Step,
    Transition,
)


def idempotency_key(batch: str, line_id: str, attempt: int, part: int = 0) -> str:
    """Same line, attempt and part → same key: a repeated POST returns the job already bought."""
    name = f"imagebatch:{batch}:{line_id}:{attempt}" + (f":{part}" if part else "")
    return hashlib.sha256(name.encode()).hexdigest()


@dataclass
class Context:
    """What a step may use: settings, adapters, the batch's store and record, and the few
    Redis reads a step needs (learned latency, a budget hold, inline image blobs)."""

    settings: CoreSettings
    batch: dict[str, str]
    adapter: Callable[[str], Provider]
    store: Store
    downloads: Any
    trusted_hosts: Callable[[str], frozenset[str]]
    expected_latency: Callable[[str, str], float | None]
    queue_share: Callable[[str, str], float | None]
    """The learned share of a job's time before its progress starts (``policy.queue_share``)."""
    reserve: Callable[[float, float], bool]
    put_blob: Callable[[int, int, bytes], str]
    get_blob: Callable[[str], bytes | None]
    usd_rates: dict[str, float | None] = field(default_factory=dict)
    out_of_pool: Callable[[], frozenset[str]] = frozenset
    """The providers that left the batch's pool (402, 401/403): a moving line skips them."""
    webhook_url: str | None = None
    payload: Sequence[Artifact] = ()
    """Inline images the previous step of this same task received (not re-read from Redis)."""

    @property
    def status(self) -> BatchStatus:
        return BatchStatus(self.batch.get("status", BatchStatus.RUNNING))


# -- submit -------------------------------------------------------------------------------------


def submit(ctx: Context, rec: LineRecord) -> Transition:
    settings, now = ctx.settings, time.time()
    stopped = _stopped(ctx, rec)
    if stopped is not None:
        return stopped
    if rec.deadline and now > rec.deadline:
        return fail(rec, ImagebatchError("the line's deadline passed", type="timeout"))
    adapter = ctx.adapter(rec.provider)
    changes: dict[str, Any] = {}
    budget = ctx.batch.get("budget")
    if budget and not rec.reserved:
        estimate = _in_budget_unit(ctx, rec, adapter.estimate(rec.request))
        if estimate is None or not ctx.reserve(estimate, float(budget)):
            unit = ctx.batch.get("budget_unit", "credits")
            return fail(
                rec,
                ImagebatchError(
                    f"the budget of {float(budget):g} {unit} would be exceeded by this "
                    f"line's estimated {adapter.estimate(rec.request):g}",
                    type="budget",
                ),
            )
        changes["reserved"] = estimate
    request = rec.request
    have = len(rec.images)
    if have or request.n > adapter.max_images_per_request:
        # Bought in parts: each part is its own job (and key); stored parts are kept.
        request = request.model_copy(
            update={"n": min(adapter.max_images_per_request, request.n - have)}
        )
    key = idempotency_key(rec.batch, rec.id, rec.attempt, part=have)
    counts: dict[str, float] = {"submit_requests": 1}
    if rec.ambiguous and not adapter.idempotent_submit:
        counts["ambiguous_submits"] = 1  # the last try may have been billed
    if not rec.submitted_at:
        changes["submitted_at"] = now_iso()
        changes["deadline"] = now + settings.line_deadline_s
    try:
        outcome = adapter.submit(request, key, **_webhook(ctx, adapter))
        crash_point(settings, "after_submit")
    except ProviderError as exc:
        refused = _not_taken(ctx, rec, exc, changes, counts)
        verdict = None if isinstance(exc, RateLimited) else not exc.provider_fault
        return replace(refused, answered=verdict)
    counts["jobs_accepted"] = 1
    changes |= {"tries": 0, "polls": 0, "misses": 0, "ambiguous": 0, "accepted_at": now}
    if isinstance(outcome, Finished):
        fetched = _fetched(ctx, rec, outcome, changes, counts, latency=time.time() - now)
        return replace(fetched, answered=True)
    expected = ctx.expected_latency(rec.provider, rec.request.model)
    webhook_s = settings.webhook_poll_s if ctx.webhook_url and adapter.webhooks else None
    changes |= {"job_id": outcome.job_id, "expected_s": expected or 0.0}
    return Transition(
        LineStatus.SUBMITTED,
        changes,
        due_in=policy.first_poll(expected, settings.poll_initial_s, webhook_s),
        counts=counts,
        outcome="accepted",
        answered=True,
    )


def _not_taken(
    ctx: Context,
    rec: LineRecord,
    exc: ProviderError,
    changes: dict[str, Any],
    counts: dict[str, float],
) -> Transition:
    """The provider did not take the line (or may have, without saying so). A pool line moves
    on where its provider has surely not billed it; a pinned one waits, retries or fails."""
    adapter = ctx.adapter(rec.provider)
    if isinstance(exc, RateLimited):
        return _again(ctx, rec, exc, LineStatus.READY, changes, counts, request=Step.SUBMIT)
    if isinstance(exc, AmbiguousSubmit):
        if rec.pool and ctx.settings.failover_ambiguous and not adapter.idempotent_submit:
            counts = counts | {"ambiguous_moved": 1}
            return move_on(ctx.settings, rec, exc, ctx.out_of_pool, changes, counts)
        # The job may exist: keep the slot, and try again with the same key.
        return _again(ctx, rec, exc, LineStatus.SUBMITTING, changes | {"ambiguous": 1}, counts)
    if rec.pool and exc.moves:
        return move_on(ctx.settings, rec, exc, ctx.out_of_pool, changes, counts)
    if isinstance(exc, TransientProviderError):
        return _again(ctx, rec, exc, LineStatus.READY, changes, counts)
    if isinstance(exc, BatchStop):
        return fail(rec, exc, changes=changes, counts=counts, stop=(exc.type, exc.message))
    return fail(rec, exc, changes=changes, counts=counts)


def _webhook(ctx: Context, adapter: Provider) -> dict[str, Any]:
    if ctx.webhook_url and adapter.webhooks:
        return {"webhook_url": ctx.webhook_url}
    return {}


def _stopped(ctx: Context, rec: LineRecord) -> Transition | None:
    """A line not yet bought in a batch that stopped, was cancelled or interrupted."""
    status = ctx.status
    if status is BatchStatus.INTERRUPTED:
        # Not a failure: the same command resumes it, with the same attempt and key.
        return Transition(LineStatus.READY, due_in=3600.0, outcome="held")
    if status in (BatchStatus.CANCELLED, BatchStatus.STOPPING):
        return fail(rec, stopped_error(ctx.batch))
    return None


def _in_budget_unit(ctx: Context, rec: LineRecord, amount: float) -> float | None:
    """The amount in the budget's currency, or None when no conversion is configured."""
    have = currency(rec.provider, ctx.adapter(rec.provider).credit_unit)
    want = ctx.batch.get("budget_currency", have)
    if want == have:
        return amount
    rates = ctx.usd_rates

    def usd_per(name: str) -> float | None:
        return 1.0 if name == "USD" else rates.get(name.removesuffix(" credits"))

    source, target = usd_per(have), usd_per(want)
    if source is None or target is None:
        return None
    return round(amount * source / target, 6)


# -- poll ---------------------------------------------------------------------------------------


def poll(ctx: Context, rec: LineRecord) -> Transition:
    _until(rec.poll_at)
    settings, now = ctx.settings, time.time()
    if rec.deadline and now > rec.deadline:
        message = f"job {rec.job_id} did not finish before the line's deadline"
        return fail(rec, ImagebatchError(message, type="timeout"))
    adapter = ctx.adapter(rec.provider)
    crash_point(settings, "during_poll")
    try:
        outcome = adapter.poll(rec.job_id)
    except RateLimited as exc:
        return _again(ctx, rec, exc, LineStatus.SUBMITTED, {}, {"polls": 1}, request=Step.POLL)
    except TransientProviderError as exc:
        # Polling may go on to the line's deadline: a read is never billed.
        wait = policy.retry_wait(rec.tries + 1, settings.retry_base_s, settings.retry_max_s, None)
        return Transition(
            LineStatus.SUBMITTED,
            {"tries": rec.tries + 1},
            due_in=wait,
            counts={"polls": 1},
            outcome=f"retry ({exc.type})",
        )
    except JobFailed as exc:
        if rec.pool:
            return move_on(ctx.settings, rec, exc, ctx.out_of_pool, counts={"polls": 1})
        return regenerate(ctx.settings, rec, exc, counts={"polls": 1})
    except ProviderError as exc:
        return fail(rec, exc, counts={"polls": 1})
    if not isinstance(outcome, Finished):
        return _pending(ctx, rec, outcome, adapter.webhooks, now)
    latency = outcome.latency_s if outcome.latency_s is not None else now - rec.accepted_at
    return _fetched(ctx, rec, outcome, {}, {"polls": 1}, latency=latency)


def _until(at: float) -> None:
    """A poll handed out ahead of its time (``policy.POLL_LEAD_S``) goes out when it is due."""
    wait = at - time.time()
    if wait > 0:
        time.sleep(min(wait, policy.POLL_LEAD_S))


def _pending(
    ctx: Context, rec: LineRecord, outcome: Pending, webhooks: bool, now: float
) -> Transition:
    """The job still runs: look again when it should be done (from its progress, where the
    provider reports it; else in steps that grow), or at the webhook's fallback pace."""
    settings = ctx.settings
    polls = rec.polls + 1
    changes: dict[str, Any] = {"polls": polls, "tries": 0}
    t = now - rec.accepted_at
    delay: float | None = None
    if ctx.webhook_url and webhooks:
        delay = settings.webhook_poll_s
    elif outcome.progress is not None:
        before = (rec.progress_t, rec.progress) if rec.progress else None
        queue = ctx.queue_share(rec.provider, rec.request.model)
        delay = policy.after_progress(t, outcome.progress, before, settings.poll_max_s, queue)
        if outcome.progress > 0:
            changes |= {"progress": outcome.progress, "progress_t": round(t, 3)}
    if delay is None:
        delay = policy.next_poll(
            polls, rec.expected_s or None, settings.poll_initial_s, settings.poll_max_s
        )
    due_in = 0.0 if policy.testing() else delay
    changes["poll_at"] = round(now + due_in, 3)
    return Transition(
        LineStatus.SUBMITTED,
        changes,
        due_in=due_in,
        counts={"polls": 1},
        outcome="pending",
        detail=f"{outcome.progress}%" if outcome.progress else "",
    )


def finished_by_webhook(ctx: Context, rec: LineRecord, outcome: Finished) -> Transition:
    """A verified webhook said the job completed: the same transition a poll would make."""
    latency = outcome.latency_s if outcome.latency_s is not None else time.time() - rec.accepted_at
    return _fetched(ctx, rec, outcome, {}, {"webhooks": 1}, latency=latency)


def failed_by_webhook(ctx: Context, rec: LineRecord, exc: JobFailed) -> Transition:
    if rec.pool:
        return move_on(ctx.settings, rec, exc, ctx.out_of_pool, counts={"webhooks": 1})
    return regenerate(ctx.settings, rec, exc, counts={"webhooks": 1})


def _fetched(
    ctx: Context,
    rec: LineRecord,
    outcome: Finished,
    changes: dict[str, Any],
    counts: dict[str, float],
    *,
    latency: float,
) -> Transition:
    """The job is done: note where its images are (inline ones go to Redis until stored, so
    a crash before the upload cannot lose what was paid for) and what it cost."""
    adapter = ctx.adapter(rec.provider)
    credits = outcome.credits
    if credits is None:
        part = rec.request.model_copy(update={"n": len(outcome.artifacts)})
        credits = adapter.estimate(part)
    artifacts: list[dict[str, str]] = []
    for k, artifact in enumerate(outcome.artifacts, start=len(rec.images)):
        if artifact.data is not None:
            artifacts.append({"blob": ctx.put_blob(rec.idx, k, artifact.data)})
        else:
            artifacts.append({"url": artifact.url or ""})
    changes = changes | {
        "artifacts": tuple(artifacts),
        "credits": round(rec.credits + credits, 6),
        "tries": 0,
        "misses": 0,
        "fetched_at": time.time(),
    }
    if outcome.job_id:
        changes["job_id"] = outcome.job_id
    polled = ctx.adapter(rec.provider).polled
    queue = policy.queue_share(rec.progress_t, rec.progress, latency) if rec.progress else None
    return Transition(
        LineStatus.FETCHED,
        changes,
        counts=counts,
        latency_s=max(0.0, latency) if polled else None,
        queue_share=queue if polled else None,
        outcome="completed",
        payload=tuple(outcome.artifacts),
    )


def _again(
    ctx: Context,
    rec: LineRecord,
    exc: TransientProviderError,
    back_to: LineStatus,
    changes: dict[str, Any],
    counts: dict[str, float],
    request: Step = Step.SUBMIT,
) -> Transition:
    """Try again later. A 429 is back-pressure: the line waits what the provider asked (its
    Retry-After), costs no try (only its deadline ends the wait), and is counted for the
    provider's controller, which slows every worker only on evidence that our own load causes
    the 429s. Anything else transient counts a try; the line fails after ``http_retries``."""
    settings = ctx.settings
    throttled = isinstance(exc, RateLimited)
    tries = rec.tries if throttled else rec.tries + 1
    late = throttled and bool(rec.deadline) and time.time() > rec.deadline
    if late or tries > settings.http_retries:
        return fail(rec, exc, changes=changes, counts=counts)
    retry_after = exc.retry_after
    if throttled and retry_after is None:
        retry_after = 1.0
    wait = policy.retry_wait(tries, settings.retry_base_s, settings.retry_max_s, retry_after)
    if throttled and rec.pool and back_to is LineStatus.READY:
        wait = 0.0  # the provider's own pause holds it back; another member may take the line
    if isinstance(exc, RateLimited):
        limit = LimitEvent(exc.kind, request, exc.retry_after, exc.named_limit)
        counts = counts | {"throttled": 1}
        outcome = f"429 ({exc.kind})"
    else:
        limit, outcome = None, "retry"
        changes = changes | {"tries": tries}
    return Transition(
        back_to,
        changes,
        due_in=wait,
        counts=counts,
        limit=limit,
        outcome=outcome,
        detail=f"{exc.message}; trying again in {wait:.1f}s",
    )
