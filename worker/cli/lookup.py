"""The commands about a batch that exists: ``status`` (once, or ``--watch``), ``ls``,
``cancel`` and ``report``. Each looks the batch up in Redis while it runs (a broker set) and in
the output store after (``.state/batch.json``, ``summary.json``), and says where it looked
when it is found in neither.
"""

from __future__ import annotations

import logging
import sys
import time

import click

from jobs.errors import ConfigError
from jobs.output import layout, report, results
from jobs.settings import CoreSettings
from jobs.storage import absolute_out, open_store
from jobs.text import shown
from worker.batch import control, snapshot, status
from worker.celery.launch import launched
from worker.cli.options import debug_opt, fail, out_opt, set_debug, settings_from_env, user_errors
from worker.cli.output import notice, out_console
from worker.cli.progress import Display
from worker.observability import logs
from worker.redis.connect import Unavailable, connect
from worker.redis.state import State


def _snapshot(
    batch_id: str, out: str | None, settings: CoreSettings, *, ride_out: bool = False
) -> snapshot.Snapshot | None:
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


def _watched(batch_id: str, out: str | None, settings: CoreSettings) -> snapshot.Snapshot:
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


def _watch(batch_id: str, out: str | None, settings: CoreSettings) -> snapshot.Snapshot:
    """Follow the batch until it ends: its line now, then progress as ``run`` shows it (a bar
    on a terminal; piped, a record every IMAGEBATCH_PROGRESS_INTERVAL_S and at each 10 %),
    then its line at the end."""

    def ended(snap: snapshot.Snapshot) -> bool:
        return snap.finished or snap.status in ("stopped", "interrupted")

    snap = _watched(batch_id, out, settings)
    click.echo(snapshot.describe(snap))
    if ended(snap):
        return snap
    with Display(out_console, settings.progress_interval_s) as display:
        while True:
            time.sleep(WATCH_S)
            snap = _watched(batch_id, out, settings)
            if ended(snap):
                break
            display.update(snap)
    click.echo(snapshot.describe(snap))
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
            click.echo(snapshot.describe(snap))
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
            click.echo(f"{snapshot.describe(snap)} · started {snap.started_at or '?'}")


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
            click.echo(f"{snapshot.describe(snap)} · already finished: nothing to cancel")
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


def _found(batch_id: str, out: str | None, settings: CoreSettings) -> snapshot.Snapshot:
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


COMMANDS = [status_command, ls_command, cancel, report_command]
