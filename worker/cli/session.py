"""A batch started from the terminal: prepare it (the manifest read, the batch named, the
output checked), start it (rejections printed as they are found), say what was started and,
at the end, what it came to. ``run`` then follows it (``worker.cli.follow``); ``submit``
returns. The CLI renders.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobs.errors import ConfigError
from jobs.manifest.sources import read_chunks
from jobs.manifest.spool import Spooled, file_chunks, spool
from jobs.registry import REGISTRY
from jobs.routing import PoolRules, is_pool
from jobs.settings import CoreSettings
from jobs.storage import check_writable, open_store
from jobs.validate import tally
from worker.batch import estimate, snapshot
from worker.batch.budget import Budget
from worker.batch.identity import check_batch_id, default_batch
from worker.batch.start import Started, start_batch
from worker.celery import tasks
from worker.cli.money import money_line
from worker.cli.output import event, notice, out_console, print_rejection
from worker.observability import logs
from worker.runtime import Runtime


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


def print_summary(snap: snapshot.Snapshot) -> int:
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
