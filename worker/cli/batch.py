"""The batch commands of ``imagebatch``: run, submit, status, ls, plan, retry, cancel, report.
They render and call; the logic is in the modules they call.

Exit status: 0 every line succeeded; 1 some lines failed or were rejected; 2 usage,
configuration or infrastructure trouble found before spending (one line naming the setting
and the fix; ``--debug`` shows the traceback); 130/143 interrupted (the same command resumes).
"""

from __future__ import annotations

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
from worker.batch.start import plan_batch, start_batch
from worker.celery import tasks
from worker.celery.launch import check_provider, launched
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
    user_errors,
)
from worker.cli.session import (
    begin,
    budget_of,
    err_console,
    follow,
    header,
    out_console,
    prepared,
    print_rejection,
    print_summary,
)


@click.command()
@manifest_arg
@provider_opt
@out_opt
@batch_opt
@strict_opt
@credits_opt
@usd_opt
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
            launched(settings, name, embedded_ok=True) as (rt, is_embedded),
            metrics.serving(rt),
        ):
            started = begin(rt, ready, name, strict=strict, budget=budget, fresh=fresh)
            header(rt, started, name)
            where = (
                f"embedded Redis · in-process worker (threads × {rt.settings.worker_concurrency})"
                if is_embedded
                else "broker · remote workers"
            )
            out_console.print(
                f"{where} · out → {rt.store(target).uri(started.batch)}/", markup=False
            )
            snap = follow(rt, started.batch, target)
    sys.exit(print_summary(snap))


@click.command()
@manifest_arg
@provider_opt
@out_opt
@batch_opt
@strict_opt
@credits_opt
@usd_opt
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
            started = begin(rt, ready, name, strict=strict, budget=budget, fresh=fresh)
    click.echo(started.batch)


def _snapshot(batch_id: str, out: str | None, settings: CoreSettings) -> status.Snapshot | None:
    """From Redis when a broker is configured and knows the batch, else from the output store."""
    if settings.broker_url or settings.redis_url:
        from worker.redis.connect import Unavailable, connect
        from worker.redis.state import State

        state = State(connect(settings))
        try:
            snap = status.from_redis(state, batch_id)
        except Unavailable:
            if not out:
                raise
            snap = None
        finally:
            state.close()
        if snap is not None:
            return snap

    return status.from_store(open_store(absolute_out(out or settings.out), settings), batch_id)


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
        while True:
            snap = _snapshot(batch_id, out, settings)
            if snap is None:
                where = absolute_out(out or settings.out)
                fail(f"no batch {shown(batch_id)} in Redis or under {where} (pass --out)")
            click.echo(status.describe(snap))
            if not watch or snap.finished or snap.status in ("stopped", "interrupted"):
                break
            time.sleep(2)
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
@fresh_opt
@debug_opt
def plan(manifest: str, provider: str | None, out: str | None, fresh: bool, debug: bool) -> None:
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
                settings, spooled, name, out=target, fresh=fresh, on_line=print_rejection(manifest)
            )
        finally:
            Path(spooled.path).unlink(missing_ok=True)
        adapters = estimate.Adapters(settings)
        known = estimate.learned(settings, list(result.by_provider))
        try:
            check_provider(settings, name)
        except ConfigError as exc:
            err_console.print(f"note: run will refuse to start: {exc.message}", markup=False)
        seconds = estimate.estimate_seconds(settings, result, adapters, known)
    reused = f"{result.reused} reused from {target} · " if result.reused else ""
    notes = estimate.group_notes(settings, result)
    only_groups = len(notes) == len(result.by_provider) and bool(notes)
    took = estimate.duration(seconds)
    if only_groups:
        window = max(settings.provider_spec(name).group_window_s for name in result.by_provider)
        took = f"within {estimate.duration(window).replace('h00m', ' h')}"
    click.echo(
        f"{result.lines} lines · {result.valid} valid · {result.rejected} rejected · "
        f"{result.images} images · {reused}est. {result.estimate.describe()} · "
        f"est. {took}"
    )
    for note in notes:
        click.echo(note)
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
        target = absolute_out(out or settings.out)
        store = open_store(target, settings)
        info = results.read_json(store, layout.info_key(batch_id))
        if info is None or store.sha256_of(layout.manifest_key(batch_id)) is None:
            raise ConfigError(f"no batch {shown(batch_id)} under {target} (pass --out)")
        name = choose_provider(settings, provider or info.get("provider"))
        with launched(settings, name, embedded_ok=True) as (rt, _):
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
                )
            finally:
                Path(spooled.path).unlink(missing_ok=True)
            if started.complete:
                tasks.send_finalize(batch_id)
            click.echo(
                f"retrying {started.retrying} lines of {store.uri(layout.manifest_key(batch_id))}"
            )
            snap = follow(rt, batch_id, target)
    sys.exit(print_summary(snap))


@click.command()
@click.argument("batch_id")
@debug_opt
def cancel(batch_id: str, debug: bool) -> None:
    """Stop new submits; jobs already paid for finish, then the batch is finalized."""
    set_debug(debug)
    with user_errors(), launched(settings_from_env(), None, embedded_ok=False) as (rt, _):
        if not control.cancel(rt, batch_id):
            fail(f"no running batch {shown(batch_id)} in Redis")
    click.echo(f"{batch_id}: cancelled; unsubmitted lines will end failed (cancelled)")


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
            raise ConfigError(f"no finished batch {shown(batch_id)} there (pass --out)")
        click.echo(report.rebuild(store, batch_id, summary, previews=settings.report_previews))


COMMANDS = [run, submit, status_command, ls_command, plan, retry, cancel, report_command]
