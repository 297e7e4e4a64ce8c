"""The per-process runtime: settings, the Redis state, provider adapters, stores, and the
hooks (metrics) a fleet watches.

Built once per worker process (or once for the embedded run) and shared by all task threads;
httpx and boto3 clients are thread-safe, and are reused so connections are pooled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import redis

from jobs import providers
from jobs.errors import ConfigError
from jobs.providers.base import Provider
from jobs.settings import CoreSettings, Settings
from jobs.storage import Store, open_store
from worker.state import State

if TYPE_CHECKING:
    from worker.records import LineRecord, Transition
    from worker.runner import Heartbeat
    from worker.steps import Context

Observer = Callable[["LineRecord", "Transition", "float | None"], None]
"""Called after every applied transition, with how long its step took when it was timed."""


def broker_url(settings: CoreSettings) -> str:
    """IMAGEBATCH_BROKER_URL, for the commands that only make sense with a fleet's broker."""
    if settings.broker_url is None:
        raise ConfigError("no broker: set IMAGEBATCH_BROKER_URL (redis://...)")
    return settings.broker_url


def redis_url(settings: CoreSettings) -> str:
    """The state store: IMAGEBATCH_REDIS_URL, else the broker's own Redis."""
    url = settings.redis_url or settings.broker_url
    if url is None:
        raise ConfigError("no broker: set IMAGEBATCH_BROKER_URL (redis://...)")
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


def connect(settings: CoreSettings) -> redis.Redis[str]:
    """A client that rides out short Redis restarts: reconnects and retries a call on a lost
    connection, with timeouts so no thread hangs on a dead server."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        redis_url(settings),
        decode_responses=True,
        health_check_interval=10,
        socket_timeout=30,
        socket_connect_timeout=5,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 5),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class Runtime:
    """Everything a task needs, created lazily and cached for the life of the process."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.state = State(connect(settings))
        self._lock = threading.Lock()
        self._providers: dict[str, Provider] = {}
        self._stores: dict[str, Store] = {}
        self._meta: dict[str, tuple[float, dict[str, str]]] = {}
        self._latency: dict[tuple[str, str], tuple[float, float | None]] = {}
        self.downloads = httpx.Client(
            timeout=httpx.Timeout(60.0, connect=10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            follow_redirects=False,
        )
        self.observers: list[Observer] = []
        self.heartbeat: Heartbeat | None = None
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

    def batch_meta(self, batch: str) -> dict[str, str]:
        """The batch record, read at most once a second per process (a cancel or stop is
        seen within a second; every task of a busy batch does not read it again)."""
        now = time.monotonic()
        with self._lock:
            cached = self._meta.get(batch)
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        meta = self.state.batch(batch)
        with self._lock:
            self._meta[batch] = (now, meta)
        return meta

    def expected_latency(self, provider: str, model: str) -> float | None:
        """The learned latency of a provider's model, read at most every two seconds."""
        now = time.monotonic()
        key = (provider, model)
        with self._lock:
            cached = self._latency.get(key)
        if cached is not None and now - cached[0] < 2.0:
            return cached[1]
        value = self.state.expected_latency(provider, model)
        with self._lock:
            self._latency[key] = (now, value)
        return value

    def context(self, meta: dict[str, str]) -> Context:
        from worker import webhook
        from worker.steps import Context

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
            reserve=lambda amount, budget: state.reserve(batch, amount, budget),
            put_blob=lambda idx, k, data: state.put_blob(batch, idx, k, data, ttl),
            get_blob=state.get_blob,
            usd_rates=self.settings.usd_rates(),
            webhook_url=webhook.callback_url(self.settings),
        )

    def observe(self, rec: LineRecord, t: Transition, seconds: float | None = None) -> None:
        for observer in self.observers:
            observer(rec, t, seconds)

    def close(self) -> None:
        for adapter in self._providers.values():
            adapter.close()
        self.downloads.close()
        self.state.client.close()


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
