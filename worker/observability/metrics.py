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

*The fleet* (gauges read from Redis at scrape time): ``worker.observability.fleet``.

No label ever holds a prompt, a line id or a secret; label values come from the code (steps,
outcomes, error types, provider names) or are batch ids of batches still running.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from jobs.errors import ConfigError
from jobs.registry import REGISTRY
from jobs.settings import CoreSettings
from worker.lines.records import LineRecord, LineStatus, Transition
from worker.observability.fleet import FleetCollector, label, scrape_clients
from worker.runtime import Runtime

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""A submit or poll takes tens of milliseconds; a synchronous provider's call, a minute."""
JOB_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""The fleet read gives up this soon: a scrape must answer (with ``imagebatch_redis_up 0``)
well inside Prometheus's own timeout while Redis is away."""
ENDED = ("succeeded", "failed", "rejected")


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
        if self.broker is not None and self.broker is not self.state:
            self.broker.close()
        self.state.close()


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
