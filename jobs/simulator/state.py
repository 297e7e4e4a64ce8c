"""Everything the simulated providers remember: jobs, billing, idempotency, limits, fault RNG.

Job progress is a pure function of time since creation, so no background thread is needed
for it (only webhook deliveries have one, in ``webhooks``); refunds and in-flight counts are
settled lazily from a heap of job end times.
"""

from __future__ import annotations

import heapq
import math
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from jobs.simulator import prices
from jobs.simulator.config import SimulatorConfig
from jobs.simulator.core import number


class Marker(StrEnum):
    """A word in a prompt that makes the simulator misbehave for that line, on purpose."""

    POLICY = "[[policy]]"
    FAIL_ONCE = "[[fail-once]]"
    NEVER_FINISH = "[[never-finish]]"
    CORRUPT = "[[corrupt]]"
    SLOW = "[[slow]]"


SLOW_FACTOR = 5
POLICY_ERROR = "Content policy violation: the request was flagged by the safety system"
TRANSIENT_ERROR = "Upstream provider timeout"
IDEMPOTENCY_WINDOW_S = 24 * 3600
LimitCause = Literal["concurrency", "rate", "read_rate", "fault"]
LIMIT_CAUSES: tuple[LimitCause, ...] = ("concurrency", "rate", "read_rate", "fault")
"""Why a 429 was served: the in-flight cap, the request-rate bucket (``rate``: submits, or all
requests with scope ``all``; ``read_rate``: the rest with scope ``submits``), or a fault."""
WEBHOOK_COUNTS = ("sent", "delivered", "failed", "dropped")


def price(provider: str, model: str, quality: str | None, size: str, n: int) -> float:
    """The charge for ``n`` images of ``size``, from the simulator's own table (``prices``)."""
    return prices.charge(provider, model, quality, size, n)


@dataclass(frozen=True)
class Spend:
    """One request's draw on a rate-limit bucket, and the bucket as it is left."""

    cause: LimitCause
    rps: float
    wait: float | None
    """Seconds until a token is free when the request was refused, else None."""
    remaining: int
    """Whole tokens left after this request."""
    full_in: float
    """Seconds until the bucket is full again."""


@dataclass
class Webhook:
    """A job's ``webhookUrl`` and ``webhookEvents``, and how their deliveries went."""

    url: str
    events: tuple[str, ...]
    status: str | None = None
    """``pending`` while deliveries are outstanding, then ``delivered`` or ``failed``."""
    outstanding: int = 0
    expected: set[str] = field(default_factory=set)
    delivered: set[str] = field(default_factory=set)


@dataclass
class Job:
    """One accepted, billed generation: an APIFrame job or a synchronous call."""

    id: str
    provider: str
    model: str
    prompt: str
    api_key: str
    width: int
    height: int
    fmt: str
    n: int
    cost: float
    base_url: str
    created: float
    created_wall: float
    duration: float
    transparent: bool = False
    failure: str | None = None
    never_finish: bool = False
    corrupt: bool = False
    idempotency_key: str | None = None
    input: dict[str, Any] | None = None
    dropped: bool = False
    purged: bool = False
    tiny: bool = False
    """Rendered small (``image_mode: tiny``), fixed when the job is created."""
    webhook: Webhook | None = None
    fetched: set[int] = field(default_factory=set)
    """Images already asked for on the CDN (the ``cdn_lag`` fault hits first GETs only)."""

    @property
    def ends(self) -> float:
        return math.inf if self.never_finish else self.created + self.duration

    @property
    def created_ms(self) -> int:
        """Creation time in whole Unix milliseconds, as ``createdAt`` shows it."""
        return round(self.created_wall * 1000)

    @property
    def completed_ms(self) -> int:
        """``created_ms`` plus the duration in whole ms, so ``completedAt - createdAt`` is exact."""
        return self.created_ms + round(self.duration * 1000)

    def status(self, now: float) -> str:
        elapsed = now - self.created
        if now >= self.ends:
            return "FAILED" if self.failure else "COMPLETED"
        return "QUEUED" if elapsed < 0.2 * self.duration else "PROCESSING"

    def progress(self, now: float) -> int:
        status = self.status(now)
        if status != "PROCESSING":
            return 100 if status == "COMPLETED" else 0
        if self.duration <= 0:  # a job of no duration that has not ended never finishes
            return 0
        share = (now - self.created - 0.2 * self.duration) / (0.8 * self.duration)
        return max(0, min(99, int(share * 100)))

    def credit_cost(self, now: float) -> float:
        return 0 if self.status(now) == "FAILED" else self.cost

    def expired(self, now: float, ttl: float | None) -> bool:
        if self.status(now) != "COMPLETED":
            return False
        return self.purged or (ttl is not None and now >= self.ends + ttl)

    def image_urls(self) -> list[str]:
        return [
            f"{self.base_url}/cdn/images/{self.id}-{k}.{self.fmt}" for k in range(1, self.n + 1)
        ]

    def result(self, shape: str) -> Any:
        """APIFrame's ``result``: ``{"images": [...]}``, or one URL string (older docs)."""
        urls = self.image_urls()
        return urls[0] if shape == "string" and len(urls) == 1 else {"images": urls}


class State:
    """Shared, lock-guarded simulator memory. Call methods with ``lock`` held where noted."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.config = config
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.rng = random.Random(self.config.faults.seed)
            self.jobs: dict[str, Job] = {}
            self.idempotency: dict[tuple[str, str], tuple[str, str, float]] = {}
            self.fail_once_seen: set[tuple[str, str]] = set()
            self.requests: Counter[str] = Counter()
            self.charged: defaultdict[str, float] = defaultdict(float)
            self.refunded: defaultdict[str, float] = defaultdict(float)
            self.replays = 0
            self._active: list[tuple[float, str]] = []
            self._active_count: Counter[str] = Counter()
            self._buckets: dict[tuple[str, LimitCause], tuple[float, float]] = {}
            self.images: Counter[str] = Counter()
            """Images billed per provider, net of refunds (for ``max_images``)."""
            self.limited: Counter[tuple[str, LimitCause]] = Counter()
            self.webhooks: Counter[str] = Counter()

    def update(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        with self.lock:
            new = SimulatorConfig.from_mapping(changes, self.config)
            if new.faults.seed != self.config.faults.seed:
                self.rng = random.Random(new.faults.seed)
            self.config = new
            return new

    def fault(self, name: str) -> bool:
        """Draw the named fault from the seeded RNG (no draw at all when its probability is 0)."""
        p: float = getattr(self.config.faults, name)
        with self.lock:
            return p > 0 and self.rng.random() < p

    def duration(self, prompt: str, base: float, jitter: float) -> float:
        with self.lock:
            value = base + (self.rng.uniform(0, jitter) if jitter > 0 else 0.0)
        return value * (SLOW_FACTOR if Marker.SLOW in prompt else 1)

    def first_failure(self, provider: str, prompt: str) -> bool:
        """True for the first job of a ``[[fail-once]]`` prompt at this provider."""
        with self.lock:
            key = (provider, prompt)
            if Marker.FAIL_ONCE not in prompt or key in self.fail_once_seen:
                return False
            self.fail_once_seen.add(key)
            return True

    def take_token(self, provider: str, paid: bool = True, *, spend: bool = True) -> Spend | None:
        """Draw one token from the bucket this request spends (None: no limit applies to it).

        ``paid``: a generation submit; with scope ``submits`` the others use the read bucket.
        ``spend=False`` only reads the bucket, for answers given before the limiter is reached.
        """
        config = self.config.for_provider(provider)
        cause: LimitCause
        if config.rate_limit_scope == "submits" and not paid:
            cause, rps = "read_rate", config.read_rate_limit_rps
        else:
            cause, rps = "rate", config.rate_limit_rps
        if rps is None:
            return None
        burst = config.rate_limit_burst if cause == "rate" else max(1, int(rps))
        with self.lock:
            now = time.monotonic()
            tokens, last = self._buckets.get((provider, cause), (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rps)
            wait = (1 - tokens) / rps if tokens < 1 else None
            if wait is None and spend:
                tokens -= 1
            self._buckets[provider, cause] = (tokens, now)
        return Spend(cause, rps, wait, int(tokens), (burst - tokens) / rps)

    def settle(self, now: float) -> None:
        """Retire jobs that have ended: free their slot and refund the failed ones."""
        with self.lock:
            while self._active and self._active[0][0] <= now:
                _, job_id = heapq.heappop(self._active)
                job = self.jobs[job_id]
                self._active_count[job.provider] -= 1
                if job.failure:
                    self.refunded[job.provider] += job.cost
                    self.images[job.provider] -= job.n

    def in_flight(self, provider: str, now: float) -> tuple[int, float]:
        """Non-terminal jobs of ``provider`` and the seconds until the first of them ends."""
        with self.lock:
            self.settle(now)
            ends = [end for end, jid in self._active if self.jobs[jid].provider == provider]
            wait = min(ends, default=now + 1) - now
            return self._active_count[provider], wait if math.isfinite(wait) else 1.0

    def remaining(self, provider: str) -> float | None:
        credits = self.config.for_provider(provider).credits
        if credits is None:
            return None
        with self.lock:
            self.settle(time.monotonic())
            spent = self.charged.get(provider, 0.0) - self.refunded.get(provider, 0.0)
            left = credits - spent
            return round(left, 6)

    def shortfall(self, provider: str, cost: float, n: int) -> float | None:
        """None when the account can pay ``cost`` for ``n`` images, else the credits it has
        (with ``max_images``, the price of the images it may still be billed for)."""
        with self.lock:
            available = self.remaining(provider)
            if available is not None and cost > available:
                return available
            cap = self.config.overrides(provider).max_images
            if cap is None:
                return None
            self.settle(time.monotonic())
            left = cap - self.images[provider]
            if n <= left:
                return None
            allowed = round(cost / n * max(0, left), 6)
            return allowed if available is None else min(allowed, available)

    def add(self, job: Job) -> None:
        """Record an accepted job and charge for it."""
        with self.lock:
            self.jobs[job.id] = job
            self.charged[job.provider] += job.cost
            self.images[job.provider] += job.n
            self._active_count[job.provider] += 1
            heapq.heappush(self._active, (job.ends, job.id))

    def record(self, key: str) -> None:
        with self.lock:
            self.requests[key] += 1

    def count_429(self, provider: str, cause: LimitCause) -> None:
        with self.lock:
            self.limited[provider, cause] += 1

    def count_webhook(self, outcome: str, n: int = 1) -> None:
        with self.lock:
            self.webhooks[outcome] += n

    def _limits(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        totals: dict[str, int] = {cause: 0 for cause in LIMIT_CAUSES}
        by_provider: dict[str, dict[str, int]] = {}
        for (provider, cause), n in sorted(self.limited.items()):
            totals[cause] += n
            by_provider.setdefault(provider, {c: 0 for c in LIMIT_CAUSES})[cause] += n
        return totals, by_provider

    def ledger(self) -> dict[str, Any]:
        now = time.monotonic()
        with self.lock:
            self.settle(now)
            limited, limited_by_provider = self._limits()
            return {
                "submits": len(self.jobs),
                "replays": self.replays,
                "requests": dict(sorted(self.requests.items())),
                "credits_charged": {p: number(round(v, 6)) for p, v in self.charged.items()},
                "credits_refunded": {p: number(round(v, 6)) for p, v in self.refunded.items()},
                "credits_remaining": {p: self.remaining(p) for p in self.charged},
                "rate_limited": limited,
                "rate_limited_by_provider": limited_by_provider,
                "webhooks": {k: self.webhooks[k] for k in WEBHOOK_COUNTS},
                "jobs": [
                    {
                        "id": job.id,
                        "provider": job.provider,
                        "prompt": job.prompt,
                        "idempotency_key": job.idempotency_key,
                        "status": job.status(now),
                        "credit_cost": number(job.credit_cost(now)),
                        "images": job.n,
                        "dropped": job.dropped,
                        "webhook_status": job.webhook.status if job.webhook else None,
                        "created_ms": job.created_ms,
                        "duration_s": job.duration,
                    }
                    for job in self.jobs.values()
                ],
            }
