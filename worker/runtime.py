"""The per-process runtime: settings, the Redis state client, provider adapters and stores.

Built once per worker process (or once for the embedded run) and shared by all task threads;
httpx clients and boto3 clients are thread-safe, and are reused so connections are pooled.
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

import httpx
import redis

from jobs import providers
from jobs.providers.base import Provider
from jobs.settings import Settings
from jobs.storage import Store, open_store
from worker.state import State


def redis_url(settings: Settings) -> str:
    """The state store: IMAGEBATCH_REDIS_URL, else the broker's own Redis."""
    url = settings.redis_url or settings.broker_url
    if url is None:
        raise RuntimeError("no Redis configured (the embedded default sets one)")
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


class Runtime:
    """Everything a task needs, created lazily and cached for the life of the process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        client = redis.Redis.from_url(
            redis_url(settings),
            decode_responses=True,
            health_check_interval=30,
            socket_timeout=30,
            socket_connect_timeout=10,
            retry_on_timeout=True,
        )
        self.state = State(client)
        self._lock = threading.Lock()
        self._providers: dict[str, Provider] = {}
        self._stores: dict[str, Store] = {}
        self.downloads = httpx.Client(
            timeout=httpx.Timeout(60.0, connect=10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            follow_redirects=True,
        )

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

    def close(self) -> None:
        for adapter in self._providers.values():
            adapter.close()
        self.downloads.close()
        self.state.r.close()


_current: Runtime | None = None
_current_lock = threading.Lock()


def configure(settings: Settings) -> Runtime:
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
