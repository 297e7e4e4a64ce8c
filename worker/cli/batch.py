"""The batch commands of ``imagebatch``: run, submit, status, ls, plan, retry, cancel, report.
They render and call; the logic is in the modules they call.

Exit status: 0 every line succeeded; 1 some lines failed or were rejected; 2 usage,
configuration or infrastructure trouble found before spending (one line naming the setting
and the fix; ``--debug`` shows the traceback); 130/143 interrupted (the same command resumes).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from jobs.errors import ConfigError
from jobs.manifest.sources import read_chunks
from jobs.manifest.spool import spool
from jobs.output import layout, report, results
from jobs.settings import CoreSettings
from jobs.storage import absolute_out, open_store
from jobs.text import shown
from worker.batch import control, estimate, status
from worker.batch.estimate import plan_batch
from worker.batch.start import start_batch
from worker.celery import tasks
from worker.celery.launch import check_provider, launched
from worker.cli.money import money_line, provider_lines
from worker.cli.options import (
    batch_opt,
    choose_provider,
    credits_opt,
    debug_opt,
    fail,
    fresh_opt,
    manifest_arg,
    out_opt,
    provider_opt,
    set_debug,
    settings_from_env,
    strict_opt,
    usd_opt,
    usd_per_image_opt,
    user_errors,
)
from worker.cli.output import notice, out_console, print_rejection
from worker.cli.progress import Display
from worker.cli.session import (
    begin,
    budget_of,
    follow,
    header,
    new_owner,
    prepared,
    print_summary,
)
from worker.lines.records import BatchStatus
from worker.observability import logs
from worker.redis.connect import Unavailable, connect
from worker.redis.state import State


@click.command()
@manifest_arg
@provider_opt
@out_opt
@batch_opt
@strict_opt
@credits_opt
@usd_opt
@usd_per_image_opt
@fresh_opt
@debug_opt
def run(
    manifest: str,
    provider: str | None,
    out: str | None,
    batch_id: str | None,
    strict: bool,
    max_credits: float | None,
    max_usd: float | None,
    max_usd_per_image: float | None,
    fresh: bool,
    debug: bool,
) -> None:
    """Validate, enqueue, process and wait (embedded Redis + worker when no broker is set)."""
    from worker.observability import metrics  # the exporter only for a run that serves one

    set_debug(debug)
    with user_errors():
        settings = settings_from_env()
        name = choose_provider(settings, provider)
        target = absolute_out(out or settings.out)
        budget = budget_of(max_credits, max_usd)
        check_provider(settings, name)
        with (
            prepared(
                settings, manifest, target, batch_id, provider=name, strict=strict, fresh=fresh
            ) as ready,
            launched(settings, name, embedded_ok=True) as (rt, own),
            metrics.serving(rt),
        ):
            started = begin(
                rt,
                ready,
                name,
                strict=strict,
                budget=budget,
                fresh=fresh,
                max_usd_per_image=max_usd_per_image,
                owner=new_owner(),
            )
            header(rt, started, name)
            where = (
                f"embedded Redis · in-process worker (threads × {rt.settings.worker_concurrency})"
                if own is not None
                else "broker · remote workers"
            )
            out_console.print(
                f"{where} · out → {rt.store(target).uri(started.batch)}/", markup=False
            )
            snap = follow(rt, started.batch, target, started.owner, own)
    sys.exit(print_summary(snap))


@click.command()
@manifest_arg
@provider_opt
@out_opt
@batch_opt
@strict_opt
@credits_opt
@usd_opt
@usd_per_image_opt
@fresh_opt
@debug_opt
def submit(
    manifest: str,
    provider: str | None,
    out: str | None,
    batch_id: str | None,
    strict: bool,
    max_credits: float | None,
    max_usd: float | None,
    max_usd_per_image: float | None,
    fresh: bool,
    debug: bool,
) -> None:
    """Validate and enqueue for remote workers; print the batch id and return."""
    set_debug(debug)
    with user_errors():
        settings = settings_from_env()
        name = choose_provider(settings, provider)
        target = absolute_out(out or settings.out)
        budget = budget_of(max_credits, max_usd)
        if settings.broker_url is None:
            raise ConfigError(
                "no broker: set IMAGEBATCH_BROKER_URL (redis://...) so remote "
                "workers can reach the batch"
            )
        check_provider(settings, name)
        with (
            prepared(
                settings, manifest, target, batch_id, provider=name, strict=strict, fresh=fresh
            ) as ready,
            launched(settings, name, embedded_ok=False) as (rt, _),
        ):
            started = begin(
                rt,
                ready,
                name,
                strict=strict,
                budget=budget,
                fresh=fresh,
                max_usd_per_image=max_usd_per_image,
            )
    click.echo(started.batch)


def _snapshot(
    batch_id: str, out: str | None, settings: CoreSettings, *, ride_out: bool = False
) -> status.Snapshot | None:
    """From Redis when a broker is configured and knows the batch, else from the output store.
    A Redis that does not answer sends the question to the store, unless ``ride_out`` (a
    watch: the store is not live) or there is no --out to look in: then ``Unavailable``."""
    if settings.broker_url or settings.redis_url:
        state = State(connect(settings))
        try:
            snap = status.from_redis(state, batch_id)
        except Unavailable:
            if ride_out or not out:
                raise
            snap = None
        finally:
            state.close()
        if snap is not None:
            return snap

    return status.from_store(open_store(absolute_out(out or settings.out), settings), batch_id)


WATCH_S = 2.0
"""How often ``status --watch`` reads the batch."""


def _watched(batch_id: str, out: str | None, settings: CoreSettings) -> status.Snapshot:
    """The batch's next snapshot for a watch, riding out a Redis that stops answering for up
    to IMAGEBATCH_REDIS_OUTAGE_S, as workers and ``run`` do (a blip is not the batch's end)."""
    lost_since: float | None = None
    while True:
        try:
            snap = _snapshot(batch_id, out, settings, ride_out=True)
        except Unavailable as exc:
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                notice(
                    f"Redis is not answering ({type(exc).__name__}); waiting up to "
                    f"{settings.redis_outage_s:.0f}s for it (IMAGEBATCH_REDIS_OUTAGE_S)",
                    event="redis_unavailable",
                    level=logging.WARNING,
                    prefix="warning: ",
                )
            elif now - lost_since > settings.redis_outage_s:
                raise ConfigError(
                    f"Redis has not answered for {now - lost_since:.0f}s: check "
                    "IMAGEBATCH_BROKER_URL and that it runs (IMAGEBATCH_REDIS_OUTAGE_S)"
                ) from None
            time.sleep(1.0)
            continue
        if lost_since is not None:
            notice("Redis answers again", event="redis_available", prefix="note: ")
        if snap is None:
            where = absolute_out(out or settings.out)
            fail(f"no batch {shown(batch_id)} in Redis or under {where} (pass --out)")
        return snap


def _watch(batch_id: str, out: str | None, settings: CoreSettings) -> status.Snapshot:
    """Follow the batch until it ends: its line now, then progress as ``run`` shows it (a bar
    on a terminal; piped, a record every IMAGEBATCH_PROGRESS_INTERVAL_S and at each 10 %),
    then its line at the end."""

    def ended(snap: status.Snapshot) -> bool:
        return snap.finished or snap.status in ("stopped", "interrupted")

    snap = _watched(batch_id, out, settings)
    click.echo(status.describe(snap))
    if ended(snap):
        return snap
    with Display(out_console, settings.progress_interval_s) as display:
        while True:
            time.sleep(WATCH_S)
            snap = _watched(batch_id, out, settings)
            if ended(snap):
                break
            display.update(snap)
    click.echo(status.describe(snap))
    return snap


@click.command(name="status")
@click.argument("batch_id")
@out_opt
@click.option("--watch", is_flag=True, help="keep updating until the batch is done")
@click.option("--exit-status", is_flag=True, help="exit as run would: 0 all succeeded, 1 not")
@debug_opt
def status_command(
    batch_id: str, out: str | None, watch: bool, exit_status: bool, debug: bool
) -> None:
    """Counts by state, credits so far, ETA: from Redis while it runs, the store after."""
    set_debug(debug)
    with user_errors():
        settings = settings_from_env()
        logs.set_batch(batch_id)
        snap = _watch(batch_id, out, settings) if watch else _found(batch_id, out, settings)
        if not watch:
            click.echo(status.describe(snap))
    if exit_status:
        sys.exit(snap.exit_code() if snap.finished else 1)


@click.command(name="ls")
@out_opt
@debug_opt
def ls_command(out: str | None, debug: bool) -> None:
    """List the batches under an output location: id, state, counts, cost, when."""
    set_debug(debug)

    with user_errors():
        settings = settings_from_env()
        store = open_store(absolute_out(out or settings.out), settings)
        for snap in status.listing(store):
            click.echo(f"{status.describe(snap)} · started {snap.started_at or '?'}")


@click.command()
@manifest_arg
@provider_opt
@out_opt
@usd_per_image_opt
@fresh_opt
@debug_opt
def plan(
    manifest: str,
    provider: str | None,
    out: str | None,
    max_usd_per_image: float | None,
    fresh: bool,
    debug: bool,
) -> None:
    """Validate every line as run does; print counts, the lines already bought under --out
    (reused, not bought again), and what the rest will cost and take. Spends nothing."""
    set_debug(debug)
    with user_errors():
        settings = settings_from_env()
        name = choose_provider(settings, provider)
        target = absolute_out(out or settings.out)
        spooled = spool(read_chunks(manifest, settings))
        try:
            result = plan_batch(
                settings,
                spooled,
                name,
                out=target,
                fresh=fresh,
                on_line=print_rejection(manifest),
                max_usd_per_image=max_usd_per_image,
            )
        finally:
            Path(spooled.path).unlink(missing_ok=True)
        adapters = estimate.Adapters(settings)
        known = estimate.learned(settings, sorted(result.providers))
        try:
            check_provider(settings, name, key=False)  # plan sends nothing anywhere
        except ConfigError as exc:
            notice(
                f"run will refuse to start: {exc.message}",
                event="warning",
                level=logging.WARNING,
                prefix="note: ",
            )
        seconds = estimate.estimate_seconds(settings, result, adapters, known)
    reused = f"{result.reused} reused from {target} · " if result.reused else ""
    rates = settings.usd_rates()
    notes = estimate.group_notes(settings, result)
    only_groups = len(notes) == len(result.by_provider) and bool(notes)
    took = estimate.duration(seconds)
    if only_groups:
        window = max(settings.provider_spec(name).group_window_s for name in result.by_provider)
        took = f"within {estimate.duration(window).replace('h00m', ' h')}"
    click.echo(
        f"{result.lines} lines · {result.valid} valid · {result.rejected} rejected · "
        f"{result.images} images · {reused}est. {money_line(result, rates)} · "
        f"est. {took}"
    )
    for note in notes:
        click.echo(note)
    if len(result.by_provider) > 1 or result.pooled:
        for line in provider_lines(result, rates):
            click.echo(line)
    for model, lines in sorted(result.unpriced.items()):
        click.echo(f"price unknown: {lines} lines of {model} (no published price; not in the est.)")
    sys.exit(1 if result.rejected else 0)


@click.command()
@click.argument("batch_id")
@out_opt
@click.option(
    "--provider", help="the provider the batch was started with (the default; another is refused)"
)
@debug_opt
def retry(batch_id: str, out: str | None, provider: str | None, debug: bool) -> None:
    """Run the failed lines of a batch again (stored lines are not touched): the batch's own
    archived manifest and provider, cumulative counters."""
    set_debug(debug)

    with user_errors():
        settings = settings_from_env()
        logs.set_batch(batch_id)
        target = absolute_out(out or settings.out)
        store = open_store(target, settings)
        info = results.read_json(store, layout.info_key(batch_id))
        if info is None or store.sha256_of(layout.manifest_key(batch_id)) is None:
            raise ConfigError(f"no batch {shown(batch_id)} under {target} (pass --out)")
        name = choose_provider(settings, provider or info.get("provider"))
        check_provider(settings, name)
        with launched(settings, name, embedded_ok=True) as (rt, own):
            live = status.from_redis(rt.state, batch_id)
            if live is not None and not live.finished and live.status != BatchStatus.INTERRUPTED:
                fail(
                    f"batch {batch_id} is running ({status.describe(live)}): retry it once it "
                    f"has finished; `imagebatch status {batch_id} --watch` follows it"
                )
            spooled = spool(store.iter_chunks(layout.manifest_key(batch_id)))
            try:
                started = start_batch(
                    rt,
                    spooled,
                    batch=batch_id,
                    out=target,
                    provider=name,
                    source=str(info.get("source", "")),
                    fresh=bool(info.get("fresh")),
                    owner=new_owner(),
                    max_usd_per_image=float(most)
                    if (most := info.get("max_usd_per_image"))
                    else None,
                )
            finally:
                Path(spooled.path).unlink(missing_ok=True)
            if started.complete:
                tasks.send_finalize(batch_id)
            click.echo(
                f"retrying {started.retrying} lines of {store.uri(layout.manifest_key(batch_id))}"
            )
            snap = follow(rt, batch_id, target, started.owner, own)
    sys.exit(print_summary(snap))


@click.command()
@click.argument("batch_id")
@out_opt
@debug_opt
def cancel(batch_id: str, out: str | None, debug: bool) -> None:
    """Stop new submits; jobs already paid for finish, then the batch is finalized."""
    set_debug(debug)
    with user_errors():
        settings = settings_from_env()
        if settings.broker_url is not None:
            with launched(settings, None, embedded_ok=False) as (rt, _):
                if control.cancel(rt, batch_id):
                    click.echo(
                        f"{batch_id}: cancelled; unsubmitted lines will end failed (cancelled)"
                    )
                    return
        snap = _found(batch_id, out, settings)
        if snap.finished:
            click.echo(f"{status.describe(snap)} · already finished: nothing to cancel")
            return
        if snap.running:
            where = (
                "in an embedded `imagebatch run`"
                if settings.broker_url is None
                else ("but not on this broker (an embedded `imagebatch run` runs it)")
            )
            fail(
                f"batch {batch_id} is still running ({snap.progress()}) {where}: stop it with "
                "Ctrl-C where it runs; the same command resumes it"
            )
        fail(
            f"batch {batch_id} is not running ({snap.status} · {snap.progress()}): nothing to "
            f"cancel; `imagebatch retry {batch_id}` or the command that started it resumes it"
        )


def _found(batch_id: str, out: str | None, settings: CoreSettings) -> status.Snapshot:
    """The batch as Redis or the output store knows it; exit 2 saying where it was looked for."""
    snap = _snapshot(batch_id, out, settings)
    if snap is None:
        where = absolute_out(out or settings.out)
        fail(f"no batch {shown(batch_id)} in Redis or under {where} (pass --out)")
    return snap


@click.command(name="report")
@click.argument("batch_id")
@out_opt
@debug_opt
def report_command(batch_id: str, out: str | None, debug: bool) -> None:
    """(Re)build OUT/BATCH/report.html, the contact sheet of a batch."""
    set_debug(debug)
    with user_errors():
        settings = settings_from_env()
        store = open_store(absolute_out(out or settings.out), settings)
        summary = results.read_json(store, layout.summary_key(batch_id))
        if summary is None:
            snap = _found(batch_id, out, settings)
            if snap.running:
                fail(
                    f"batch {batch_id} is still running ({snap.progress()}): its report is "
                    "written when it finishes"
                )
            fail(
                f"batch {batch_id} has not finished ({snap.status} · {snap.progress()}): its "
                f"report is written when it does (`imagebatch retry {batch_id}` or the command "
                "that started it resumes it)"
            )
        click.echo(report.rebuild(store, batch_id, summary, previews=settings.report_previews))


COMMANDS = [run, submit, status_command, ls_command, plan, retry, cancel, report_command]
