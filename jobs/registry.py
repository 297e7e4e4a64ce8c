"""Every provider imagebatch speaks, as one entry each: the one place a new provider is added.

A ``ProviderSpec`` holds what the rest of the code derives from: the settings fields
(``IMAGEBATCH_<NAME>_*``), the price table and credit unit behind ``plan`` and budgets, the
default limits the limiter starts from, the simulator surface that imitates the API, and the
adapter class (named by import path, so this module stays pure data and settings can import
it without importing every adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from jobs.pricing import PriceTable

CreditUnit = Literal["credits", "USD"]


@dataclass(frozen=True)
class ProviderSpec:
    """One provider: how to reach it, what it costs, how hard it may be pushed."""

    name: str
    description: str
    adapter: str
    """``module:Class`` of the adapter; resolved on first use."""
    base_url: str
    """Public base URL; empty for the built-in simulator, which ``run`` starts itself."""
    prices: PriceTable
    credit_unit: CreditUnit
    max_in_flight: int
    """Jobs (or synchronous calls) in flight at once, across all workers: the ceiling the
    adaptive limiter never exceeds."""
    requests_per_second: float
    timeout_s: float
    """Read timeout of one HTTP call: synchronous providers hold the call while they draw."""
    expected_latency_s: float
    """How long a job usually takes, until the limiter has learned it from real jobs."""
    simulator_surface: str
    """The built-in simulator's dialect that imitates this API (``imagebatch simulate``)."""
    default_api_key: str | None = None
    builtin_simulator: bool = False
    """True for ``--provider simulator``: the APIFrame adapter against a simulator started in
    the same process when no base URL is configured."""
    group: bool = False
    """A batch API (OpenAI's): lines go to the provider in groups, one provider job per group,
    finished within hours; never chosen by ``--provider auto``."""
    same_account_as: str | None = None
    """A provider whose key and base URL this one uses unless its own are set."""
    group_size: int = 0
    """A group provider's lines per provider job by default (``IMAGEBATCH_<NAME>_GROUP_SIZE``)."""
    group_max_size: int = 0
    """The most lines one provider job takes (OpenAI: 50,000 requests per batch)."""
    group_max_bytes: int = 0
    """The largest input file one provider job takes (OpenAI: 200 MB)."""
    group_poll_s: float = 0.0
    """How far apart a group's provider job is polled by default (it takes hours)."""
    group_window_s: float = 0.0
    """The provider's promise: a group's job ends within this long (OpenAI: 24 h)."""

    @property
    def field(self) -> str:
        """The provider's name as its settings spell it (``IMAGEBATCH_OPENAI_BATCH_*``)."""
        return self.name.replace("-", "_")


APIFRAME_PRICES = PriceTable({"low": 4, "medium": 9, "auto": 24, "high": 24}, "auto")
"""Credits per image of gpt-image-1.5 by quality (apiframe.ai/docs, the newer of its tables)."""


def synchronous(
    name: str,
    description: str,
    adapter: str,
    base_url: str,
    prices: PriceTable,
    credit_unit: CreditUnit,
    expected_latency_s: float,
) -> ProviderSpec:
    """An OpenAI-style provider: one long call returns the images, so its defaults keep few
    calls in flight (a worker's threads stay free) with a generous read timeout."""
    return ProviderSpec(
        name=name,
        description=description,
        adapter=adapter,
        base_url=base_url,
        prices=prices,
        credit_unit=credit_unit,
        max_in_flight=4,
        requests_per_second=2.0,
        timeout_s=180.0,
        expected_latency_s=expected_latency_s,
        simulator_surface=name,
    )


APIFRAME = ProviderSpec(
    name="apiframe",
    description="APIFrame API",
    adapter="jobs.providers.apiframe:APIFrame",
    base_url="https://api.apiframe.ai",
    prices=APIFRAME_PRICES,
    credit_unit="credits",
    max_in_flight=64,
    requests_per_second=20.0,
    timeout_s=30.0,
    expected_latency_s=15.0,
    simulator_surface="apiframe",
)

SIMULATOR = replace(
    APIFRAME,
    name="simulator",
    description="APIFrame API on the built-in simulator",
    base_url="",
    requests_per_second=50.0,
    expected_latency_s=1.5,
    default_api_key="afk_simulator",
    builtin_simulator=True,
)
"""``--provider simulator``: APIFrame's adapter and prices against the simulator ``run`` starts."""

OPENAI = synchronous(
    "openai",
    "OpenAI Images API",
    "jobs.providers.openai:OpenAI",
    "https://api.openai.com",
    PriceTable({"low": 0.009, "medium": 0.034, "high": 0.133, "auto": 0.133}, "auto"),
    "USD",
    expected_latency_s=30.0,
)

BATCH_SHARE = 0.5
"""OpenAI's Batch API bills half the synchronous price (docs/providers.md, "OpenAI's Batch API")."""

OPENAI_BATCH = ProviderSpec(
    name="openai-batch",
    description="OpenAI Batch API, half price, within 24 h",
    adapter="jobs.providers.openai_batch:OpenAIBatch",
    base_url=OPENAI.base_url,
    prices=PriceTable(
        {q: round(p * BATCH_SHARE, 6) for q, p in OPENAI.prices.per_image.items()},
        OPENAI.prices.default_quality,
    ),
    credit_unit="USD",
    # Requests in open OpenAI batches at once (two groups of the default size): it bounds
    # the lines the batch holds in Redis and how many OpenAI batches run side by side.
    max_in_flight=20_000,
    requests_per_second=2.0,
    timeout_s=OPENAI.timeout_s,
    expected_latency_s=3600.0,
    simulator_surface="openai",
    group=True,
    same_account_as="openai",
    group_size=10_000,
    group_max_size=50_000,
    group_max_bytes=200 * 1024 * 1024,
    group_poll_s=300.0,
    group_window_s=24 * 3600.0,
)
"""``--provider openai-batch``: the same account and images as ``openai``, in groups."""

SPECS: tuple[ProviderSpec, ...] = (
    APIFRAME,
    OPENAI,
    OPENAI_BATCH,
    # AI/ML API bills in its own credits; its docs default quality to medium.
    synchronous(
        "aimlapi",
        "AI/ML API",
        "jobs.providers.aimlapi:AIMLAPI",
        "https://api.aimlapi.com",
        PriceTable({"low": 23.4, "medium": 88.4, "high": 345.8}, "medium"),
        "credits",
        expected_latency_s=30.0,
    ),
    synchronous(
        "omixa",
        "Omixa gateway",
        "jobs.providers.omixa:Omixa",
        "https://www.omixa.cloud",
        PriceTable({"low": 0.011, "medium": 0.039, "high": 0.156, "auto": 0.039}, "auto"),
        "USD",
        expected_latency_s=30.0,
    ),
    synchronous(
        "oxen",
        "Oxen.ai",
        "jobs.providers.oxen:Oxen",
        "https://hub.oxen.ai",
        PriceTable({"low": 0.011, "medium": 0.042, "high": 0.167, "auto": 0.042}, "auto"),
        "USD",
        expected_latency_s=20.0,
    ),
    SIMULATOR,
)

REGISTRY: dict[str, ProviderSpec] = {spec.name: spec for spec in SPECS}


def names() -> list[str]:
    return list(REGISTRY)


def spec(name: str) -> ProviderSpec:
    """The spec of ``name``; ``KeyError`` for a provider imagebatch does not know."""
    return REGISTRY[name]
