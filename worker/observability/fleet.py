"""The fleet's metrics, read from Redis at each scrape: every worker reports the same truth
(``max`` them, do not ``sum``), in a handful of commands per scrape and none per line.

    imagebatch_batch_lines{batch}                      counted lines of an active batch
    imagebatch_batch_lines_done{batch}
    imagebatch_batch_lines_ended{batch,status}         succeeded, failed, rejected
    imagebatch_batch_credits{batch,currency}           "apiframe credits", "USD"…
    imagebatch_batch_status{batch,status}              1 for the batch's status (running…)
    imagebatch_in_flight{provider}                     lines holding a slot (ZCARD ib:flight:P)
    imagebatch_waiting{provider}                       lines waiting for a slot (ZCARD ib:ready:P)
    imagebatch_limit_cap{provider}                     the adaptive in-flight cap
    imagebatch_limit_rate{provider,kind}               the adaptive rate of submits or polls (/s)
    imagebatch_limit_pause_seconds{provider,kind}      what is left of a pause (a blocked account)
    imagebatch_throttled{provider}                     429s the provider answered (cumulative)
    imagebatch_provider_state{provider,state}          1 for its breaker's state: healthy,
                                                       cooling (no submits), probing, cooled
    imagebatch_provider_cooldown_seconds{provider}     what is left of its cooldown
    imagebatch_batch_provider_out{batch,provider}      1 for a provider that left the batch's
                                                       pool for good (402, 401/403)
    imagebatch_queue_depth{queue}                      Celery messages waiting (LLEN imagebatch)
    imagebatch_redis_up                                0 when the fleet could not be read
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.settings import CoreSettings
from worker.redis.connect import RedisError, quick_client, redis_form, redis_url
from worker.redis.keys import QUEUE
from worker.redis.state import State
from worker.redis.views import BatchView, ProviderView

log = logging.getLogger(__name__)
SCRAPE_TIMEOUT_S = 2.0
ENDED = ("succeeded", "failed", "rejected")


@functools.lru_cache(maxsize=4096)
def label(value: object) -> str:
    """A label value from the code's own words, made safe: lowercase ``[a-z0-9_]``, at most 40
    characters, so a surprising value can never blow up cardinality or break a query."""
    text = re.sub(r"[^a-z0-9_]+", "_", str(value).lower()).strip("_")
    return text[:40] or "none"


@dataclass(frozen=True)
class Limits:
    """A provider's limits as the pumps go by: the saved adaptive values, never above the
    configured ceilings (the ceilings before the leader wrote any)."""

    cap: int
    rates: dict[str, float]
    pauses: dict[str, float]
    """Seconds left of each kind's pause."""
    throttled: int


def current_limits(view: ProviderView, settings: CoreSettings, now: float) -> Limits | None:
    try:
        config = settings.provider_config(view.provider)
    except KeyError:
        return None
    saved = view.limits
    cap = min(config.max_in_flight, max(1, int(float(saved.get("cap", config.max_in_flight)))))
    ceilings = {"submit": config.submit_rate, "poll": config.poll_rate}
    rates = {k: min(c, float(saved.get(f"{k}_rate", c))) for k, c in ceilings.items()}
    pauses = {k: max(0.0, float(saved.get(f"{k}_pause", 0)) - now) for k in ceilings}
    return Limits(cap, rates, pauses, int(saved.get("throttled", 0)))


class FleetCollector(Collector):
    """Reads the fleet's state from Redis at each scrape: every worker reports the same truth."""

    def __init__(self, state: State, settings: CoreSettings, broker: State | None) -> None:
        self.state, self.settings, self.broker = state, settings, broker

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("imagebatch_redis_up", "1 when the fleet's state could be read")
        try:
            fleet = self.state.fleet()
            depth = None if self.broker is None else self.broker.queue_depth()
        except (RedisError, OSError) as exc:
            log.warning("metrics: cannot read the fleet's state from Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._batches(fleet.batches)
        yield from self._providers(fleet.providers)
        if depth is not None:
            queue = GaugeMetricFamily(
                "imagebatch_queue_depth", "Celery messages waiting in the queue", labels=["queue"]
            )
            queue.add_metric([QUEUE], depth)
            yield queue

    def _batches(self, views: list[BatchView]) -> Iterator[Metric]:
        lines = GaugeMetricFamily(
            "imagebatch_batch_lines", "Counted lines of an active batch", labels=["batch"]
        )
        done = GaugeMetricFamily(
            "imagebatch_batch_lines_done", "Lines of an active batch that ended", labels=["batch"]
        )
        ended = GaugeMetricFamily(
            "imagebatch_batch_lines_ended",
            "Lines of an active batch that ended, by status",
            labels=["batch", "status"],
        )
        credits = GaugeMetricFamily(
            "imagebatch_batch_credits",
            "What an active batch's ended lines cost, by currency",
            labels=["batch", "currency"],
        )
        status = GaugeMetricFamily(
            "imagebatch_batch_status", "1 for an active batch's status", labels=["batch", "status"]
        )
        out = GaugeMetricFamily(
            "imagebatch_batch_provider_out",
            "1 for a provider that left an active batch's pool for good",
            labels=["batch", "provider"],
        )
        for view in views:
            if view.total is not None:
                lines.add_metric([view.batch], view.total)
            done.add_metric([view.batch], view.counters.get("done", 0.0))
            for name in ENDED:
                ended.add_metric([view.batch, name], view.counters.get(name, 0.0))
            for name, amount in sorted(view.counters.items()):
                if name.startswith("credits:"):
                    credits.add_metric([view.batch, name.removeprefix("credits:")], amount)
            if view.status:
                status.add_metric([view.batch, label(view.status)], 1)
            for provider in view.out:
                out.add_metric([view.batch, label(provider)], 1)
        yield from (lines, done, ended, credits, status, out)

    def _providers(self, views: list[ProviderView]) -> Iterator[Metric]:
        def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"imagebatch_{name}", doc, labels=["provider", *labels])

        in_flight = gauge("in_flight", "Lines holding one of the provider's slots")
        waiting = gauge("waiting", "Lines waiting for a slot of the provider")
        cap = gauge("limit_cap", "The adaptive in-flight cap of the provider")
        rate = gauge("limit_rate", "The adaptive rate of a request kind (per second)", "kind")
        pause = gauge("limit_pause_seconds", "Seconds left of a request kind's pause", "kind")
        throttled = gauge("throttled", "429 answers of the provider, all workers (cumulative)")
        health = gauge("provider_state", "1 for the state of the provider's breaker", "state")
        cooldown = gauge("provider_cooldown_seconds", "Seconds left of the provider's cooldown")
        now = time.time()
        for view in views:
            in_flight.add_metric([view.provider], view.in_flight)
            waiting.add_metric([view.provider], view.waiting)
            health.add_metric([view.provider, view.health.state(now)], 1)
            cooldown.add_metric([view.provider], max(0.0, view.health.until - now))
            limits = current_limits(view, self.settings, now)
            if limits is None:
                continue
            cap.add_metric([view.provider], limits.cap)
            throttled.add_metric([view.provider], limits.throttled)
            for kind in ("submit", "poll"):
                rate.add_metric([view.provider, kind], limits.rates[kind])
                pause.add_metric([view.provider, kind], limits.pauses[kind])
        yield from (in_flight, waiting, cap, rate, pause, throttled, health, cooldown)


def scrape_clients(settings: CoreSettings) -> tuple[State, State | None]:
    """The state store, and the broker's Redis when it holds the Celery queue, on clients of
    their own with short timeouts and no retries (a scrape never waits out a Redis outage)."""
    state_url = redis_url(settings)
    state = State(quick_client(state_url, SCRAPE_TIMEOUT_S))
    broker_url = redis_form(settings.broker_url or "")
    if broker_url == state_url:
        return state, state
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return state, State(quick_client(broker_url, SCRAPE_TIMEOUT_S))
    return state, None  # another kind of broker: no queue depth
