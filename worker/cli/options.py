"""What every ``imagebatch`` command shares: how errors end it (one line, exit 2; the
traceback only with ``--debug``), where settings come from, and the common options."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import click
from pydantic import ValidationError

from jobs import providers
from jobs.errors import ConfigError, ImagebatchError
from jobs.registry import REGISTRY
from jobs.routing import AUTO, is_pool, members
from jobs.settings import CoreSettings, Settings, unknown_settings
from jobs.text import shown
from worker.cli import output
from worker.observability import logs
from worker.redis.connect import Unavailable

DEBUG = {"on": False}


def fail(message: str, code: int = 2) -> NoReturn:
    output.notice(message, event="error", level=logging.ERROR, prefix="error: ")
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
    except Unavailable as exc:
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
    output.use_json(settings.log_format == "json")
    for warning in unknown_settings():
        output.notice(warning, event="unknown_setting", level=logging.WARNING, prefix="warning: ")
    return settings


def choose_provider(settings: CoreSettings, option: str | None) -> str:
    """--provider, else IMAGEBATCH_PROVIDER, else the one provider whose key is set."""
    name = option or settings.provider
    if name is not None and is_pool(name):
        pool = members(name, settings.keyed())
        return AUTO if name == AUTO else ",".join(pool or ())
    if name is not None:
        if name not in REGISTRY:
            raise ConfigError(
                f"unknown provider {shown(name)}: use one of {', '.join(providers.names())}"
            )
        return name
    keyed = settings.keyed()
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
provider_opt = click.option(
    "--provider",
    help=f"{', '.join(REGISTRY)}; a pool: a,b,c (these, cheapest in USD first) or auto (every "
    "provider with a key)",
)
usd_per_image_opt = click.option(
    "--max-usd-per-image",
    type=float,
    help="keep lines off providers above this price per image (a pool's line waits for a "
    "cheaper slot)",
)
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
fresh_opt = click.option(
    "--fresh",
    is_flag=True,
    help="buy every line, even one already bought and stored under --out by another batch",
)
usd_opt = click.option("--max-usd", type=float, help="stop submitting before this spend in USD")
debug_opt = click.option("--debug", is_flag=True, help="show tracebacks")


def set_debug(value: bool) -> None:
    DEBUG["on"] = value
