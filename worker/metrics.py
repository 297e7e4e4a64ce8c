"""Prometheus metrics on ``IMAGEBATCH_METRICS_HOST:IMAGEBATCH_METRICS_PORT``, served by every
worker and by ``imagebatch run``.

Two kinds, told apart by how a fleet adds them up:

*This process* (counters and histograms, updated by an observer on ``Runtime.observers``; a
fleet's total is the ``sum`` over its workers)::

    imagebatch_lines_total{provider,status}            lines this process ended: succeeded, failed
                                                       (rejections happen before any step:
                                                       see imagebatch_batch_lines_ended)
    imagebatch_line_failures_total{provider,type}      failed lines by error type (content_policy…)
    imagebatch_images_stored_total{provider}           images uploaded to the output store
    imagebatch_credits_total{provider,unit}            billed, in the provider's own unit (credits
                                                       or USD): never add two providers' credits
    imagebatch_transitions_total{provider,step,outcome}
    imagebatch_throttled_total{provider,kind}          429s; kind is concurrency or rate
    imagebatch_polls_total{provider}
    imagebatch_step_seconds{provider,step}             histogram: wall time of one step function
    imagebatch_job_seconds{provider}                   histogram: a provider job, accepted → done

*The fleet* (gauges read from Redis at scrape time, the same on every worker: ``max``, not
``sum``; a handful of commands per scrape, none per line)::

    imagebatch_batch_lines{batch}                      counted lines of an active batch
    imagebatch_batch_lines_done{batch}
    imagebatch_batch_lines_ended{batch,status}         succeeded, failed, rejected
    imagebatch_batch_credits{batch,currency}           "apiframe credits", "USD"…
    imagebatch_batch_status{batch,status}              1 for the batch's status (running…)
    imagebatch_in_flight{provider}                     lines holding a slot (ZCARD ib:flight:P)
    imagebatch_waiting{provider}                       lines waiting for a slot (ZCARD ib:ready:P)
    imagebatch_limit_cap{provider}                     the adaptive limiter's in-flight cap
    imagebatch_limit_rate{provider}                    ... and its requests per second
    imagebatch_limit_pause_seconds{provider}           what is left of a Retry-After pause
    imagebatch_queue_depth{queue}                      Celery messages waiting (LLEN imagebatch)
    imagebatch_redis_up                                0 when the fleet could not be read

No label ever holds a prompt, a line id or a secret; label values come from the code (steps,
outcomes, error types, provider names) or are batch ids of batches still running.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.errors import ConfigError
from jobs.providers.registry import REGISTRY
from jobs.settings import CoreSettings
from worker import keys
from worker.app import QUEUE
from worker.records import LineRecord, LineStatus, Transition
from worker.runtime import Runtime, redis_url
from worker.state import State

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""A submit or poll takes tens of milliseconds; a synchronous provider's call, a minute."""
JOB_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
SCRAPE_TIMEOUT_S = 2.0
"""The fleet read gives up this soon: a scrape must answer (with ``imagebatch_redis_up 0``)
well inside Prometheus's own timeout while Redis is away."""
ENDED = ("succeeded", "failed", "rejected")


@functools.lru_cache(maxsize=4096)
def label(value: object) -> str:
    """A label value from the code's own words, made safe: lowercase ``[a-z0-9_]``, at most 40
    characters, so a surprising value can never blow up cardinality or break a query."""
    text = re.sub(r"[^a-z0-9_]+", "_", str(value).lower()).strip("_")
    return text[:40] or "none"


def outcome_label(t: Transition) -> str:
    """``failed (content_policy)`` → ``failed``: the detail has its own metric."""
    return label((t.outcome or t.status.value).split(" (", 1)[0])


# -- this process -------------------------------------------------------------------------------


class ProcessMetrics:
    """The counters and histograms of one process; ``observe`` is a ``Runtime`` observer.

    Cheap and thread-safe: no Redis, no I/O, only prometheus-client's own locked updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(name, doc, labels, namespace="imagebatch", registry=registry)

        self.lines = counter("lines", "Lines this process ended, by status", ("provider", "status"))
        self.failures = counter("line_failures", "Failed lines by error type", ("provider", "type"))
        self.images = counter("images_stored", "Images uploaded to the output store", ("provider",))
        self.credits = counter(
            "credits",
            "What providers billed, in each provider's own unit (never add across providers)",
            ("provider", "unit"),
        )
        self.transitions = counter(
            "transitions", "Transitions applied", ("provider", "step", "outcome")
        )
        self.throttled = counter("throttled", "429 answers, by kind", ("provider", "kind"))
        self.polls = counter("polls", "Polls of provider jobs", ("provider",))
        self.step_seconds = Histogram(
            "step_seconds",
            "Wall time of one step function (submit, poll, store)",
            ("provider", "step"),
            namespace="imagebatch",
            registry=registry,
            buckets=STEP_BUCKETS,
        )
        self.job_seconds = Histogram(
            "job_seconds",
            "Provider job latency, from accepted to done",
            ("provider",),
            namespace="imagebatch",
            registry=registry,
            buckets=JOB_BUCKETS,
        )

    def observe(self, rec: LineRecord, t: Transition, seconds: float | None = None) -> None:
        """Count one applied transition; ``seconds`` is how long its step function ran."""
        try:
            self._count(rec, t, seconds)
        except Exception:  # a metrics bug must never fail a line
            log.warning("metrics: could not count a transition", exc_info=True)

    def _count(self, rec: LineRecord, t: Transition, seconds: float | None) -> None:
        provider = label(rec.provider)
        step = label(rec.info.step or "none")
        self.transitions.labels(provider, step, outcome_label(t)).inc()
        if t.row is not None:
            self.lines.labels(provider, t.status.value).inc()
            if t.status is LineStatus.FAILED and t.row.error is not None:
                self.failures.labels(provider, label(t.row.error.type)).inc()
        stored = images_stored(rec, t)
        if stored:
            self.images.labels(provider).inc(stored)
        billed = credits_billed(rec, t)
        if billed > 0:
            spec = REGISTRY.get(rec.provider)
            self.credits.labels(provider, spec.credit_unit if spec else "unknown").inc(billed)
        if t.limit is not None:
            self.throttled.labels(provider, label(t.limit.kind)).inc()
        polls = t.counts.get("polls", 0)
        if polls > 0:
            self.polls.labels(provider).inc(polls)
        if t.latency_s is not None:
            self.job_seconds.labels(provider).observe(t.latency_s)
        if seconds is not None:
            self.step_seconds.labels(provider, step).observe(seconds)


def images_stored(rec: LineRecord, t: Transition) -> int:
    """Images this transition's step uploaded: a line bought in parts stores some at a time."""
    if "images" in t.changes:
        after = len(t.changes["images"])
    elif t.status is LineStatus.SUCCEEDED and t.row is not None:
        after = len(t.row.images)
    else:
        return 0
    return max(0, after - len(rec.images))


def credits_billed(rec: LineRecord, t: Transition) -> float:
    """What this transition added to the line's credits (a job found done says what it cost);
    counted when billed, so a line's credits are counted once, whichever process ends it."""
    new = t.changes.get("credits")
    if not isinstance(new, int | float):
        return 0.0
    return max(0.0, float(new) - rec.credits)


# -- the fleet, from Redis ----------------------------------------------------------------------


@dataclass(frozen=True)
class BatchView:
    batch: str
    total: int | None
    status: str
    counters: dict[str, float]


@dataclass(frozen=True)
class ProviderView:
    provider: str
    in_flight: int
    waiting: int
    limits: dict[str, str]


@dataclass(frozen=True)
class Fleet:
    batches: list[BatchView]
    providers: list[ProviderView]


def read_fleet(state: State) -> Fleet:
    """Every active batch's record and counters and every provider's slots and limits, in two
    round trips (``3 + 2 * batches + 3 * providers`` commands, none per line).

    Belongs in ``State`` (as ``State.fleet()``); it is here until it moves."""
    first = state.client.pipeline(transaction=False)
    first.smembers(keys.BATCHES)
    first.smembers(keys.PROVIDERS)
    batch_set, provider_set = first.execute()
    batches, providers = sorted(batch_set), sorted(provider_set)
    second = state.client.pipeline(transaction=False)
    for b in batches:
        second.hmget(keys.batch(b), ["total", "status"])
        second.hgetall(keys.counters(b))
    for p in providers:
        second.zcard(keys.flight(p))
        second.zcard(keys.ready(p))
        second.hgetall(keys.limit(p))
    answers = iter(second.execute())
    views = []
    for b in batches:
        total, status = next(answers)
        counters = {k: float(v) for k, v in next(answers).items()}
        views.append(BatchView(b, int(total) if total else None, status or "", counters))
    slots = [
        ProviderView(p, int(next(answers)), int(next(answers)), dict(next(answers)))
        for p in providers
    ]
    return Fleet(views, slots)


def current_limits(
    view: ProviderView, settings: CoreSettings, now: float
) -> tuple[int, float, float] | None:
    """(cap, rate, pause left) as the scheduler's ``limiter.Limiter`` reads them: the saved
    adaptive values, never above the configured ceilings; the ceilings before any 429."""
    try:
        config = settings.provider_config(view.provider)
    except KeyError:
        return None
    saved = view.limits
    cap = min(config.max_in_flight, max(1, int(float(saved.get("cap", config.max_in_flight)))))
    rate = min(config.requests_per_second, float(saved.get("rate", config.requests_per_second)))
    pause = max(0.0, float(saved.get("pause_until", 0)) - now)
    return cap, rate, pause


class FleetCollector(Collector):
    """Reads the fleet's state from Redis at each scrape: every worker reports the same truth."""

    def __init__(
        self, state: State, settings: CoreSettings, broker: redis.Redis[str] | None
    ) -> None:
        self.state, self.settings, self.broker = state, settings, broker

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("imagebatch_redis_up", "1 when the fleet's state could be read")
        try:
            fleet = read_fleet(self.state)
            depth = None if self.broker is None else int(self.broker.llen(QUEUE))
        except (redis.RedisError, OSError) as exc:
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
        yield from (lines, done, ended, credits, status)

    def _providers(self, views: list[ProviderView]) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"imagebatch_{name}", doc, labels=["provider"])

        in_flight = gauge("in_flight", "Lines holding one of the provider's slots")
        waiting = gauge("waiting", "Lines waiting for a slot of the provider")
        cap = gauge("limit_cap", "The adaptive in-flight cap of the provider")
        rate = gauge("limit_rate", "The adaptive request rate of the provider (per second)")
        pause = gauge("limit_pause_seconds", "Seconds left of the provider's Retry-After pause")
        now = time.time()
        for view in views:
            in_flight.add_metric([view.provider], view.in_flight)
            waiting.add_metric([view.provider], view.waiting)
            limits = current_limits(view, self.settings, now)
            if limits is not None:
                cap.add_metric([view.provider], limits[0])
                rate.add_metric([view.provider], limits[1])
                pause.add_metric([view.provider], limits[2])
        yield from (in_flight, waiting, cap, rate, pause)


def scrape_clients(settings: CoreSettings) -> tuple[State, redis.Redis[str] | None]:
    """The state store, and the broker's Redis when it holds the Celery queue, on clients of
    their own with short timeouts and no retries (a scrape never waits out a Redis outage)."""

    def client(url: str) -> redis.Redis[str]:
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=SCRAPE_TIMEOUT_S,
            socket_connect_timeout=SCRAPE_TIMEOUT_S,
            max_connections=8,
        )

    state_url = redis_url(settings)
    state = State(client(state_url))
    broker_url = settings.broker_url or ""
    if broker_url.startswith("redis+socket://"):
        broker_url = "unix://" + broker_url.removeprefix("redis+socket://")
    if broker_url == state_url:
        return state, state.client
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return state, client(broker_url)
    return state, None  # another kind of broker: no queue depth


# -- serving ------------------------------------------------------------------------------------


class Metrics:
    """One process's registry: its own counters, the fleet collector, and the process's CPU,
    memory and GC (as the default registry would have)."""

    def __init__(self, settings: CoreSettings) -> None:
        self.registry = CollectorRegistry()
        self.process = ProcessMetrics(self.registry)
        self.state, self.broker = scrape_clients(settings)
        self.registry.register(FleetCollector(self.state, settings, self.broker))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def close(self) -> None:
        if self.broker is not None and self.broker is not self.state.client:
            self.broker.close()
        self.state.client.close()


class Endpoint:
    """A running ``/metrics`` endpoint, and the runtimes whose transitions feed it."""

    def __init__(self, settings: CoreSettings, host: str, port: int) -> None:
        self.host = host
        self.metrics = Metrics(settings)
        try:
            self._server, self._thread = _listen(host, port, self.metrics.registry)
        except BaseException:
            self.metrics.close()
            raise
        self.port = int(self._server.server_port)
        self.users: list[Runtime] = []
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def attach(self, rt: Runtime) -> None:
        if rt not in self.users:
            rt.observers.append(self.metrics.process.observe)
        self.users.append(rt)

    def detach(self, rt: Runtime) -> bool:
        """Let go of one use by ``rt``; True when nobody uses the endpoint any more."""
        self.users.remove(rt)
        if rt not in self.users:
            # (the runtime's observers may have been replaced: then nothing of ours is there)
            with contextlib.suppress(ValueError):
                rt.observers.remove(self.metrics.process.observe)
        return not self.users

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self.metrics.close()


def _listen(
    host: str, port: int, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread]:
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): "
            "choose a free IMAGEBATCH_METRICS_PORT, or unset it"
        ) from None


_endpoints: dict[tuple[str, int], Endpoint] = {}
_endpoints_lock = threading.Lock()


def acquire(rt: Runtime) -> Endpoint | None:
    """Serve the runtime's metrics, or join the endpoint this process already serves on that
    address (``run`` and its embedded worker share one); None when ``IMAGEBATCH_METRICS_PORT``
    is unset.

    Raises:
        ConfigError: the port cannot be bound.
    """
    port = rt.settings.metrics_port
    if port is None:
        return None
    where = (rt.settings.metrics_host, port)
    with _endpoints_lock:
        endpoint = _endpoints.get(where)
        if endpoint is None:
            endpoint = _endpoints[where] = Endpoint(rt.settings, *where)
        endpoint.attach(rt)
        return endpoint


def release(endpoint: Endpoint, rt: Runtime) -> None:
    """Undo one ``acquire(rt)``; the last one stops the server."""
    with _endpoints_lock:
        if not endpoint.detach(rt):
            return
        for where, known in list(_endpoints.items()):
            if known is endpoint:
                del _endpoints[where]
        endpoint.close()


@contextmanager
def serving(rt: Runtime) -> Iterator[Endpoint | None]:
    """Serve ``/metrics`` for the block (``imagebatch run``); nothing when the port is unset."""
    endpoint = acquire(rt)
    try:
        yield endpoint
    finally:
        if endpoint is not None:
            release(endpoint, rt)


class Exporter:
    """``start``/``stop`` for the worker bootstep, beside its scheduler and heartbeat threads."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.endpoint: Endpoint | None = None

    def start(self) -> None:
        if self.endpoint is None:
            self.endpoint = acquire(self.rt)

    def stop(self) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            release(endpoint, self.rt)
