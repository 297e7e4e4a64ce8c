"""``plan``'s time estimate, from the same model the scheduler runs by: each provider's
in-flight cap and request rate (submits and polls share it), and its expected job latency
(learned, else configured). Providers run side by side, so the slowest one sets the time."""

from __future__ import annotations

import math

from jobs import providers
from jobs.providers.base import Provider
from jobs.settings import CoreSettings
from worker.progress import duration
from worker.validation import Plan

__all__ = ["Adapters", "duration", "estimate_seconds"]

POLLS_PER_JOB = 1.2
"""What a learned first poll costs on average: most jobs are done at the first look."""
OVERHEAD_S = 2.0
"""Validating, seeding and finalizing a small batch."""


class Adapters:
    """Adapters for validating and pricing, one per provider (no key needed)."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.made: dict[str, Provider] = {}

    def __call__(self, name: str) -> Provider:
        if name not in self.made:
            self.made[name] = providers.build(name, self.settings)
        return self.made[name]


def latency_of(settings: CoreSettings, name: str) -> float:
    spec = settings.provider_spec(name)
    if spec.builtin_simulator and not settings.provider_config(name).base_url:
        return settings.embedded_simulator_latency_s
    return settings.provider_config(name).expected_latency_s


def estimate_seconds(settings: CoreSettings, plan: Plan, adapters: Adapters | None = None) -> float:
    adapters = adapters or Adapters(settings)
    slowest = 0.0
    for name, part in plan.by_provider.items():
        config = settings.provider_config(name)
        adapter = adapters(name)
        per_request = adapter.max_images_per_request
        jobs = part.images if per_request == 1 else part.lines
        latency = latency_of(settings, name)
        cap = max(1, min(config.max_in_flight, settings.worker_concurrency * 8))
        requests = jobs * (1 + (POLLS_PER_JOB if adapter.polled else 0))
        by_slots = math.ceil(jobs / cap) * latency
        by_rate = requests / config.requests_per_second
        slowest = max(slowest, by_slots, by_rate)
    return slowest + OVERHEAD_S if plan.valid else 0.0
