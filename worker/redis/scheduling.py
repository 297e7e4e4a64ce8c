"""``State``'s part for the scheduler: ``pump.lua`` hands out a provider's due polls and READY
lines within its cap and token buckets, ``claim.lua`` the due stores; the adaptive limits
(``limit.lua`` counts a 429, the controller reads and writes the rest); the latencies the
fleet has learned per provider and model; and the wake-up list the scheduler blocks on."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from worker.lines.records import LineStatus
from worker.redis import keys
from worker.redis.scripts import Scripted, text


@dataclass(frozen=True)
class Pumped:
    """What ``pump.lua`` handed out for one provider."""

    polls: list[tuple[str, int, int, LineStatus]]
    """(batch, idx, seq, status) of due flight lines: polls, or steps whose lease ran out."""
    submits: list[tuple[str, int, int]]
    in_flight: int
    next_flight: float | None
    next_ready: float | None
    binding: Binding
    submit_wait: float
    """Seconds until a submit may go out (the next token, or the end of a pause)."""
    poll_wait: float
    deferred: bool = False
    """A pool's lines were left to a cheaper member that could take them: if it does not
    (it pumps next), this provider should look again."""


@dataclass(frozen=True)
class Binding:
    """Which of a provider's limits held due work back in a pump: what the controller grows."""

    submits: bool = False
    polls: bool = False
    cap: bool = False


class Scheduling(Scripted):
    """The scheduler's reads and scripts (a part of ``State``)."""

    def providers(self) -> set[str]:
        return set(self.client.smembers(keys.PROVIDERS))

    def pump(
        self,
        provider: str,
        now: float,
        lease: float,
        *,
        polls: int,
        submits: int,
        defaults: tuple[int, float, float],
        lead: float = 0.0,
    ) -> Pumped:
        """Hand out up to ``polls`` due polls and ``submits`` READY lines of ``provider``, within
        its cap and each kind's token bucket (``pump.lua``). ``defaults`` (cap, submit rate,
        poll rate) count until the controller has written its own; a poll due within ``lead``
        seconds counts as due."""
        cap, submit_rate, poll_rate = defaults
        got_polls, got_submits, in_flight, nf, nr, binding, sw, pw, deferred = self._run(
            "pump",
            [
                keys.limit(provider),
                keys.flight(provider),
                keys.queues(provider),
                keys.POOLS,
                keys.health(provider),
            ],
            [
                repr(now),
                lease,
                keys.LINE_FORMAT,
                keys.READY_FORMAT,
                provider,
                polls,
                submits,
                cap,
                repr(submit_rate),
                repr(poll_rate),
                keys.OUT_FORMAT,
                keys.HEALTH_FORMAT,
                keys.LIMIT_FORMAT,
                keys.FLIGHT_FORMAT,
                repr(lead),
            ],
        )
        return Pumped(
            [(*keys.parse_member(m), int(seq), LineStatus(st)) for m, seq, st in got_polls],
            [(*keys.parse_member(m), int(seq)) for m, seq in got_submits],
            int(in_flight),
            float(nf) if nf else None,
            float(nr) if nr else None,
            Binding(*(bool(int(flag)) for flag in binding)),
            float(sw),
            float(pw),
            bool(deferred),
        )

    def claim_stores(
        self, now: float, lease: float, most: int
    ) -> tuple[list[tuple[str, int, int]], float | None]:
        claimed, nxt = self._run("claim", [keys.STORE], [repr(now), lease, most, keys.LINE_FORMAT])
        return [(*keys.parse_member(m), int(seq)) for m, seq in claimed], (
            float(nxt) if nxt else None
        )

    def in_flight(self, provider: str) -> int:
        return int(self.client.zcard(keys.flight(provider)))

    def waiting(self, provider: str) -> int:
        """READY lines of every batch for ``provider``."""
        batches = self.client.smembers(keys.queues(provider))
        pipe = self.client.pipeline(transaction=False)
        for b in batches:
            pipe.zcard(keys.ready(b, provider))
        return sum(int(n) for n in pipe.execute())

    def limits(self, provider: str) -> dict[str, str]:
        return self.client.hgetall(keys.limit(provider))

    def set_limits(self, provider: str, **values: Any) -> None:
        self.client.hset(keys.limit(provider), mapping={k: text(v) for k, v in values.items()})

    def note_429(
        self, provider: str, request: str, *, cap: int | None, retry_after: float | None
    ) -> None:
        """Count a 429 of ``request`` (``submit`` or ``poll``) for the controller; ``cap``: a
        concurrency 429's cap, set at once (``limit.lua``)."""
        args = [request, "" if cap is None else cap, "" if retry_after is None else retry_after]
        self._run("limit", [keys.limit(provider)], args)
        self.client.lpush(keys.WAKE, "limit")

    def take_counts(self, provider: str) -> dict[str, str]:
        """The provider's limits and counters, the largest Retry-Afters since the last take
        reset (the controller's once-a-second read)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(keys.limit(provider))
        pipe.hdel(keys.limit(provider), "submit_retry_after", "poll_retry_after")
        found, _ = pipe.execute()
        return dict(found)

    def wait_for_wake(self, timeout: float) -> frozenset[str]:
        """Block up to ``timeout`` for the scheduler's next event; the events that came. Until
        then, a poll due sooner wakes it (``apply.lua``, ``due``)."""
        if timeout <= 0:
            return frozenset()
        self.client.set(keys.WAKE_AT, repr(time.time() + timeout))
        got = self.client.blpop([keys.WAKE], timeout=max(0.01, timeout))
        return frozenset() if got is None else frozenset({got[1]})

    def drain_wakes(self) -> frozenset[str]:
        """Every event waiting, taken off the list at once."""
        pipe = self.client.pipeline(transaction=True)
        pipe.lrange(keys.WAKE, 0, -1)
        pipe.delete(keys.WAKE)
        found, _ = pipe.execute()
        return frozenset(found)

    def wake(self, reason: str) -> None:
        self.client.lpush(keys.WAKE, reason)

    def learned_latencies(self, provider: str) -> list[float]:
        """The expected latency of every model the fleet has learned at ``provider``."""
        prefix = keys.latency(provider, "")
        found = (
            self.expected_latency(provider, key.removeprefix(prefix))
            for key in self.client.scan_iter(match=prefix + "*")
        )
        return [x for x in found if x is not None]

    def expected_latency(self, provider: str, model: str) -> float | None:
        return self.learned_job(provider, model)[0]

    def learned_job(self, provider: str, model: str) -> tuple[float | None, float | None]:
        """A model's learned job: its expected latency (mean plus half the mean deviation) and
        the share of its time before its progress starts (None: not learned yet)."""
        mean, dev, queue = self.client.hmget(
            keys.latency(provider, model), ["mean", "dev", "queue"]
        )
        expected = None if mean is None else float(mean) + 0.5 * float(dev or 0)
        return expected, None if queue is None else float(queue)
