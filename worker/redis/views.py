"""``State``'s part for reading the fleet whole: a batch's window by where its lines wait, every
active batch and provider in two round trips (``status``, the metrics' scrape), the broker's
queue depth and which workers are alive. Reads only, never a read per line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker.redis import keys
from worker.redis.pools import Health
from worker.redis.scripts import Scripted


@dataclass(frozen=True)
class BatchView:
    batch: str
    total: int | None
    status: str
    counters: dict[str, float]
    out: dict[str, str] = field(default_factory=dict)
    """Providers that left the batch's pool, each with why."""


@dataclass(frozen=True)
class Window:
    """A batch's lines in Redis by where they wait (``records.TABLE`` homes)."""

    ready: int
    """READY: admitted, not submitted (or waiting to be submitted again)."""
    flight: int
    """SUBMITTING or SUBMITTED: holding a provider slot, bought or being bought."""
    store: int
    """FETCHED: the images are ready and being stored."""


@dataclass(frozen=True)
class ProviderView:
    provider: str
    in_flight: int
    waiting: int
    limits: dict[str, str]
    health: Health = field(default_factory=Health)


@dataclass(frozen=True)
class Fleet:
    batches: list[BatchView]
    providers: list[ProviderView]


class Views(Scripted):
    """Reads of the whole fleet (a part of ``State``)."""

    def window(self, b: str) -> Window:
        """The batch's lines by where they wait, in two round trips whatever the window's size:
        the providers, then one pipeline reading their sorted sets (a window's worth of
        members each; never a read per line)."""
        first = self.client.pipeline(transaction=False)
        first.smembers(keys.PROVIDERS)
        first.smembers(keys.POOLS)
        provider_set, pool_set = first.execute()
        providers = sorted(provider_set)
        pools = [m.removeprefix(b) for m in pool_set if m.startswith(b + "@")]
        pipe = self.client.pipeline(transaction=False)
        for queue in (*providers, *pools):
            pipe.zcard(keys.ready(b, queue))
        for provider in providers:
            pipe.zrange(keys.flight(provider), 0, -1)
        pipe.zrange(keys.STORE, 0, -1)
        answers = pipe.execute()
        queues = len(providers) + len(pools)
        prefix = keys.member(b, 0).rsplit(" ", 1)[0] + " "

        def mine(members: list[str]) -> int:
            return sum(1 for member in members if member.startswith(prefix))

        return Window(
            ready=sum(int(n) for n in answers[:queues]),
            flight=sum(mine(members) for members in answers[queues:-1]),
            store=mine(answers[-1]),
        )

    def fleet(self) -> Fleet:
        """Every active batch's record and counters and every provider's slots and limits, in
        two round trips (``2 + 2 * batches + providers * (2 + batches)`` commands, none per
        line)."""
        first = self.client.pipeline(transaction=False)
        first.smembers(keys.BATCHES)
        first.smembers(keys.PROVIDERS)
        batch_set, provider_set = first.execute()
        batches, providers = sorted(batch_set), sorted(provider_set)
        second = self.client.pipeline(transaction=False)
        for b in batches:
            second.hmget(keys.batch(b), ["total", "status"])
            second.hgetall(keys.counters(b))
            second.hgetall(keys.out(b))
        for p in providers:
            second.zcard(keys.flight(p))
            second.hgetall(keys.limit(p))
            second.hmget(keys.health(p), ["until", "probe", "failures"])
            for b in batches:
                second.zcard(keys.ready(b, p))
        answers = iter(second.execute())
        views = []
        for b in batches:
            total, status = next(answers)
            counters = {k: float(v) for k, v in next(answers).items()}
            out = dict(next(answers))
            views.append(BatchView(b, int(total) if total else None, status or "", counters, out))
        slots = []
        for p in providers:
            in_flight, limits = int(next(answers)), dict(next(answers))
            until, probe, failures = (float(v or 0) for v in next(answers))
            waiting = sum(int(next(answers)) for _ in batches)
            health = Health(until, probe, int(failures))
            slots.append(ProviderView(p, in_flight, waiting, limits, health))
        return Fleet(views, slots)

    def queue_depth(self) -> int:
        """Celery messages waiting (this client is on the broker's Redis)."""
        return int(self.client.llen(keys.QUEUE))

    def worker_alive(self, host: str, pid: int, ttl: float) -> None:
        self.client.set(keys.worker(host, pid), repr(time.time()), px=int(ttl * 1000))

    def worker_seen(self, host: str) -> bool:
        return any(self.client.scan_iter(match=keys.workers(host)))

    def workers_alive(self) -> int:
        return sum(1 for _ in self.client.scan_iter(match=keys.workers()))
