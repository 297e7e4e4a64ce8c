"""All configuration, read once from the environment (prefix ``IMAGEBATCH_``) or ``.env``.

Nothing else in the code base reads ``os.environ``: the settings object is built at the edge
(the CLI, a worker process) and passed down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROVIDER_NAMES = ("apiframe", "openai", "aimlapi", "omixa", "oxen")
"""Every real provider; each has ``IMAGEBATCH_<NAME>_API_KEY`` / ``_BASE_URL`` / limits."""

DEFAULT_BASE_URLS = {
    "apiframe": "https://api.apiframe.ai",
    "openai": "https://api.openai.com",
    "aimlapi": "https://api.aimlapi.com",
    "omixa": "https://www.omixa.cloud",
    "oxen": "https://hub.oxen.ai",
}


@dataclass(frozen=True)
class ProviderConfig:
    """What one adapter needs: where, who, how fast, how many at once."""

    name: str
    base_url: str
    api_key: SecretStr | None
    max_in_flight: int
    requests_per_second: float
    timeout_s: float

    def __repr__(self) -> str:
        key = "set" if self.api_key is not None else "unset"
        return f"ProviderConfig(name={self.name!r}, base_url={self.base_url!r}, api_key=<{key}>)"


class Settings(BaseSettings):
    """The one settings class. Secrets are ``SecretStr`` and never printed."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGEBATCH_", env_file=".env", extra="ignore", frozen=True
    )

    broker_url: str | None = None
    redis_url: str | None = None
    provider: str | None = None
    out: str = "./out"
    s3_endpoint_url: str | None = None

    apiframe_api_key: SecretStr | None = None
    apiframe_base_url: str = DEFAULT_BASE_URLS["apiframe"]
    apiframe_max_in_flight: int = Field(default=64, ge=1)
    apiframe_requests_per_second: float = Field(default=20.0, gt=0)
    apiframe_timeout_s: float = Field(default=30.0, gt=0)

    openai_api_key: SecretStr | None = None
    openai_base_url: str = DEFAULT_BASE_URLS["openai"]
    openai_max_in_flight: int = Field(default=4, ge=1)
    openai_requests_per_second: float = Field(default=2.0, gt=0)
    openai_timeout_s: float = Field(default=180.0, gt=0)

    aimlapi_api_key: SecretStr | None = None
    aimlapi_base_url: str = DEFAULT_BASE_URLS["aimlapi"]
    aimlapi_max_in_flight: int = Field(default=4, ge=1)
    aimlapi_requests_per_second: float = Field(default=2.0, gt=0)
    aimlapi_timeout_s: float = Field(default=180.0, gt=0)

    omixa_api_key: SecretStr | None = None
    omixa_base_url: str = DEFAULT_BASE_URLS["omixa"]
    omixa_max_in_flight: int = Field(default=4, ge=1)
    omixa_requests_per_second: float = Field(default=2.0, gt=0)
    omixa_timeout_s: float = Field(default=180.0, gt=0)

    oxen_api_key: SecretStr | None = None
    oxen_base_url: str = DEFAULT_BASE_URLS["oxen"]
    oxen_max_in_flight: int = Field(default=4, ge=1)
    oxen_requests_per_second: float = Field(default=2.0, gt=0)
    oxen_timeout_s: float = Field(default=180.0, gt=0)

    simulator_base_url: str | None = None
    """Where ``--provider simulator`` lines go when workers are remote (``imagebatch simulate``)."""

    max_attempts: int = Field(default=3, ge=1)
    """Provider jobs per line: a transient FAILED job is resubmitted until this many were tried."""
    max_deliveries: int = Field(default=5, ge=1)
    """A step that keeps killing its worker is given up after this many starts (poison line)."""
    line_deadline_s: float = Field(default=1800.0, gt=0)
    poll_initial_s: float = Field(default=2.0, gt=0)
    poll_max_s: float = Field(default=10.0, gt=0)
    retry_base_s: float = Field(default=1.0, ge=0)
    """Base of the full-jitter exponential backoff; 0 removes backoff (tests)."""
    retry_max_s: float = Field(default=60.0, ge=0)
    http_retries: int = Field(default=4, ge=0)
    """Transport/5xx/429 retries of one HTTP call before the line's attempt is given up."""
    download_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    visibility_timeout_s: int = Field(default=3600, ge=10)
    worker_concurrency: int = Field(default=16, ge=1)
    step_lease_s: float = Field(default=300.0, gt=0)
    """How long one task may own a line; a redelivered copy waits until the lease ends."""
    sweep_interval_s: float = Field(default=10.0, gt=0)
    sweep_grace_s: float = Field(default=60.0, ge=0)
    """A line whose next step is this late (and unleased) has its step queued again."""
    result_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    """How long a finished batch's summary stays in Redis for ``imagebatch status``."""
    crash_at: str | None = None
    """Test-only: a crash point of ``worker.faults`` at which to SIGKILL the worker once."""
    crash_marker: str | None = None
    embedded_simulator_latency_s: float = Field(default=1.5, ge=0)

    def provider_config(self, name: str) -> ProviderConfig:
        """The per-provider slice of the settings; ``simulator`` is APIFrame at the simulator."""
        if name == "simulator":
            base = self.simulator_base_url or ""
            return ProviderConfig("simulator", base, SecretStr("afk_simulator"), 64, 50.0, 30.0)
        if name not in PROVIDER_NAMES:
            raise KeyError(name)
        values: dict[str, Any] = {
            field: getattr(self, f"{name}_{field}")
            for field in (
                "base_url",
                "api_key",
                "max_in_flight",
                "requests_per_second",
                "timeout_s",
            )
        }
        return ProviderConfig(name=name, **values)
