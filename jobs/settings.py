"""All configuration, read once from the environment (prefix ``IMAGEBATCH_``) or ``.env``.

Nothing else in the code base reads ``os.environ``: the settings object is built at the edge
(the CLI, a worker process) and passed down. The per-provider fields
(``IMAGEBATCH_<NAME>_API_KEY``, ``_BASE_URL``, ``_MAX_IN_FLIGHT``, ``_REQUESTS_PER_SECOND``,
``_SUBMITS_PER_SECOND``, ``_POLLS_PER_SECOND``,
``_TIMEOUT_S``, ``_EXPECTED_LATENCY_S``, ``IMAGEBATCH_USD_PER_CREDIT_<NAME>`` for providers
that bill in credits, and ``_GROUP_SIZE``, ``_POLL_S``, ``_FALLBACK`` for group providers) are
generated from the provider registry, so a new provider needs no edit here. ``<NAME>`` is the
provider's name with ``-`` as ``_`` (``IMAGEBATCH_OPENAI_BATCH_API_KEY``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.registry import REGISTRY, ProviderSpec

__all__ = ["PROVIDER_NAMES", "GroupConfig", "ProviderConfig", "Settings", "unknown_settings"]

WEBHOOK_PATH = "/webhooks/apiframe"
"""Where ``imagebatch webhook`` receives APIFrame's deliveries, under ``IMAGEBATCH_WEBHOOK_URL``."""

PROVIDER_NAMES = tuple(name for name, spec in REGISTRY.items() if not spec.builtin_simulator)
"""Every real provider (the built-in simulator is a registry entry too, but not a vendor)."""


Limit = Literal["cap", "submits", "polls"]


@dataclass(frozen=True)
class ProviderConfig:
    """What one adapter needs: where, who, how fast, how many at once."""

    name: str
    base_url: str
    api_key: SecretStr | None
    max_in_flight: int
    requests_per_second: float
    timeout_s: float
    expected_latency_s: float = 15.0
    submits_per_second: float | None = None
    """Paid submits per second; None: ``requests_per_second``."""
    polls_per_second: float | None = None
    """Polls (reads of a job) per second; None: ``requests_per_second``."""
    configured: frozenset[Limit] = frozenset()
    """The limits the user set (the account's real ones): the limiter starts at them and
    provokes no 429; the others are defaults it approaches gently (slow start)."""

    @property
    def submit_rate(self) -> float:
        return self.submits_per_second or self.requests_per_second

    @property
    def poll_rate(self) -> float:
        return self.polls_per_second or self.requests_per_second

    def __repr__(self) -> str:
        key = "set" if self.api_key is not None else "unset"
        return f"ProviderConfig(name={self.name!r}, base_url={self.base_url!r}, api_key=<{key}>)"


@dataclass(frozen=True)
class GroupConfig:
    """How a group provider's lines are sent: in groups of ``size`` lines (at most
    ``max_bytes`` of input), the provider job polled every ``poll_s``, and ``fallback``: the
    synchronous provider that may buy a line its group left unfinished (None: a later group)."""

    size: int
    max_bytes: int
    poll_s: float
    window_s: float
    fallback: str | None = None


class CoreSettings(BaseSettings):
    """Everything but the per-provider fields. Secrets are ``SecretStr`` and never printed."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGEBATCH_", env_file=".env", extra="ignore", frozen=True
    )

    broker_url: str | None = None
    redis_url: str | None = None
    provider: str | None = None
    out: str = "./out"
    s3_endpoint_url: str | None = None

    max_attempts: int = Field(default=3, ge=1)
    """Provider jobs per line: a transient FAILED job is resubmitted until this many were tried."""
    max_deliveries: int = Field(default=5, ge=1)
    """A step that keeps killing its worker is given up after this many starts (poison line)."""
    line_deadline_s: float = Field(default=1800.0, gt=0)
    poll_initial_s: float = Field(default=2.0, gt=0)
    """First poll of a job while no latency has been learned for its provider and model."""
    poll_max_s: float = Field(default=10.0, gt=0)
    webhook_poll_s: float = Field(default=60.0, gt=0)
    """With webhooks on, polling is only the fallback: this often."""
    retry_base_s: float = Field(default=1.0, ge=0)
    """Base of the full-jitter exponential backoff; 0 removes backoff (tests)."""
    retry_max_s: float = Field(default=60.0, ge=0)
    http_retries: int = Field(default=4, ge=0)
    """Transient failures (5xx, network, bad JSON) of one step before the line's attempt is
    given up. A 429 never counts: it is back-pressure, not failure."""
    breaker_failures: int = Field(default=5, ge=1)
    """Submits in a row that a provider fails (5xx, timeouts, refused connections) before it
    cools down: no submits to it, from any worker, then one probe line."""
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    """The first cooldown; each one in a row lasts twice the last, up to ``breaker_max_s``."""
    breaker_max_s: float = Field(default=600.0, gt=0)
    failover_ambiguous: bool = False
    """A pool line whose synchronous submit may have been billed (sent, no answer) may move to
    another provider, risking paying twice (``summary.json`` counts them). Off: it stays."""
    download_retries: int = Field(default=4, ge=0)
    """A just-finished image that answers 404 is fetched again this many times (CDN lag), and
    the job re-read for fresh URLs, before it counts as expired."""
    download_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    storage_deadline_s: float = Field(default=6 * 3600.0, gt=0)
    """How long a line whose images are ready waits out an output-store outage before failing."""
    redis_outage_s: float = Field(default=300.0, gt=0)
    """How long ``run`` rides out a Redis that stopped answering before it stops (with the
    command that resumes the batch)."""

    worker_concurrency: int = Field(default=16, ge=1)
    visibility_timeout_s: int = Field(default=3600, ge=10)
    lease_s: float = Field(default=30.0, ge=1)
    """How long a dispatched step owns its line without a heartbeat; a dead worker's lines are
    taken over this long after its last heartbeat."""
    window: int | None = Field(default=None, ge=1)
    """Lines of a batch held in Redis at once; default: ``window_factor`` × the in-flight caps
    of the providers the batch uses."""
    window_factor: float = Field(default=4.0, ge=1)
    chunk_lines: int = Field(default=1000, ge=1)
    """Lines per part file of finished rows in the output store."""
    flush_interval_s: float = Field(default=5.0, gt=0)
    """Finished rows are written to the output store at least this often."""
    interrupt_grace_s: float = Field(default=60.0, ge=0)
    """After Ctrl-C, how long ``run`` waits for paid jobs to land before it exits."""
    progress_interval_s: float = Field(default=30.0, gt=0)
    """When output is not a terminal, a progress line this often (and at each 10 %)."""
    report_previews: int = Field(default=200, ge=0)
    """Images with a preview in report.html: the first this many in manifest order (0: none).
    The store step makes them while the batch runs (every image of a line whose index is below
    this), so finalize only links them; what is missing then (a resumed batch, a failed
    write) finalize makes."""
    result_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    """How long a finished batch's summary stays in Redis for ``imagebatch status``."""

    webhook_url: str | None = None
    """Public base URL of ``imagebatch webhook``; set, APIFrame submits ask for webhooks."""
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(default=8787, ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    notify_url: str | None = None
    notify_secret: SecretStr | None = None
    inbox: str | None = None
    """A folder or ``s3://bucket/prefix`` that ``imagebatch schedule`` watches for manifests."""
    schedule: str = "*/5 * * * *"
    """Cron expression: when ``imagebatch schedule`` looks in the inbox."""

    crash_at: str | None = None
    """Test-only: a crash point of ``worker.lines.faults`` at which to SIGKILL the worker once."""
    crash_marker: str | None = None
    embedded_simulator_latency_s: float = Field(default=1.5, ge=0)
    """How long the simulator that ``run --provider simulator`` starts takes per job."""

    def webhook_callback_url(self) -> str | None:
        """The ``webhookUrl`` APIFrame submits carry: our public base URL plus our path."""
        if not self.webhook_url:
            return None
        return self.webhook_url.rstrip("/") + WEBHOOK_PATH

    def provider_spec(self, name: str) -> ProviderSpec:
        return REGISTRY[name]

    def provider_names(self) -> list[str]:
        return list(REGISTRY)

    def provider_config(self, name: str) -> ProviderConfig:
        """The per-provider slice of the settings; ``KeyError`` for an unknown provider.

        A provider on another's account (``same_account_as``: ``openai-batch`` on ``openai``)
        takes that one's key and base URL unless its own are set."""
        if name not in REGISTRY:
            raise KeyError(name)
        spec = REGISTRY[name]
        field = spec.field
        api_key, base_url = getattr(self, f"{field}_api_key"), getattr(self, f"{field}_base_url")
        if spec.same_account_as is not None:
            other = REGISTRY[spec.same_account_as].field
            if api_key is None:
                api_key = getattr(self, f"{other}_api_key")
            if f"{field}_base_url" not in self.model_fields_set:
                base_url = getattr(self, f"{other}_base_url")
        return ProviderConfig(
            name=name,
            base_url=base_url,
            api_key=api_key,
            max_in_flight=getattr(self, f"{field}_max_in_flight"),
            requests_per_second=getattr(self, f"{field}_requests_per_second"),
            timeout_s=getattr(self, f"{field}_timeout_s"),
            expected_latency_s=getattr(self, f"{field}_expected_latency_s"),
            submits_per_second=getattr(self, f"{field}_submits_per_second"),
            polls_per_second=getattr(self, f"{field}_polls_per_second"),
            configured=self._configured(field),
        )

    def group_config(self, name: str) -> GroupConfig:
        """A group provider's grouping, polling and fallback; ``KeyError`` for any other."""
        spec = REGISTRY[name]
        if not spec.group:
            raise KeyError(name)
        field = spec.field
        fallback = getattr(self, f"{field}_fallback")
        return GroupConfig(
            size=min(
                getattr(self, f"{field}_group_size"), self.provider_config(name).max_in_flight
            ),
            max_bytes=spec.group_max_bytes,
            poll_s=getattr(self, f"{field}_poll_s"),
            window_s=spec.group_window_s,
            fallback=spec.same_account_as if fallback else None,
        )

    def _configured(self, field: str) -> frozenset[Limit]:
        given = self.model_fields_set
        rate = f"{field}_requests_per_second" in given
        found: set[Limit] = set()
        if f"{field}_max_in_flight" in given:
            found.add("cap")
        if rate or f"{field}_submits_per_second" in given:
            found.add("submits")
        if rate or f"{field}_polls_per_second" in given:
            found.add("polls")
        return frozenset(found)

    def keyed(self) -> tuple[str, ...]:
        """The providers with a key set (the pool ``--provider auto`` draws from)."""
        return tuple(n for n in PROVIDER_NAMES if self.provider_config(n).api_key is not None)

    def usd_per_credit(self, name: str) -> float | None:
        """USD value of one credit of ``name`` (a credit-billing provider), if configured."""
        field = REGISTRY[name].field if name in REGISTRY else name
        value: float | None = getattr(self, f"usd_per_credit_{field}", None)
        return value

    def usd_rates(self) -> dict[str, float | None]:
        return {name: self.usd_per_credit(name) for name in REGISTRY}


def _provider_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for spec in REGISTRY.values():
        name = spec.field
        default_key = SecretStr(spec.default_api_key) if spec.default_api_key else None
        fields[f"{name}_api_key"] = (SecretStr | None, default_key)
        fields[f"{name}_base_url"] = (str, spec.base_url)
        fields[f"{name}_max_in_flight"] = (int, Field(default=spec.max_in_flight, ge=1))
        fields[f"{name}_requests_per_second"] = (
            float,
            Field(default=spec.requests_per_second, gt=0),
        )
        for kind in ("submits", "polls"):
            fields[f"{name}_{kind}_per_second"] = (float | None, Field(default=None, gt=0))
        fields[f"{name}_timeout_s"] = (float, Field(default=spec.timeout_s, gt=0))
        fields[f"{name}_expected_latency_s"] = (
            float,
            Field(default=spec.expected_latency_s, gt=0),
        )
        if spec.credit_unit == "credits":
            fields[f"usd_per_credit_{name}"] = (float | None, Field(default=None, gt=0))
        if spec.group:
            fields |= _group_fields(spec)
    return fields


def _group_fields(spec: ProviderSpec) -> dict[str, Any]:
    """A group provider's own settings: group size, poll interval, and the opt-in fallback."""
    name = spec.field
    return {
        f"{name}_group_size": (
            int,
            Field(default=spec.group_size, ge=1, le=spec.group_max_size),
        ),
        f"{name}_poll_s": (float, Field(default=spec.group_poll_s, gt=0)),
        f"{name}_fallback": (bool, False),
    }


if TYPE_CHECKING:
    Settings = CoreSettings
else:
    Settings = create_model("Settings", __base__=CoreSettings, **_provider_fields())
    """The one settings class: ``CoreSettings`` plus every provider's generated fields."""
    Settings.__doc__ = CoreSettings.__doc__


PREFIX = "IMAGEBATCH_"


def unknown_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> list[str]:
    """A warning for each ``IMAGEBATCH_*`` variable (environment or ``.env``) that no setting
    reads: pydantic-settings ignores them, so a typo (``IMAGEBATCH_MAX_ATEMPTS``) would
    otherwise run with the default without a word. Each names the closest real setting."""
    known = {PREFIX + name.upper() for name in Settings.model_fields}
    found: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        for name in dotenv_values(env_file):
            found.setdefault(name.upper(), f" in {env_file}")
    for name in os.environ if environ is None else environ:
        found[name.upper()] = ""
    warnings = []
    for name, where in sorted(found.items()):
        if not name.startswith(PREFIX) or name in known:
            continue
        suffix = name.removeprefix(PREFIX)
        names = {k.removeprefix(PREFIX): k for k in known}
        close = difflib.get_close_matches(suffix, list(names), n=1, cutoff=0.6)
        if close:
            hint = f"did you mean {names[close[0]]}?"
        else:
            best = max(names, key=lambda k: difflib.SequenceMatcher(None, suffix, k).ratio())
            hint = f"no setting is called that; the closest is {names[best]}"
        warnings.append(f"{name}{where} is not an imagebatch setting and is ignored ({hint})")
    return warnings
