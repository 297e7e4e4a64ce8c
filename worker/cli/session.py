"""A batch run from the terminal: prepare it, start it, follow it with progress, and land
it on Ctrl-C. ``run`` and ``submit`` are these steps in different orders; the CLI renders.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from jobs.errors import ConfigError, ImagebatchError
from jobs.manifest.sources import read_chunks
from jobs.manifest.spool import Spooled, file_chunks, spool
from jobs.registry import REGISTRY
from jobs.routing import PoolRules, is_pool
from jobs.settings import CoreSettings
from jobs.storage import check_writable, open_store
from jobs.validate import tally
from worker.batch import control, estimate, finish, status
from worker.batch.budget import Budget
from worker.batch.identity import check_batch_id, default_batch
from worker.batch.start import Started, start_batch
from worker.celery import tasks
from worker.cli.money import money_line
from worker.cli.output import event, notice, out_console, print_rejection
from worker.cli.progress import Display
from worker.observability import logs
from worker.redis.connect import Unavailable
from worker.runtime import Runtime

if TYPE_CHECKING:
    from worker.celery.embedded import EmbeddedRedis

FOLLOW_S = 0.25
"""How often a run reads its batch's progress (a few Redis reads): it ends this soon after
the batch does. The display prints at its own pace."""

SETTLE_S = 0.5
"""After Ctrl-C, how long the last tasks get to write their counts once no line is in flight."""


class RedisLost(Exception):
    """Redis stopped answering for longer than ``IMAGEBATCH_REDIS_OUTAGE_S`` during ``run``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class OwnRedisGone(Exception):
    """The embedded Redis this run started has ended: nothing can bring it (and the batch's
    live state in it) back, so there is nothing to wait for."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during ``run``: stop submitting, let paid jobs land, exit 130/143."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def budget_of(max_credits: float | None, max_usd: float | None) -> Budget | None:
    if max_credits is not None and max_usd is not None:
        raise ConfigError("give --max-credits or --max-usd, not both")
    if max_usd is not None:
        return Budget(max_usd, usd=True)
    return Budget(max_credits) if max_credits is not None else None


@dataclass(frozen=True)
class Prepared:
    """What a command checks before it starts anything: the manifest read (spooled), the
    batch named, the output store written to."""

    manifest: str
    spooled: Spooled
    batch: str
    out: str


@contextmanager
def prepared(
    settings: CoreSettings,
    manifest: str,
    out: str,
    batch_id: str | None,
    *,
    provider: str,
    strict: bool = False,
    fresh: bool = False,
) -> Iterator[Prepared]:
    """Read the manifest and check the output location before Redis, the embedded worker or
    the simulator start: a missing manifest or an unwritable bucket fails in a second, with
    nothing started and nothing spent (``--strict`` refuses a bad manifest before the output
    is touched). The spooled copy is removed when the block ends."""
    spooled = spool(read_chunks(manifest, settings))
    try:
        store = open_store(out, settings)
        batch = check_batch_id(
            batch_id or default_batch(store, manifest, spooled.sha256, provider, fresh)
        )
        logs.set_batch(batch)
        if strict:
            adapters = estimate.Adapters(settings, provider)
            checked = tally(
                file_chunks(spooled.path),
                adapters,
                provider,
                print_rejection(manifest),
                check_with=adapters.checked,
                rules=PoolRules(settings.keyed(), settings.usd_rates()),
            )
            if checked.rejected:
                raise ConfigError(
                    f"--strict: {checked.rejected} of {checked.lines} lines rejected; "
                    "nothing was submitted"
                )
        check_writable(store, out, batch)
        yield Prepared(manifest, spooled, batch, out)
    finally:
        Path(spooled.path).unlink(missing_ok=True)


def begin(
    rt: Runtime,
    ready: Prepared,
    provider: str,
    *,
    strict: bool,
    budget: Budget | None,
    fresh: bool = False,
    max_usd_per_image: float | None = None,
    owner: str | None = None,
) -> Started:
    """Validate and start the batch (printing rejections); nothing is spent on error.
    ``owner``: this process's token, when it runs the batch and its Ctrl-C may interrupt it."""
    if not is_pool(provider):
        rt.provider(provider)
    started = start_batch(
        rt,
        ready.spooled,
        batch=ready.batch,
        out=ready.out,
        provider=provider,
        source=ready.manifest,
        strict=strict,
        budget=budget,
        fresh=fresh,
        on_line=print_rejection(ready.manifest),
        max_usd_per_image=max_usd_per_image,
        owner=owner,
    )
    if started.complete:
        tasks.send_finalize(started.batch)
    return started


def header(rt: Runtime, started: Started, provider: str) -> None:
    plan = started.plan
    what = (
        f"pool {provider}"
        if is_pool(provider)
        else f"{provider} ({REGISTRY[provider].description})"
    )
    text = (
        f"batch {started.batch} · {plan.lines} lines ({plan.valid} valid, {plan.rejected} "
        f"rejected) · {what} · est. {money_line(plan, rt.settings.usd_rates())}"
    )
    out_console.print(text, markup=False)
    event(
        text,
        event="started",
        lines=plan.lines,
        valid=plan.valid,
        rejected=plan.rejected,
        provider=provider,
        estimate=dict(plan.estimate.by_currency),
        attached=started.attached,
    )
    for note in estimate.group_notes(rt.settings, plan):
        out_console.print(note, markup=False)
    if started.adopted:
        out_console.print(
            f"resuming: {started.adopted} lines are in provider jobs already running (an OpenAI "
            "batch): found again, not bought again",
            markup=False,
        )
    if started.attached:
        out_console.print("already running: following it", markup=False)
    elif started.carried or started.retrying:
        out_console.print(
            f"resuming: {started.carried} lines already stored, {started.retrying} to retry",
            markup=False,
        )
    if started.reused:
        out_console.print(
            f"reusing: {started.reused} lines already bought under this --out (not bought "
            "again; --fresh buys them anyway)",
            markup=False,
        )


def wait(rt: Runtime, batch: str, own: EmbeddedRedis | None = None) -> status.Snapshot:
    """Block until the batch is finalized, showing progress the way the output can take it.
    ``own``: the embedded Redis this run started, whose end is noticed at once."""
    display = Display(out_console, rt.settings.progress_interval_s)
    lost_since: float | None = None
    with display:
        while True:
            if own is not None and (how := own.gone()):
                raise OwnRedisGone(how)
            try:
                snap = status.from_redis(rt.state, batch)
                lost_since = None
            except Unavailable:
                if own is not None and (how := own.gone()):
                    raise OwnRedisGone(how) from None
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > rt.settings.redis_outage_s:
                    raise RedisLost(time.monotonic() - lost_since) from None
                time.sleep(1.0)
                continue
            if snap is None:
                raise ImagebatchError(
                    f"batch {batch} vanished from Redis (was it flushed?); "
                    "run the same command again to resume"
                )
            display.update(snap)
            if snap.finished:
                return snap
            time.sleep(FOLLOW_S)


def print_summary(snap: status.Snapshot) -> int:
    summary = snap.summary or {}
    text = (
        f"done · {snap.succeeded} succeeded · {snap.failed} failed · {snap.rejected} rejected · "
        f"{snap.money.describe()} · {summary.get('results_uri')}"
    )
    out_console.print(text, markup=False)
    event(
        text,
        event="finished",
        succeeded=snap.succeeded,
        failed=snap.failed,
        rejected=snap.rejected,
        cost=dict(snap.money.by_currency),
        results_uri=summary.get("results_uri"),
        stop_reason=summary.get("stop_reason"),
    )
    if summary.get("ambiguous_submits"):
        notice(
            f"{summary['ambiguous_submits']} submits may have been billed twice (connection "
            "lost after sending)",
            event="ambiguous_submits",
            level=logging.WARNING,
            prefix="warning: ",
            ambiguous_submits=summary["ambiguous_submits"],
        )
    if summary.get("stop_reason") == "auth":
        names = sorted(summary.get("by_provider") or {}) or ["<name>"]
        settings = " or ".join(f"IMAGEBATCH_{name.upper()}_API_KEY" for name in names)
        notice(
            f"the provider refused the key, and the lines not yet sent were not sent: set "
            f"the account's key in {settings}; the same command runs them",
            event="key_refused",
            level=logging.ERROR,
            prefix="stopped: ",
        )
    return snap.exit_code()


def new_owner() -> str:
    """The token a ``run`` (or ``retry``) records as the owner of the batch it runs."""
    return uuid.uuid4().hex


def follow(
    rt: Runtime, batch: str, out: str, owner: str | None, own: EmbeddedRedis | None = None
) -> status.Snapshot:
    """Wait for the batch as its user watches: Ctrl-C lands it when this process owns its
    run (``owner``), else only stops following it; a Redis gone for too long (or this run's
    own embedded Redis gone at all) stops the command with the one that resumes it."""
    try:
        with interruptible():
            return wait(rt, batch, own)
    except Interrupted as stop:
        if owner is not None and control.interrupt(rt, batch, owner):
            land(rt, batch, out, stop.code)
        notice(
            f"stopped following batch {batch}; it goes on, run by the process that started it "
            f"(`imagebatch status {batch} --watch` follows it, `imagebatch cancel {batch}` "
            "stops it)",
            event="unfollowed",
        )
        sys.exit(stop.code)
    except OwnRedisGone as gone:
        raise ConfigError(
            f"the embedded Redis this run started has stopped ({gone.how}); the images and "
            f"rows stored so far are kept: resume with: {resume_command(sys.argv, batch, out)}"
        ) from None
    except RedisLost as lost:
        which = "the embedded Redis" if own is not None else "Redis (IMAGEBATCH_BROKER_URL)"
        raise ConfigError(
            f"{which} has not answered for {lost.seconds:.0f}s (IMAGEBATCH_REDIS_OUTAGE_S); "
            "nothing is lost: when it is back, resume with: "
            f"{resume_command(sys.argv, batch, out)}"
        ) from None


def resume_command(argv: list[str], batch: str, out: str) -> str:
    """The command that resumes the batch, as the user can type it: the same ``run`` or
    ``submit`` (with the batch id), or ``retry BATCH --out OUT`` (a manifest read from stdin
    is archived, and ``retry`` takes no --batch-id)."""
    words = argv[1:]
    if not words or words[0] not in ("run", "submit") or "-" in words:
        return shlex.join(["imagebatch", "retry", batch, "--out", out])
    if not any(word == "--batch-id" or word.startswith("--batch-id=") for word in words):
        words += ["--batch-id", batch]
    return shlex.join(["imagebatch", *words])


def land(rt: Runtime, batch: str, out: str, code: int) -> NoReturn:
    """After Ctrl-C of the run that owns the batch (it is interrupted now): no new submits;
    wait (up to the grace period) for paid jobs to land."""
    grace = rt.settings.interrupt_grace_s
    notice(
        f"interrupted: no new submits; waiting up to {grace:.0f}s for paid jobs to land "
        "(Ctrl-C again to stop now)",
        event="interrupted",
    )
    deadline = time.monotonic() + grace
    try:
        while time.monotonic() < deadline and control.in_flight(rt, batch):
            time.sleep(0.5)
        # A task writes its counts just after its last line lands: let it, so that the flush
        # saves them for the run that resumes (the summary adds up what every run paid for).
        time.sleep(SETTLE_S)
        finish.flush(rt, batch)
    except KeyboardInterrupt:
        pass
    left = len(control.in_flight(rt, batch))
    note = f" ({left} jobs in flight will be picked up again)" if left else ""
    jobs = control.open_jobs(rt, batch)
    if jobs:
        notice(
            f"still running at the provider, paid as they finish: {', '.join(jobs)}; "
            "the same command picks them up and stores what they made",
            event="jobs_running",
            jobs=jobs,
        )
    command = resume_command(sys.argv, batch, out)
    notice(f"stopped{note}; resume with: {command}", event="stopped", resume=command)
    sys.exit(code)


@contextmanager
def interruptible() -> Iterator[None]:
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
