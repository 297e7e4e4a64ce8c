"""What ``plan`` says before anything is spent: what a start would find (``plan_batch``: every
line checked as ``run`` checks it, the lines already bought under the output counted as
reused), and how long the batch would take (``estimate_seconds``), from the same model the
scheduler runs by: each provider's in-flight cap, its submit and poll rates, and its expected
job latency.
Where the fleet's Redis already learned them (the account's real limits after its 429s, the
jobs' latency, the workers alive), those count; else the configured ones. Providers run side
by side, so the slowest one sets the time, unless the workers themselves are the bound (fast
jobs, high limits)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs import providers
from jobs.checker import Checker
from jobs.clock import duration
from jobs.errors import ConfigError
from jobs.manifest.parse import Line
from jobs.manifest.spool import Spooled, file_chunks
from jobs.output import reuse
from jobs.providers.base import Provider
from jobs.registry import BATCH_SHARE
from jobs.routing import PoolRules
from jobs.settings import CoreSettings
from jobs.storage import open_store
from jobs.validate import Plan, counted_lines
from worker.redis.connect import RedisError, quick_client, redis_url
from worker.redis.state import State

__all__ = [
    "Adapters",
    "Known",
    "Learned",
    "duration",
    "estimate_seconds",
    "group_notes",
    "learned",
    "plan_batch",
]

log = logging.getLogger(__name__)

POLLS_PER_JOB = 3.0
"""Polls a job takes on average: an early look at its progress, a second to measure its pace,
one at its predicted end."""
OVERHEAD_S = 2.0
"""Validating, seeding and finalizing a small batch."""
JOBS_PER_WORKER_S = 45.0
"""What one worker process orchestrates per second (submit, poll, fetch, check, store) when
the provider is not the bound: bench/throughput.py's scaling case on 2 cores."""


class Adapters:
    """Adapters for validating and pricing, one per provider (no key needed to price).

    ``checked`` validates as ``run`` does: a line whose own provider ``run`` could not reach
    (no key, no base URL) is rejected with the same reason, so ``plan`` and ``run`` agree. The
    batch's ``provider`` is not: ``run`` refuses to start without it (exit 2, before any line
    is read), while ``plan`` prices a provider before its key is set."""

    def __init__(self, settings: CoreSettings, provider: str | None = None) -> None:
        self.settings = settings
        self.provider = provider
        self.made: dict[str, Provider] = {}
        self.refused: dict[str, ConfigError | None] = {}

    def __call__(self, name: str) -> Provider:
        if name not in self.made:
            self.made[name] = providers.build(name, self.settings)
        return self.made[name]

    def checked(self, name: str) -> Provider:
        """The adapter, or the ``ConfigError`` ``run`` would meet creating it."""
        if name not in self.refused:
            self.refused[name] = self._refusal(name)
        refusal = self.refused[name]
        if refusal is not None:
            raise refusal
        return self(name)

    def _refusal(self, name: str) -> ConfigError | None:
        if name == self.provider:
            return None
        try:
            providers.create(name, self.settings).close()
        except ConfigError as exc:
            return exc
        return None


@dataclass(frozen=True)
class Learned:
    """What earlier runs taught the fleet about one provider's account."""

    cap: int | None = None
    submit_rate: float | None = None
    poll_rate: float | None = None
    latency_s: float | None = None


@dataclass(frozen=True)
class Known:
    """What the fleet's Redis knows: the workers alive, and what each account taught it."""

    workers: int = 1
    accounts: dict[str, Learned] = field(default_factory=dict)


def learned(settings: CoreSettings, names: list[str]) -> Known:
    """The workers, learned limits and latencies in the configured Redis; nothing without one,
    or when it does not answer at once (``plan`` needs no Redis)."""
    if settings.broker_url is None and settings.redis_url is None:
        return Known()
    state = State(quick_client(redis_url(settings), timeout=1.0))
    try:
        found = {}
        for name in names:
            limits = state.limits(name)
            known = state.learned_latencies(name)
            found[name] = Learned(
                cap=int(float(limits["cap"])) if "cap" in limits else None,
                submit_rate=float(limits["submit_rate"]) if "submit_rate" in limits else None,
                poll_rate=float(limits["poll_rate"]) if "poll_rate" in limits else None,
                latency_s=max(known) if known else None,
            )
        return Known(max(1, state.workers_alive()), found)
    except RedisError as exc:
        log.debug("no learned limits: %s", exc)
        return Known()
    finally:
        state.close()


def latency_of(settings: CoreSettings, name: str) -> float:
    spec = settings.provider_spec(name)
    if spec.builtin_simulator and not settings.provider_config(name).base_url:
        return settings.embedded_simulator_latency_s
    return settings.provider_config(name).expected_latency_s


def estimate_seconds(
    settings: CoreSettings,
    plan: Plan,
    adapters: Adapters | None = None,
    known: Known | None = None,
) -> float:
    adapters = adapters or Adapters(settings)
    known = known or Known()
    slowest = all_jobs = 0.0
    for name, part in plan.by_provider.items():
        if settings.provider_spec(name).group:
            continue  # its jobs end within the provider's window (``group_note``), not by slots
        config = settings.provider_config(name)
        adapter = adapters(name)
        per_request = adapter.max_images_per_request
        jobs = part.images if per_request == 1 else part.lines
        all_jobs += jobs
        account = known.accounts.get(name, Learned())
        latency = account.latency_s or latency_of(settings, name)
        ceiling = min(config.max_in_flight, settings.worker_concurrency * 8)
        cap = max(1, min(account.cap or ceiling, ceiling))
        submit_rate = min(account.submit_rate or config.submit_rate, config.submit_rate)
        poll_rate = min(account.poll_rate or config.poll_rate, config.poll_rate)
        polls = jobs * POLLS_PER_JOB if adapter.polled else 0.0
        by_slots = math.ceil(jobs / cap) * latency
        slowest = max(slowest, by_slots, jobs / submit_rate, polls / poll_rate)
    by_workers = all_jobs / (JOBS_PER_WORKER_S * known.workers)
    return max(slowest, by_workers) + OVERHEAD_S if plan.valid else 0.0


def group_notes(settings: CoreSettings, plan: Plan) -> list[str]:
    """What ``plan`` says of the lines a group provider takes: the price next to the
    synchronous one, and that they finish within the provider's window, not by our pace."""
    notes = []
    for name, part in sorted(plan.by_provider.items()):
        spec = settings.provider_spec(name)
        if not spec.group:
            continue
        window = duration(spec.group_window_s).replace("h00m", " h")
        sync = spec.same_account_as or name
        full = round(part.credits / BATCH_SHARE, 6)
        notes.append(
            f"{name}: {part.lines} lines at half the price of {sync} (est. {part.credits:g} "
            f"{part.unit} instead of {full:g}), finishes within {window}"
        )
    return notes


def plan_batch(
    settings: CoreSettings,
    spooled: Spooled,
    provider: str,
    *,
    out: str | None = None,
    fresh: bool = False,
    on_line: Callable[[Line], None] | None = None,
    max_usd_per_image: float | None = None,
) -> Plan:
    """What ``start_batch`` would find, spending nothing: every line checked as ``run`` checks
    it (its provider reachable too), and the lines already bought under ``out`` counted as
    reused instead of priced."""
    adapters = Adapters(settings, provider)
    rules = PoolRules(settings.keyed(), settings.usd_rates(), max_usd_per_image)
    check = Checker(adapters.checked, provider, rules)
    plan = Plan()
    wanted = reuse.Wanted()
    for idx, line in counted_lines(file_chunks(spooled.path), check):
        plan.add(line, adapters, check)
        if on_line is not None:
            on_line(line)
        if line.request is not None and not fresh:
            wanted.add(line.request.fingerprint(check.bought_as(line.request)), idx)
    if out is not None and len(wanted):
        wanted.freeze()
        claims = reuse.find(open_store(out, settings), wanted, plan.lines)
        for _, _, request, _ in reuse.claimed(spooled.path, claims):
            plan.take_out(request, adapters, check)
    return plan
