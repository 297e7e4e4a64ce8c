"""The commands of ``imagebatch`` that start a batch (``run``, ``submit``, ``retry``) or price one
(``plan``); the commands about a batch that exists are in ``worker.cli.lookup``. They render
and call; the logic is in the modules they call.

Exit status: 0 every line succeeded; 1 some lines failed or were rejected; 2 usage,
configuration or infrastructure trouble found before spending (one line naming the setting
and the fix; ``--debug`` shows the traceback); 130/143 interrupted (the same command resumes).
"""

from __future__ import annotations

import logging
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import click

from jobs.errors import ConfigError
from jobs.manifest.sources import read_chunks
from jobs.manifest.spool import spool
from jobs.output import layout, results
from jobs.settings import CoreSettings
from jobs.storage import absolute_out, open_store
from jobs.text import shown
from jobs.validate import Plan
from worker.batch import estimate, snapshot, status
from worker.batch.budget import Budget
from worker.batch.estimate import plan_batch
from worker.batch.start import Started, start_batch
from worker.celery import tasks
from worker.celery.launch import check_provider, launched
from worker.cli.follow import follow
from worker.cli.money import money_line, provider_lines
from worker.cli.options import (
    choose_provider,
    debug_opt,
    fail,
    fresh_opt,
    manifest_arg,
    out_opt,
    provider_opt,
    set_debug,
    settings_from_env,
    usd_per_image_opt,
    user_errors,
)
from worker.cli.output import notice, out_console, print_rejection
from worker.cli.session import (
    Prepared,
    begin,
    budget_of,
    header,
    new_owner,
    prepared,
    print_summary,
)
from worker.cli.start_options import StartOptions, start_options
from worker.lines.records import BatchStatus
from worker.observability import logs
from worker.runtime import Runtime


@click.command()
@start_options
def run(options: StartOptions) -> None:
    """Validate, enqueue, process and wait (embedded Redis + worker when no broker is set)."""
    from worker.observability import metrics  # the exporter only for a run that serves one

    set_debug(options.debug)
    with user_errors():
        settings, name, target, budget = _asked(options)
        check_provider(settings, name)
        with (
            _prepared(settings, options, target, name) as ready,
            launched(settings, name, embedded_ok=True) as (rt, own),
            metrics.serving(rt),
        ):
            started = _begin(rt, ready, name, options, budget, owner=new_owner())
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
@start_options
def submit(options: StartOptions) -> None:
    """Validate and enqueue for remote workers; print the batch id and return."""
    set_debug(options.debug)
    with user_errors():
        settings, name, target, budget = _asked(options)
        if settings.broker_url is None:
            raise ConfigError(
                "no broker: set IMAGEBATCH_BROKER_URL (redis://...) so remote "
                "workers can reach the batch"
            )
        check_provider(settings, name)
        with (
            _prepared(settings, options, target, name) as ready,
            launched(settings, name, embedded_ok=False) as (rt, _),
        ):
            started = _begin(rt, ready, name, options, budget)
    click.echo(started.batch)


def _asked(options: StartOptions) -> tuple[CoreSettings, str, str, Budget | None]:
    """The settings, the provider, the output and the budget a start is asked for."""
    settings = settings_from_env()
    name = choose_provider(settings, options.provider)
    target = absolute_out(options.out or settings.out)
    return settings, name, target, budget_of(options.max_credits, options.max_usd)


def _prepared(
    settings: CoreSettings, options: StartOptions, target: str, name: str
) -> AbstractContextManager[Prepared]:
    return prepared(
        settings,
        options.manifest,
        target,
        options.batch_id,
        provider=name,
        strict=options.strict,
        fresh=options.fresh,
    )


def _begin(
    rt: Runtime,
    ready: Prepared,
    name: str,
    options: StartOptions,
    budget: Budget | None,
    owner: str | None = None,
) -> Started:
    return begin(
        rt,
        ready,
        name,
        strict=options.strict,
        budget=budget,
        fresh=options.fresh,
        max_usd_per_image=options.max_usd_per_image,
        owner=owner,
    )


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
    _print_plan(settings, result, target, seconds)
    sys.exit(1 if result.rejected else 0)


def _print_plan(settings: CoreSettings, result: Plan, target: str, seconds: float) -> None:
    """``plan``'s report: the counts and the estimate, then what each provider gets."""
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
        counted = f"{lines} line" if lines == 1 else f"{lines} lines"
        click.echo(f"price unknown: {counted} of {model} (no published price; not in the est.)")


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
                    f"batch {batch_id} is running ({snapshot.describe(live)}): retry it once it "
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


COMMANDS = [run, submit, plan, retry]
