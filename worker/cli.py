"""The ``imagebatch`` command line. It renders and calls; the logic is in the modules it calls.

Exit status: 0 every line succeeded; 1 some lines failed or were rejected; 2 usage,
configuration or infrastructure trouble found before spending (one line naming the setting
and the fix; ``--debug`` shows the traceback); 130/143 interrupted (the same command resumes).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import redis
from pydantic import ValidationError

from jobs import providers, results
from jobs.errors import ConfigError, ImagebatchError
from jobs.providers.registry import REGISTRY
from jobs.settings import PROVIDER_NAMES, CoreSettings, Settings
from jobs.sources import read_chunks
from jobs.storage import open_store
from jobs.text import shown
from worker import finish, logs, metrics, plans, status, tasks
from worker.environment import absolute_out, check_provider, environment
from worker.foreground import (
    Interrupted,
    begin,
    budget_of,
    err_console,
    header,
    interruptible,
    land,
    out_console,
    prepared,
    print_rejection,
    print_summary,
    wait,
)
from worker.start import (
    spool,
    start_batch,
)
from worker.validation import tally

if TYPE_CHECKING:
    from celery import Celery

DEBUG = {"on": False}


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"error: {message}", markup=False)
    sys.exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Configuration and infrastructure trouble ends the command with exit 2 and one line
    (after the traceback, with ``--debug``)."""
    try:
        yield
    except ConfigError as exc:
        _trace()
        fail(exc.message)
    except ValidationError as exc:
        _trace()
        error = exc.errors()[0]
        name = "IMAGEBATCH_" + "_".join(str(part) for part in error["loc"]).upper()
        fail(f"invalid setting {name}: {error['msg']}")
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        _trace()
        fail(f"lost Redis ({type(exc).__name__}): check IMAGEBATCH_BROKER_URL and that it runs")
    except ImagebatchError as exc:
        _trace()
        fail(exc.message)


def _trace() -> None:
    """``--debug``: the traceback of the error being handled, on stderr; the exit stays 2."""
    if DEBUG["on"]:
        traceback.print_exc(file=sys.stderr)


def settings_from_env() -> CoreSettings:
    settings = Settings()
    logs.configure(settings, debug=DEBUG["on"])
    return settings


def choose_provider(settings: CoreSettings, option: str | None) -> str:
    """--provider, else IMAGEBATCH_PROVIDER, else the one provider whose key is set."""
    name = option or settings.provider
    if name is not None:
        if name not in REGISTRY:
            raise ConfigError(
                f"unknown provider {shown(name)}: use one of {', '.join(providers.names())}"
            )
        return name
    keyed = [p for p in PROVIDER_NAMES if settings.provider_config(p).api_key is not None]
    if len(keyed) == 1:
        return keyed[0]
    if keyed:
        raise ConfigError(
            f"keys are set for {', '.join(keyed)}: choose one with --provider "
            "or IMAGEBATCH_PROVIDER"
        )
    raise ConfigError(
        "no provider key: set IMAGEBATCH_APIFRAME_API_KEY, "
        "or use --provider simulator to try it out"
    )


manifest_arg = click.argument("manifest")
provider_opt = click.option("--provider", help=", ".join(REGISTRY))
out_opt = click.option("--out", help="s3://bucket/prefix or a local directory [IMAGEBATCH_OUT]")
batch_opt = click.option(
    "--batch-id", help="default: the manifest's name and content, so the same command resumes"
)
strict_opt = click.option(
    "--strict", is_flag=True, help="refuse the whole manifest if any line is bad"
)
credits_opt = click.option(
    "--max-credits", type=float, help="stop submitting before this spend (the manifest's unit)"
)
usd_opt = click.option("--max-usd", type=float, help="stop submitting before this spend in USD")
debug_opt = click.option("--debug", is_flag=True, help="show tracebacks")


def _debug(value: bool) -> None:
    DEBUG["on"] = value


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=f"Providers (--provider): {', '.join(REGISTRY)}.",
)
def main() -> None:
    """Generate images in bulk through paid image APIs."""


@main.command()
@manifest_arg
@provider_opt
@out_opt
@batch_opt
@strict_opt
@credits_opt
@usd_opt
@debug_opt
def run(
    manifest: str,
    provider: str | None,
    out: str | None,
    batch_id: str | None,
    strict: bool,
    max_credits: float | None,
    max_usd: float | None,
    debug: bool,
) -> None:
    """Validate, enqueue, process and wait (embedded Redis + worker when no broker is set)."""
    _debug(debug)
    with user_errors():
        settings = settings_from_env()
        name = choose_provider(settings, provider)
        target = absolute_out(out or settings.out)
        budget = budget_of(max_credits, max_usd)
        check_provider(settings, name)
        with (
            prepared(settings, manifest, target, batch_id, provider=name, strict=strict) as ready,
            environment(settings, name, embedded_ok=True) as (rt, is_embedded),
            metrics.serving(rt),
        ):
            started = begin(rt, ready, name, strict=strict, budget=budget)
            header(rt, started, name)
            where = (
                f"embedded Redis · in-process worker (threads × {rt.settings.worker_concurrency})"
                if is_embedded
                else "broker · remote workers"
            )
            out_console.print(
                f"{where} · out → {rt.store(target).uri(started.batch)}/", markup=False
            )
            try:
                with interruptible():
                    snap = wait(rt, started.batch)
            except Interrupted as stop:
                land(rt, started.batch, target, stop.code)
    sys.exit(print_summary(snap))


@main.command()
@manifest_arg
@provider_opt
@out_opt
@batch_opt
@strict_opt
@credits_opt
@usd_opt
@debug_opt
def submit(
    manifest: str,
    provider: str | None,
    out: str | None,
    batch_id: str | None,
    strict: bool,
    max_credits: float | None,
    max_usd: float | None,
    debug: bool,
) -> None:
    """Validate and enqueue for remote workers; print the batch id and return."""
    _debug(debug)
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
            prepared(settings, manifest, target, batch_id, provider=name, strict=strict) as ready,
            environment(settings, name, embedded_ok=False) as (rt, _),
        ):
            started = begin(rt, ready, name, strict=strict, budget=budget)
    click.echo(started.batch)


def _snapshot(batch_id: str, out: str | None, settings: CoreSettings) -> status.Snapshot | None:
    """From Redis when a broker is configured and knows the batch, else from the output store."""
    if settings.broker_url or settings.redis_url:
        from worker.runtime import connect
        from worker.state import State

        state = State(connect(settings))
        try:
            snap = status.from_redis(state, batch_id)
        except (redis.ConnectionError, redis.TimeoutError):
            if not out:
                raise
            snap = None
        finally:
            state.client.close()
        if snap is not None:
            return snap

    return status.from_store(open_store(absolute_out(out or settings.out), settings), batch_id)


@main.command(name="status")
@click.argument("batch_id")
@out_opt
@click.option("--watch", is_flag=True, help="keep updating until the batch is done")
@click.option("--exit-status", is_flag=True, help="exit as run would: 0 all succeeded, 1 not")
@debug_opt
def status_command(
    batch_id: str, out: str | None, watch: bool, exit_status: bool, debug: bool
) -> None:
    """Counts by state, credits so far, ETA: from Redis while it runs, the store after."""
    _debug(debug)
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


@main.command(name="ls")
@out_opt
@debug_opt
def ls_command(out: str | None, debug: bool) -> None:
    """List the batches under an output location: id, state, counts, cost, when."""
    _debug(debug)

    with user_errors():
        settings = settings_from_env()
        store = open_store(absolute_out(out or settings.out), settings)
        for snap in status.listing(store):
            click.echo(f"{status.describe(snap)} · started {snap.started_at or '?'}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start a worker (threads pool, I/O-bound defaults); other options go to celery worker."""
    from worker import runtime
    from worker.app import QUEUE, configure

    with user_errors():
        settings = settings_from_env()
        if settings.broker_url is None:
            raise ConfigError("no broker: set IMAGEBATCH_BROKER_URL (redis://...)")
        app = configure(settings, settings.broker_url)
        runtime.configure(settings)
        logs.for_worker()
        if settings.log_format == "json":
            logs.stdout_to_log()
    # A JSON log is one object per line: no banner (celery -q) before the first record.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    argv = [
        *quiet,
        "worker",
        "--pool=threads",
        f"--concurrency={settings.worker_concurrency}",
        f"--queues={QUEUE}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
        "--task-events",
        *ctx.args,
    ]
    sys.exit(run_worker(app, argv))


def run_worker(app: Celery, argv: list[str]) -> int:
    """Run ``celery worker`` and return its exit status, as ``celery worker`` itself would:
    ``app.worker_main`` drops it, so a worker that stopped on an unrecoverable error would
    otherwise exit 0 and a supervisor with ``Restart=on-failure`` would leave it down."""
    from celery.signals import celeryd_init

    started: list[Any] = []

    def keep(sender: Any = None, instance: Any = None, **_: Any) -> None:
        started.append(instance)

    celeryd_init.connect(keep, weak=False)
    try:
        app.worker_main(argv)
    finally:
        celeryd_init.disconnect(keep)
    code = getattr(started[-1], "exitcode", None) if started else None
    return code if isinstance(code, int) else 0


@main.command()
@manifest_arg
@provider_opt
@debug_opt
def plan(manifest: str, provider: str | None, debug: bool) -> None:
    """Validate every line; print counts, estimated cost and time. Spends nothing."""
    _debug(debug)
    with user_errors():
        settings = settings_from_env()
        name = choose_provider(settings, provider)
        adapters = plans.Adapters(settings)
        result = tally(read_chunks(manifest, settings), adapters, name, print_rejection(manifest))
        known = plans.learned(settings, list(result.by_provider))
        seconds = plans.estimate_seconds(settings, result, adapters, known)
    click.echo(
        f"{result.lines} lines · {result.valid} valid · {result.rejected} rejected · "
        f"{result.images} images · est. {result.estimate.describe()} · "
        f"est. {plans.duration(seconds)}"
    )
    sys.exit(1 if result.rejected else 0)


@main.command()
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--latency", type=float, default=2.0, show_default=True, help="seconds per job")
@click.option("--faults", default="{}", help='JSON, e.g. {"error_5xx": 0.05, "seed": 1}')
@click.option("--credits", type=float, default=None, help="credit balance (402 when spent)")
@click.option("--config", "config_json", default="{}", help="JSON of any other simulator setting")
def simulate(
    port: int, host: str, latency: float, faults: str, credits: float | None, config_json: str
) -> None:
    """Serve the providers' APIs locally: APIFrame at /v2, OpenAI at /openai, AI/ML API at
    /aimlapi, Omixa at /omixa, Oxen at /oxen; the ledger at /_sim/ledger."""
    from jobs.simulator import Faults, Simulator, SimulatorConfig

    with user_errors():
        try:
            fault_config = Faults.from_mapping(json.loads(faults))
            config = SimulatorConfig.from_mapping(
                json.loads(config_json),
                SimulatorConfig(
                    host=host, port=port, latency_s=latency, faults=fault_config, credits=credits
                ),
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"--faults/--config: {exc}") from None
    with Simulator(config) as sim:
        click.echo(
            f"simulator on {sim.base_url} (APIFrame at /v2, OpenAI at /openai, "
            "AI/ML API at /aimlapi, Omixa at /omixa, Oxen at /oxen) · Ctrl-C stops"
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@main.command()
@click.argument("batch_id")
@out_opt
@click.option("--provider", help="default: the provider the batch was started with")
@debug_opt
def retry(batch_id: str, out: str | None, provider: str | None, debug: bool) -> None:
    """Run the failed lines of a batch again (stored lines are not touched): the batch's own
    archived manifest and provider, cumulative counters."""
    _debug(debug)

    with user_errors():
        settings = settings_from_env()
        target = absolute_out(out or settings.out)
        store = open_store(target, settings)
        info = results.read_json(store, results.info_key(batch_id))
        if info is None or store.sha256_of(results.manifest_key(batch_id)) is None:
            raise ConfigError(f"no batch {shown(batch_id)} under {target} (pass --out)")
        name = choose_provider(settings, provider or info.get("provider"))
        with environment(settings, name, embedded_ok=True) as (rt, _):
            spooled = spool(store.iter_chunks(results.manifest_key(batch_id)))
            try:
                started = start_batch(
                    rt,
                    spooled,
                    batch=batch_id,
                    out=target,
                    provider=name,
                    source=str(info.get("source", "")),
                )
            finally:
                Path(spooled.path).unlink(missing_ok=True)
            if started.complete:
                tasks.send_finalize(batch_id)
            click.echo(
                f"retrying {started.retrying} lines of {store.uri(results.manifest_key(batch_id))}"
            )
            try:
                with interruptible():
                    snap = wait(rt, batch_id)
            except Interrupted as stop:
                land(rt, batch_id, target, stop.code)
    sys.exit(print_summary(snap))


@main.command()
@click.argument("batch_id")
@debug_opt
def cancel(batch_id: str, debug: bool) -> None:
    """Stop new submits; jobs already paid for finish, then the batch is finalized."""
    _debug(debug)
    with user_errors(), environment(settings_from_env(), None, embedded_ok=False) as (rt, _):
        if not finish.cancel(rt, batch_id):
            fail(f"no running batch {shown(batch_id)} in Redis")
    click.echo(f"{batch_id}: cancelled; unsubmitted lines will end failed (cancelled)")


@main.command()
@click.argument("batch_id")
@out_opt
@debug_opt
def report(batch_id: str, out: str | None, debug: bool) -> None:
    """(Re)build OUT/BATCH/report.html, the contact sheet of a batch."""
    _debug(debug)
    from jobs.report import write_report
    from jobs.request import ResultRow

    with user_errors():
        settings = settings_from_env()
        store = open_store(absolute_out(out or settings.out), settings)
        summary = results.read_json(store, results.summary_key(batch_id))
        if summary is None:
            raise ConfigError(f"no finished batch {shown(batch_id)} there (pass --out)")
        rows = (ResultRow.model_validate_json(r) for _, r in results.rows_in_order(store, batch_id))
        click.echo(write_report(store, batch_id, rows, summary))


@main.command()
@click.option("--host", default=None, help="default IMAGEBATCH_WEBHOOK_HOST (127.0.0.1)")
@click.option("--port", type=int, default=None, help="default IMAGEBATCH_WEBHOOK_PORT (8787)")
@debug_opt
def webhook(host: str | None, port: int | None, debug: bool) -> None:
    """Receive APIFrame webhooks (signature checked) and advance the lines they name."""
    _debug(debug)
    from worker import webhook as receiver

    with user_errors(), environment(settings_from_env(), None, embedded_ok=False) as (rt, _):
        server = receiver.serve(
            rt, host or rt.settings.webhook_host, port or rt.settings.webhook_port
        )
        bound = f"{server.server_address[0]!s}:{server.server_address[1]}"
        click.echo(f"webhooks on http://{bound}{receiver.PATH} · Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()


@main.command()
@click.option("--worker", "of_worker", is_flag=True, help="also: a worker here sent a heartbeat")
def health(of_worker: bool) -> None:
    """Exit 0 when the state Redis answers (and, with --worker, this host's worker lives)."""
    import socket

    with user_errors():
        settings = settings_from_env()
        from worker.runtime import connect
        from worker.state import State

        state = State(connect(settings))
        try:
            state.ping()
            if of_worker and not state.worker_seen(socket.gethostname()):
                fail("no heartbeat from a worker on this host", code=1)
        finally:
            state.client.close()
    click.echo("ok")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def flower(ctx: click.Context) -> None:
    """Celery Flower on imagebatch's app and broker (``pip install 'imagebatch[flower]'``)."""
    from worker.app import app, configure

    with user_errors():
        settings = settings_from_env()
        if settings.broker_url is None:
            raise ConfigError("no broker: set IMAGEBATCH_BROKER_URL (redis://...)")
        if importlib.util.find_spec("flower") is None:
            raise ConfigError("Flower is not installed: pip install 'imagebatch[flower]'")
        configure(settings, settings.broker_url)
    app.start(["flower", *ctx.args])


@main.command()
@click.option("--once", is_flag=True, help="one pass over the inbox now, then exit (cron, tests)")
@debug_opt
def schedule(once: bool, debug: bool) -> None:
    """Run the inbox schedule (IMAGEBATCH_INBOX, IMAGEBATCH_SCHEDULE): each new manifest is
    submitted exactly once, even with two schedulers running. Exit 1 if --once refused one."""
    _debug(debug)
    from worker import inbox, inboxes

    with user_errors():
        settings = settings_from_env()
        done = inbox.run_schedule(
            settings, choose_provider(settings, None), once=once, announce=click.echo
        )
    for line in done.describe() if done else []:
        click.echo(line)
    sys.exit(1 if done and done.of(inboxes.Action.REFUSED) else 0)
