"""The long-running ``imagebatch`` services: a worker, the simulator, the webhook receiver,
the health probe, Flower and the inbox schedule. Each starts, serves until stopped, and
exits with the status its supervisor should see."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import click

from jobs.errors import ConfigError
from jobs.settings import WEBHOOK_PATH
from worker.celery.launch import launched
from worker.cli.options import (
    choose_provider,
    debug_opt,
    fail,
    set_debug,
    settings_from_env,
    user_errors,
)
from worker.observability import logs
from worker.redis.connect import broker_url


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start a worker (threads pool, I/O-bound defaults); other options go to celery worker."""
    from worker import runtime
    from worker.celery import bootstep
    from worker.celery.app import configure, run_worker

    with user_errors():
        settings = settings_from_env()
        bootstep.install(configure(settings, broker_url(settings)))
        runtime.configure(settings)
        logs.for_worker()
        if settings.log_format == "json":
            logs.stdout_to_log()
    sys.exit(run_worker(settings, ctx.args))


@click.command()
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


@click.command()
@click.option("--host", default=None, help="default IMAGEBATCH_WEBHOOK_HOST (127.0.0.1)")
@click.option("--port", type=int, default=None, help="default IMAGEBATCH_WEBHOOK_PORT (8787)")
@debug_opt
def webhook(host: str | None, port: int | None, debug: bool) -> None:
    """Receive APIFrame webhooks (signature checked) and advance the lines they name."""
    set_debug(debug)
    from worker.services import webhook as receiver

    with user_errors(), launched(settings_from_env(), None, embedded_ok=False) as (rt, _):
        server = receiver.serve(
            rt, host or rt.settings.webhook_host, port or rt.settings.webhook_port
        )
        bound = f"{server.server_address[0]!s}:{server.server_address[1]}"
        click.echo(f"webhooks on http://{bound}{WEBHOOK_PATH} · Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()


@click.command()
@click.option("--worker", "of_worker", is_flag=True, help="also: a worker here sent a heartbeat")
def health(of_worker: bool) -> None:
    """Exit 0 when the state Redis answers (and, with --worker, this host's worker lives)."""
    import socket

    with user_errors():
        settings = settings_from_env()
        from worker.redis.connect import connect
        from worker.redis.state import State

        state = State(connect(settings))
        try:
            state.ping()
            if of_worker and not state.worker_seen(socket.gethostname()):
                fail("no heartbeat from a worker on this host", code=1)
        finally:
            state.close()
    click.echo("ok")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def flower(ctx: click.Context) -> None:
    """Celery Flower on imagebatch's app and broker (``pip install 'imagebatch[flower]'``)."""
    from worker.celery.app import app, configure

    with user_errors():
        settings = settings_from_env()
        broker = broker_url(settings)
        if importlib.util.find_spec("flower") is None:
            raise ConfigError("Flower is not installed: pip install 'imagebatch[flower]'")
        configure(settings, broker)
    app.start(["flower", *ctx.args])


@click.command()
@click.option("--once", is_flag=True, help="one pass over the inbox now, then exit (cron, tests)")
@debug_opt
def schedule(once: bool, debug: bool) -> None:
    """Run the inbox schedule (IMAGEBATCH_INBOX, IMAGEBATCH_SCHEDULE): each new manifest is
    submitted exactly once, even with two schedulers running. Exit 1 if --once refused one."""
    set_debug(debug)
    from worker.services.inbox import schedule as inbox
    from worker.services.inbox import sources as inboxes

    with user_errors():
        settings = settings_from_env()
        done = inbox.run_schedule(
            settings, choose_provider(settings, None), once=once, announce=click.echo
        )
    for line in done.describe() if done else []:
        click.echo(line)
    sys.exit(1 if done and done.of(inboxes.Action.REFUSED) else 0)


COMMANDS = [worker, simulate, webhook, health, flower, schedule]
