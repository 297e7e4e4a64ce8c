"""Simulator settings: frozen dataclasses that can be changed at runtime from plain JSON.

``from_mapping`` merges a partial mapping onto a base config and type-checks every value, so a
``POST /_sim/config`` with a typo fails loudly instead of silently doing nothing.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self, TypeVar, Union, get_args, get_origin, get_type_hints

from jobs.simulator.core import PROVIDERS

ResultShape = Literal["images", "string"]
ImageMode = Literal["full", "tiny"]
RateLimitScope = Literal["all", "submits"]
Outage = Literal["503", "refuse"]
T = TypeVar("T")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class Faults:
    """Probabilities (0..1) of injected faults, drawn from one RNG seeded with ``seed``."""

    seed: int = 0
    error_5xx: float = 0
    error_429: float = 0
    drop_after_accept: float = 0
    job_failed_transient: float = 0
    job_failed_policy: float = 0
    invalid_json: float = 0
    cdn_truncated: float = 0
    cdn_expired: float = 0
    cdn_lag: float = 0
    """Per image: its first GET answers 404 (not yet propagated), later GETs succeed."""
    slow: float = 0
    slow_s: float = 2.0
    webhook_drop: float = 0
    """Per job: its webhook deliveries are never sent (``webhookStatus`` stays pending)."""
    webhook_duplicate: float = 0
    """Per job: every webhook event is delivered twice."""
    submit_429: float = 0
    """Per paid submit: a 429 from the provider's own shortage, whatever the client's load."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "slow_s":
                _require(value >= 0, "faults.slow_s must be >= 0")
            elif f.name != "seed":
                _require(0 <= value <= 1, f"faults.{f.name} must be between 0 and 1")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Self | None = None) -> Self:
        """``base`` (or the defaults) with the keys of ``data`` replaced; unknown keys raise."""
        return _merge(cls, base or cls(), data, "faults.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProviderOverrides:
    """One provider's departures from the global settings, so one of several can misbehave.

    A field left at None keeps the global value of the same name for that provider.
    """

    max_in_flight: int | None = None
    rate_limit_rps: float | None = None
    latency_s: float | None = None
    sync_latency_s: float | None = None
    credits: float | None = None
    outage: Outage | None = None
    """``503``: every API request is answered 503 in the provider's envelope (its CDN still
    serves). ``refuse``: its dedicated listener is closed (see ``dedicated_ports``); a request
    that reaches it elsewhere is read and the connection closed without an answer."""
    max_images: int | None = None
    """Images the account may be billed for; a submit that would go over gets the provider's
    out-of-credit answer (failed, refunded jobs do not count)."""
    extra_latency_s: float = 0
    """Added before every answer of the provider's API: a slow provider."""

    def __post_init__(self) -> None:
        _require(self.max_in_flight is None or self.max_in_flight >= 1, "max_in_flight >= 1")
        _require(self.rate_limit_rps is None or self.rate_limit_rps > 0, "rate_limit_rps > 0")
        for name in ("latency_s", "sync_latency_s", "credits", "max_images"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"{name} must be >= 0")
        _require(self.extra_latency_s >= 0, "extra_latency_s must be >= 0")
        _require(self.outage in (None, *get_args(Outage)), "outage: 503, refuse or null")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Self | None = None) -> Self:
        """``base`` (or the defaults) with the keys of ``data`` replaced; unknown keys raise."""
        return _merge(cls, base or cls(), data, "providers.")


OVERRIDDEN = ("max_in_flight", "rate_limit_rps", "latency_s", "sync_latency_s", "credits")
"""The ``ProviderOverrides`` fields that replace a global ``SimulatorConfig`` field."""
NO_OVERRIDES = ProviderOverrides()


@dataclass(frozen=True)
class BatchConfig:
    """OpenAI's Batch API (``/openai/v1/batches``): its pace, limits and faults.

    A batch's timeline is fixed when it is created, from the values in force then.
    """

    request_latency_s: float = 1.0
    """How long one request of a batch runs (five times as long for a ``[[slow]]`` prompt)."""
    concurrency: int = 8
    """Requests of one batch running at once."""
    validating_s: float = 0.5
    finalizing_s: float = 0.5
    cancelling_s: float = 1.0
    """How long a cancelled batch stays ``cancelling``; requests already running may finish."""
    window_s: float = 24 * 3600.0
    """The completion window: a batch still running this long after creation expires."""
    enqueued_limit: int | None = None
    """Images of one API key not yet finished across its batches; a batch that would go over
    fails validation with ``token_limit_exceeded``. None: no limit."""
    create_drop: float = 0
    """Probability that ``POST /v1/batches`` creates the batch, then hangs up without answering."""
    create_drops: int = 0
    """The first this many creates make their batch, then hang up without answering (a lost
    answer on cue, for tests; ``create_drop`` draws at random)."""
    error_5xx: float = 0
    """Probability that one request of a batch fails with a 500 (a line in the error file)."""

    def __post_init__(self) -> None:
        for name in ("request_latency_s", "validating_s", "finalizing_s", "cancelling_s"):
            _require(getattr(self, name) >= 0, f"batch.{name} must be >= 0")
        _require(self.window_s > 0, "batch.window_s must be > 0")
        _require(self.concurrency >= 1, "batch.concurrency must be >= 1")
        _require(self.enqueued_limit is None or self.enqueued_limit >= 1, "batch.enqueued_limit")
        _require(self.create_drops >= 0, "batch.create_drops must be >= 0")
        for name in ("create_drop", "error_5xx"):
            _require(0 <= getattr(self, name) <= 1, f"batch.{name} must be between 0 and 1")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Self | None = None) -> Self:
        """``base`` (or the defaults) with the keys of ``data`` replaced; unknown keys raise."""
        return _merge(cls, base or cls(), data, "batch.")


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated providers behave. Times are seconds; ``credits`` is per provider."""

    host: str = "127.0.0.1"
    port: int = 0
    latency_s: float = 1.0
    latency_jitter_s: float = 0.0
    """Each job's duration is ``latency_s`` plus a uniform draw from 0..``latency_jitter_s``."""
    sync_latency_s: float = 0.2
    sync_latency_jitter_s: float = 0.0
    max_in_flight: int | None = None
    rate_limit_rps: float | None = None
    rate_limit_burst: int = 10
    result_shape: ResultShape = "images"
    credits: float | None = None
    cdn_ttl_s: float | None = None
    image_mode: ImageMode = "full"
    """``tiny``: images 1/16 of the asked size (64x64 for 1024x1024), for load tests."""
    webhook_timeout_s: float = 2.0
    webhook_retries: int = 3
    """Deliveries after the first, on a connection error or a non-2xx answer."""
    webhook_backoff_s: float = 0.5
    """Wait before retry k (1-based) is ``webhook_backoff_s * 2 ** (k - 1)``."""
    rate_limit_scope: RateLimitScope = "all"
    """``submits``: only paid submits spend the ``rate_limit_rps`` bucket; every other request
    spends a separate one of ``read_rate_limit_rps`` (as Replicate limits creates apart)."""
    read_rate_limit_rps: float | None = None
    """The read bucket's rate with scope ``submits`` (burst: one second's worth); None: none."""
    ratelimit_headers: bool = False
    """Send OpenAI's ``x-ratelimit-*-requests`` headers on answers a rate limit applies to."""
    dedicated_ports: bool = False
    """Also serve each provider alone on its own port (``url_for``), so one can refuse
    connections while the others keep serving."""
    providers: Mapping[str, ProviderOverrides] = field(default_factory=dict)
    """Per-provider overrides by name; a partial JSON update merges into each one."""
    faults: Faults = field(default_factory=Faults)
    batch: BatchConfig = field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port must be 0..65535")
        for name in (
            "latency_s",
            "latency_jitter_s",
            "sync_latency_s",
            "sync_latency_jitter_s",
            "webhook_backoff_s",
        ):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0")
        _require(self.webhook_timeout_s > 0, "webhook_timeout_s must be > 0")
        _require(0 <= self.webhook_retries <= 10, "webhook_retries must be 0..10")
        _require(self.image_mode in get_args(ImageMode), "image_mode: full or tiny")
        _require(self.max_in_flight is None or self.max_in_flight >= 1, "max_in_flight >= 1")
        _require(self.rate_limit_rps is None or self.rate_limit_rps > 0, "rate_limit_rps > 0")
        _require(self.rate_limit_burst >= 1, "rate_limit_burst must be >= 1")
        _require(self.result_shape in get_args(ResultShape), "result_shape: images or string")
        _require(self.credits is None or self.credits >= 0, "credits must be >= 0")
        _require(self.cdn_ttl_s is None or self.cdn_ttl_s >= 0, "cdn_ttl_s must be >= 0")
        _require(self.rate_limit_scope in get_args(RateLimitScope), "rate_limit_scope: all|submits")
        _require(
            self.read_rate_limit_rps is None or self.read_rate_limit_rps > 0,
            "read_rate_limit_rps > 0",
        )
        unknown = sorted(set(self.providers) - set(PROVIDERS))
        _require(not unknown, f"unknown provider(s) {unknown}; one of {', '.join(PROVIDERS)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Self | None = None) -> Self:
        """``base`` (or the defaults) with ``data`` applied; ``faults`` and ``batch`` may be
        partial dicts, ``providers`` a partial dict of partial dicts (a provider set to null
        loses its overrides; ``{}`` clears them all)."""
        return _merge(cls, base or cls(), data, "")

    def overrides(self, provider: str) -> ProviderOverrides:
        return self.providers.get(provider, NO_OVERRIDES)

    def for_provider(self, provider: str) -> Self:
        """This config as ``provider`` sees it: its overrides in place of the global values."""
        extra = self.providers.get(provider)
        if extra is None:
            return self
        changes = {name: getattr(extra, name) for name in OVERRIDDEN}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(cls: type[T], base: T, data: Mapping[str, Any], prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix or 'config'} must be an object")
    hints = get_type_hints(cls)
    changes: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints:
            raise ValueError(f"unknown setting {prefix}{name!r}")
        changes[name] = _coerce(hints[name], value, getattr(base, name), prefix + name)
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]


def _coerce(hint: Any, value: Any, current: Any, name: str) -> Any:
    """Accept ``value`` when it fits ``hint`` (ints count as floats, booleans never as numbers)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = (a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{name} must be one of {', '.join(map(str, args))}")
    if hint in (Faults, BatchConfig):
        return value if isinstance(value, hint) else hint.from_mapping(value, current)
    if origin is Mapping:
        return _merge_providers(value, current, name)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    elif hint in (int, str, bool) and type(value) is hint:
        return value
    raise ValueError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _merge_providers(
    value: Any, current: Mapping[str, ProviderOverrides], name: str
) -> dict[str, ProviderOverrides]:
    """Each named provider's entry merged into its current one; null drops the entry.

    A mapping of nothing but ``ProviderOverrides`` (``{}`` included) replaces them all, as a
    ``Faults`` value does, so restoring a saved config (``to_dict()`` or the dataclass's own
    fields) clears the overrides a test set."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be an object keyed by provider")
    whole = all(isinstance(v, ProviderOverrides) for v in value.values())
    merged = {} if whole else dict(current)
    for provider, changes in value.items():
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {name}.{provider}; one of {', '.join(PROVIDERS)}")
        if changes is None:
            merged.pop(provider, None)
        elif isinstance(changes, ProviderOverrides):
            merged[provider] = changes
        else:
            merged[provider] = _merge(
                ProviderOverrides,
                merged.get(provider, NO_OVERRIDES),
                changes,
                f"{name}.{provider}.",
            )
    return merged
