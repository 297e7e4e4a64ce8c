"""``imagebatch schedule``: every new manifest of an inbox is submitted, exactly once.

The inbox (``IMAGEBATCH_INBOX``) is a folder or ``s3://bucket/prefix``; its manifests are the
``*.jsonl`` files directly under it. ``imagebatch schedule`` runs a Celery beat that sends
``imagebatch.inbox`` (one pass, run by a worker) at ``IMAGEBATCH_SCHEDULE`` (cron, UTC);
``imagebatch schedule --once`` runs one pass right here, for cron users and tests.

A manifest's identity is its name and the sha256 of its content. One pass, per manifest:

1. read it into a spool file (a folder's file once it is ``SETTLE_S`` old and unchanged while
   read; an S3 object at the ETag it was listed with);
2. claim it in Redis: ``SET claim_key(name, sha) NX`` with a lease that a thread keeps alive
   while we work. One scheduler wins, the others skip it. A scheduler that dies stops renewing:
   the lease runs out, and the next pass (of any scheduler) takes the manifest over;
3. check again that it is still unrecorded (a record is always written before a claim is let
   go, so a scheduler that read it before another one finished sees that record here);
4. validate it (no valid line at all: refused), then ``start_batch`` it as
   ``default_batch_id(name, sha, provider)``;
5. turn the claim into ``submitted`` for ``SUBMITTED_TTL_S``, then record it: a folder's file
   moves to ``submitted/NAME`` (beside it ``NAME.submitted.json``); an S3 manifest stays and
   gets ``.imagebatch/NAME.submitted.json`` (one PUT: nothing of the user's is deleted, and
   only PutObject is needed). A claim found ``submitted`` only finishes the record.

Refused manifests: a folder's moves to ``refused/NAME`` with ``refused/NAME.reason.txt``; an
S3 one gets ``.imagebatch/NAME.refused.json``; a warning is logged. Either is retried only
once its content changes (or, in a folder, it is put in the inbox again). Trouble that is not
the manifest's (Redis, the output store, the inbox unreachable) leaves it for the next pass.
Even a manifest submitted twice would not be bought twice: the batch id is derived from the
content, and ``start_batch`` follows or resumes a batch it already knows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from jobs.clock import now_iso
from jobs.errors import ConfigError, StorageError
from jobs.manifest.spool import Spooled, default_batch_id, file_chunks
from jobs.settings import CoreSettings
from jobs.storage import absolute_out, check_writable
from jobs.text import shown
from jobs.validate import tally
from worker import runtime
from worker.batch.start import Started, start_batch
from worker.celery import beat
from worker.celery.app import app
from worker.celery.beat import crontab
from worker.celery.launch import launched
from worker.redis import keys
from worker.redis.claims import Claim
from worker.redis.connect import RedisError
from worker.runtime import Runtime
from worker.services.inbox.sources import Action, Found, Inbox, Outcome, open_inbox

log = logging.getLogger(__name__)

CLAIM_LEASE_S = 120.0
"""How long a claim outlives a scheduler that stopped renewing it (renewed every quarter)."""
SUBMITTED_TTL_S = 30 * 24 * 3600
"""How long Redis remembers a submitted manifest; the record in the inbox remembers it after."""


claim_key = keys.inbox_claim


@dataclass
class Pass:
    inbox: str
    outcomes: list[Outcome] = field(default_factory=list)

    def of(self, action: Action) -> list[Outcome]:
        return [o for o in self.outcomes if o.action is action]

    def describe(self) -> list[str]:
        counts = ", ".join(f"{len(self.of(a))} {a.value}" for a in Action if self.of(a))
        return [o.describe() for o in self.outcomes] + [
            f"inbox {shown(self.inbox)}: {counts or 'nothing new'}"
        ]

    def as_result(self) -> dict[str, Any]:
        return {"inbox": self.inbox, "outcomes": [asdict(o) for o in self.outcomes]}


@dataclass(frozen=True)
class Target:
    """What a pass does: where it looks, where batches write, their default provider."""

    inbox: str
    out: str
    provider: str


def scan(rt: Runtime, target: Target, *, lease_s: float = CLAIM_LEASE_S) -> Pass:
    """One pass over the inbox: submit what is new, refuse what is unusable, once each."""
    rt.provider(target.provider)  # no key for the provider: every manifest would be refused
    inbox = open_inbox(target.inbox, rt.settings)
    result = Pass(inbox.uri)
    for item in inbox.found():
        if isinstance(item, Outcome):
            result.outcomes.append(item)
            continue
        outcome = _one(rt, inbox, item, target, lease_s)
        if outcome is not None:
            result.outcomes.append(outcome)
    return result


def _one(rt: Runtime, inbox: Inbox, item: Found, target: Target, lease_s: float) -> Outcome | None:
    try:
        read = inbox.read(item)
    except PermissionError as exc:  # the file's own fault: refusing it tells someone
        return _refuse_unread(inbox, item, f"unreadable: {exc.strerror}")
    except (OSError, StorageError, ClientError, BotoCoreError) as exc:
        return _left(item, f"unreadable now: {_why(exc)}")
    if not isinstance(read, Spooled):
        return None if read is None else _left(item, read)
    try:
        return _claimed(rt, inbox, item, read, target, lease_s)
    except (RedisError, StorageError, ClientError, BotoCoreError, OSError) as exc:
        return _left(item, _why(exc))
    except Exception as exc:  # a bug must not block the manifests listed after this one
        log.exception("inbox %s: %s failed", inbox.uri, shown(item.name))
        return _left(item, _why(exc))
    finally:
        Path(read.path).unlink(missing_ok=True)


def _refuse_unread(inbox: Inbox, item: Found, reason: str) -> Outcome:
    """A manifest we may not read has no sha256, so no claim: any scheduler may record it,
    and both would write the same record."""
    try:
        inbox.record_refused(item, reason)
    except (OSError, StorageError) as exc:
        return _left(item, f"{reason}; and not recorded: {_why(exc)}")
    log.warning("inbox %s: refused %s: %s", inbox.uri, shown(item.name), reason)
    return Outcome(item.name, Action.REFUSED, reason=reason)


def _why(exc: BaseException) -> str:
    detail = getattr(exc, "message", None) or getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {shown(str(detail), 300)}"


def _claimed(
    rt: Runtime, inbox: Inbox, item: Found, spooled: Spooled, target: Target, lease_s: float
) -> Outcome | None:
    batch = default_batch_id(item.name, spooled.sha256, target.provider)
    claim = rt.state.claim(claim_key(item.name, spooled.sha256), lease_s)
    if claim is None:
        return _left(item, "its claim changed hands; trying again next pass")
    if not isinstance(claim, Claim):
        return _theirs(inbox, item, claim, batch)
    try:
        with claim.kept_alive():
            if not inbox.unrecorded(item):  # another scheduler finished it while we read
                claim.release()
                return None
            started = _start(rt, spooled, target, item, batch)
            if isinstance(started, str):
                inbox.record_refused(item, started)
                claim.release()
                log.warning(
                    "inbox %s: refused %s: %s", inbox.uri, shown(item.name), shown(started, 300)
                )
                return Outcome(item.name, Action.REFUSED, reason=started)
            record = {
                "state": "submitted",
                "batch_id": batch,
                "sha256": spooled.sha256,
                "out": target.out,
                "provider": target.provider,
                "source": item.source,
                "submitted_at": now_iso(),
                "status": f"imagebatch status {batch} --out {target.out}",
            }
            if not claim.submitted(record, SUBMITTED_TTL_S):
                log.error(
                    "inbox %s: the claim on %s lapsed while it was submitted; another scheduler "
                    "may submit it again (as the same batch %s, which resumes, not re-buys)",
                    inbox.uri,
                    shown(item.name),
                    batch,
                )
    except BaseException:
        if not claim.lost:
            claim.release()
        raise
    if started.complete:
        from worker.celery import tasks

        tasks.send_finalize(batch)
    try:
        inbox.record_submitted(item, record)
    except (OSError, StorageError) as exc:  # the claim remembers it; the next pass records it
        log.warning("inbox %s: %s submitted but not recorded: %s", inbox.uri, item.name, exc)
    return Outcome(item.name, Action.SUBMITTED, batch)


def _theirs(inbox: Inbox, item: Found, claim: dict[str, Any], batch: str) -> Outcome | None:
    """Another scheduler holds the manifest's claim: busy with it, or done (then its record
    is written here if that scheduler could not)."""
    if claim.get("state") != "submitted":
        return Outcome(item.name, Action.BUSY, claim.get("batch_id") or batch)
    if not inbox.unrecorded(item):
        return None
    inbox.record_submitted(item, {k: v for k, v in claim.items() if k != "owner"})
    return Outcome(item.name, Action.RECORDED, str(claim.get("batch_id", batch)))


def _start(rt: Runtime, spooled: Spooled, target: Target, item: Found, batch: str) -> Started | str:
    """The batch started, or why the manifest is refused (an output store that cannot be
    written is not the manifest's fault: ``StorageError``, and the manifest waits)."""
    reason = _refusal(rt, spooled, target.provider)
    if reason is not None:
        return reason
    try:
        check_writable(rt.store(target.out), target.out, batch)
    except ConfigError as exc:  # the output store's fault, not the manifest's
        raise StorageError(exc.message) from None
    try:
        return start_batch(
            rt, spooled, batch=batch, out=target.out, provider=target.provider, source=item.source
        )
    except ConfigError as exc:
        return exc.message


def _refusal(rt: Runtime, spooled: Spooled, provider: str) -> str | None:
    """Why the manifest is not worth a batch: it has no valid line at all."""
    plan = tally(file_chunks(spooled.path), rt.provider, provider)
    if plan.valid:
        return None
    if not plan.lines:
        return "no manifest lines: the file is empty, or only blank and # comment lines"
    first = "; ".join(f"line {e.line}: {e.message}" for e in plan.first_rejections[:3])
    return f"none of its {plan.lines} lines is valid ({first})"


def _left(item: Found, reason: str) -> Outcome:
    log.warning("inbox: left %s for the next pass: %s", shown(item.name), shown(reason))
    return Outcome(item.name, Action.LEFT, reason=reason)


# --- the task, the beat ----------------------------------------------------------------------


def run_inbox(inbox: str, out: str, provider: str) -> dict[str, Any]:
    """``imagebatch.inbox``: one pass, on a worker (with its own keys and endpoints)."""
    try:
        result = scan(runtime.current(), Target(inbox, out, provider))
    except ConfigError as exc:
        log.error("inbox %s: %s", shown(inbox), exc.message)
        raise
    for outcome in result.outcomes:
        log.info("inbox %s: %s", shown(inbox), outcome.describe())
    return result.as_result()


inbox_task: Any = app.task(name="imagebatch.inbox", throws=(ConfigError,))(run_inbox)
"""Registered on ``worker.app.app`` in a plain call: Celery's decorator is untyped."""


def beat_entry(cron: crontab, target: Target) -> dict[str, Any]:
    """The beat's one entry: ``imagebatch.inbox`` with the pass it runs."""
    return beat.entry("imagebatch-inbox", "imagebatch.inbox", cron, asdict(target))


def run_schedule(
    settings: CoreSettings,
    provider: str,
    *,
    once: bool = False,
    announce: Callable[[str], None] | None = None,
) -> Pass | None:
    """``imagebatch schedule``: the beat (until stopped), or with ``once`` one pass here.

    Raises:
        ConfigError: no inbox, a bad schedule, no broker, the inbox or provider unusable.
    """
    cron = beat.parse_cron(settings.schedule)
    if not settings.inbox:
        raise ConfigError("no inbox: set IMAGEBATCH_INBOX to a folder or s3://bucket/prefix")
    target = Target(open_inbox(settings.inbox, settings).uri, absolute_out(settings.out), provider)
    with launched(settings, provider, embedded_ok=False) as (rt, _):
        rt.provider(provider)
        open_inbox(target.inbox, rt.settings).check()
        if once:
            return scan(rt, target)
        if announce is not None:
            announce(
                f"schedule {settings.schedule!r} (UTC) · inbox {target.inbox} · out "
                f"{target.out} · {target.provider} · imagebatch.inbox runs on the workers"
            )
        beat.run(rt.settings, beat_entry(cron, target))
    return None
