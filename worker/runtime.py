"""The per-process runtime: settings, the Redis state, provider adapters, stores, and the
hooks (metrics) a fleet watches.

Built once per worker process (or once for the embedded run) and shared by all task threads;
httpx and boto3 clients are thread-safe, and are reused so connections are pooled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from jobs import providers
from jobs.providers import http
from jobs.providers.base import Provider
from jobs.settings import CoreSettings, Settings
from jobs.storage import Store, open_store
from worker.lines.records import LineRecord, Transition, admitted_by
from worker.lines.steps import Context
from worker.redis.connect import connect
from worker.redis.state import State

Observer = Callable[[LineRecord, Transition, float | None], None]
"""Called after every applied transition, with how long its step took when it was timed."""


class Lease(Protocol):
    """Keeps a running step's line leased while this process lives (``worker.dispatch.lease``)."""

    def holding(self, zset: str, member: str) -> AbstractContextManager[None]: ...


class Runtime:
    """Everything a task needs, created lazily and cached for the life of the process."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.state = State(connect(settings))
        self._lock = threading.Lock()
        self._providers: dict[str, Provider] = {}
        self._stores: dict[str, Store] = {}
        self._meta: dict[str, tuple[float, dict[str, str]]] = {}
        self._jobs: dict[tuple[str, str], tuple[float, tuple[float | None, float | None]]] = {}
        self.downloads = httpx.Client(
            timeout=httpx.Timeout(60.0, connect=10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            follow_redirects=False,
            verify=http.tls(),
        )
        self.observers: list[Observer] = []
        self.heartbeat: Lease | None = None
        """This process's lease keeper, when it runs a worker (set by the worker bootstep)."""

    @property
    def webhooks_on(self) -> bool:
        return bool(self.settings.webhook_url)

    def provider(self, name: str) -> Provider:
        with self._lock:
            if name not in self._providers:
                self._providers[name] = providers.create(name, self.settings)
            return self._providers[name]

    def store(self, out: str) -> Store:
        with self._lock:
            if out not in self._stores:
                self._stores[out] = open_store(out, self.settings)
            return self._stores[out]

    def trusted_hosts(self, provider: str) -> frozenset[str]:
        """Result URLs on the provider's own host may be private (the local simulator)."""
        host = urlsplit(self.settings.provider_config(provider).base_url).hostname
        return frozenset({host}) if host else frozenset()

    def batch_meta(self, batch: str, seqs: Iterable[int] = ()) -> dict[str, str]:
        """The batch record, read at most once a second per process (a cancel or stop is
        seen within a second; every task of a busy batch does not read it again). A record
        read before one of the lines (``seqs``) was admitted may be an earlier run's of the same
        batch id, with another output location: it is read again."""
        now, admitted = time.time(), admitted_by(max(seqs, default=0))
        with self._lock:
            cached = self._meta.get(batch)
        if cached is not None and now - cached[0] < 1.0 and cached[0] >= admitted:
            return cached[1]
        meta = self.state.batch(batch)
        with self._lock:
            self._meta[batch] = (now, meta)
        return meta

    def expected_latency(self, provider: str, model: str) -> float | None:
        """The learned latency of a provider's model."""
        return self._learned(provider, model)[0]

    def queue_share(self, provider: str, model: str) -> float | None:
        """The learned share of a job's time before its progress starts."""
        return self._learned(provider, model)[1]

    def _learned(self, provider: str, model: str) -> tuple[float | None, float | None]:
        """What the fleet learned of a provider's model's jobs, read at most every two seconds."""
        now = time.monotonic()
        key = (provider, model)
        with self._lock:
            cached = self._jobs.get(key)
        if cached is not None and now - cached[0] < 2.0:
            return cached[1]
        value = self.state.learned_job(provider, model)
        with self._lock:
            self._jobs[key] = (now, value)
        return value

    def context(self, meta: dict[str, str]) -> Context:
        state, batch = self.state, meta.get("batch_id", "")
        ttl = self.settings.line_deadline_s + self.settings.storage_deadline_s
        return Context(
            settings=self.settings,
            batch=meta,
            adapter=self.provider,
            store=self.store(meta["out"]),
            downloads=self.downloads,
            trusted_hosts=self.trusted_hosts,
            expected_latency=self.expected_latency,
            queue_share=self.queue_share,
            reserve=lambda amount, budget: state.reserve(batch, amount, budget),
            put_blob=lambda idx, k, data: state.put_blob(batch, idx, k, data, ttl),
            get_blob=state.get_blob,
            usd_rates=self.settings.usd_rates(),
            out_of_pool=lambda: frozenset(state.out_of_pool(batch)),
            webhook_url=self.settings.webhook_callback_url(),
        )

    def observe(self, rec: LineRecord, t: Transition, seconds: float | None = None) -> None:
        for observer in self.observers:
            observer(rec, t, seconds)

    def close(self) -> None:
        for adapter in self._providers.values():
            adapter.close()
        self.downloads.close()
        self.state.close()


_current: Runtime | None = None
_current_lock = threading.Lock()


def configure(settings: CoreSettings) -> Runtime:
    """Install the process's runtime (the CLI does this before starting a worker)."""
    global _current
    with _current_lock:
        if _current is not None:
            _current.close()
        _current = Runtime(settings)
        return _current


def current() -> Runtime:
    """The process's runtime, built from the environment on first use in a worker."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Runtime(Settings())
        return _current


def reset() -> None:
    global _current
    with _current_lock:
        if _current is not None:
            _current.close()
        _current = None
