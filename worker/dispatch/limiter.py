"""A provider's request budget and in-flight cap, as the scheduler hands out work.

Both adapt to the account (AIMD): a 429 cuts them at once (``limit.lua``, run by the task that
saw it, shared by every worker through ``ib:limit:P``); a limit that has been the binding one
for a while without a 429 creeps back up, never past the configured ceiling. The token bucket
itself lives with the scheduler, the only process that dispatches requests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from jobs.settings import CoreSettings
from worker.redis.state import State

RAISE_EVERY_S = 30.0
"""A limit is raised at most this often, and only after this long without a 429: one probe
past the account's real limit costs about one 429 per half minute."""
REFRESH_S = 1.0


@dataclass
class Bucket:
    """One provider's limits as the scheduler sees them."""

    provider: str
    ceiling_cap: int
    ceiling_rate: float
    cap: int
    rate: float
    pause_until: float = 0.0
    changed_at: float = 0.0
    tokens: float = 0.0
    stamp: float = 0.0
    loaded_at: float = -math.inf
    cap_bound_since: float | None = None
    """Since when the cap has held work back without a break (None: it does not now)."""
    rate_bound_since: float | None = None

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    @property
    def burst(self) -> float:
        return max(1.0, min(self.rate, float(self.cap)))

    def budget(self, now: float) -> int:
        """Requests that may go out now (none while a Retry-After pause lasts)."""
        self.refill(now)
        return 0 if now < self.pause_until else int(self.tokens)

    def spend(self, count: int) -> None:
        self.tokens -= count

    def next_token_in(self, now: float) -> float:
        if now < self.pause_until:
            return self.pause_until - now
        return max(0.0, (1 - self.tokens) / self.rate)


class Limiter:
    """Every provider's bucket, refreshed from Redis about once a second."""

    def __init__(self, state: State, settings: CoreSettings) -> None:
        self.state, self.settings = state, settings
        self.buckets: dict[str, Bucket] = {}

    def bucket(self, provider: str, now: float, *, force: bool = False) -> Bucket:
        config = self.settings.provider_config(provider)
        bucket = self.buckets.get(provider)
        if bucket is None:
            bucket = Bucket(
                provider,
                config.max_in_flight,
                config.requests_per_second,
                config.max_in_flight,
                config.requests_per_second,
                stamp=now,
            )
            bucket.tokens = bucket.burst
            self.buckets[provider] = bucket
        if force or now - bucket.loaded_at >= REFRESH_S:
            self._load(bucket, now)
        return bucket

    def _load(self, bucket: Bucket, now: float) -> None:
        saved = self.state.limits(bucket.provider)
        bucket.loaded_at = now
        if not saved:
            return
        bucket.cap = min(bucket.ceiling_cap, max(1, int(float(saved.get("cap", bucket.cap)))))
        bucket.rate = min(bucket.ceiling_rate, float(saved.get("rate", bucket.rate)))
        bucket.pause_until = float(saved.get("pause_until", 0))
        bucket.changed_at = max(
            float(saved.get("decreased_at", 0)), float(saved.get("raised_at", 0))
        )
        bucket.tokens = min(bucket.tokens, bucket.burst)

    def raise_if_due(
        self, bucket: Bucket, now: float, *, cap_bound: bool, rate_bound: bool
    ) -> None:
        """Additive increase: a limit that has held work back for ``RAISE_EVERY_S`` without a
        break, and without a 429, goes up one step (the cap by one job, the rate by 5 % of its
        ceiling)."""
        bucket.cap_bound_since = _since(bucket.cap_bound_since, cap_bound, now)
        bucket.rate_bound_since = _since(bucket.rate_bound_since, rate_bound, now)
        quiet = now - bucket.changed_at >= RAISE_EVERY_S

        def due(since: float | None) -> bool:
            return quiet and since is not None and now - since >= RAISE_EVERY_S

        raised = False
        if due(bucket.cap_bound_since) and bucket.cap < bucket.ceiling_cap:
            bucket.cap += 1
            raised = True
        if due(bucket.rate_bound_since) and bucket.rate < bucket.ceiling_rate:
            step = max(0.25, 0.05 * bucket.ceiling_rate)
            bucket.rate = min(bucket.ceiling_rate, bucket.rate + step)
            raised = True
        if raised:
            bucket.changed_at = now
            bucket.cap_bound_since = bucket.rate_bound_since = None
            self.state.set_limits(
                bucket.provider, cap=bucket.cap, rate=bucket.rate, raised_at=time.time()
            )


def _since(since: float | None, binding: bool, now: float) -> float | None:
    if not binding:
        return None
    return now if since is None else since
