"""The options of a command that starts a batch (``run``, ``submit``), handed to it as one
``StartOptions``: written once, listed in ``--help`` in one order.

A module of its own, not ``options``: the wrapper calls the command, and the command calls
into ``options`` (settings, errors), which would be a call back into the wrapper's module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.cli.options import (
    batch_opt,
    credits_opt,
    debug_opt,
    fresh_opt,
    manifest_arg,
    out_opt,
    provider_opt,
    strict_opt,
    usd_opt,
    usd_per_image_opt,
)


@dataclass(frozen=True)
class StartOptions:
    """What a command that starts a batch (``run``, ``submit``) is asked, as one value."""

    manifest: str
    provider: str | None
    out: str | None
    batch_id: str | None
    strict: bool
    max_credits: float | None
    max_usd: float | None
    max_usd_per_image: float | None
    fresh: bool
    debug: bool


START_OPTIONS = (
    manifest_arg,
    provider_opt,
    out_opt,
    batch_opt,
    strict_opt,
    credits_opt,
    usd_opt,
    usd_per_image_opt,
    fresh_opt,
    debug_opt,
)
"""The options of ``StartOptions``, in the order ``--help`` lists them."""


def start_options(command: Callable[[StartOptions], None]) -> Callable[..., None]:
    """Give ``command`` the options of a start (``START_OPTIONS``), handed to it as one
    ``StartOptions``; goes under ``@click.command()``."""

    @functools.wraps(command)
    def asked(**values: Any) -> None:
        command(StartOptions(**values))

    decorated: Callable[..., None] = asked
    for option in reversed(START_OPTIONS):
        decorated = option(decorated)
    return decorated
