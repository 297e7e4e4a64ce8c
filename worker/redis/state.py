"""Typed access to imagebatch's Redis state: the keys of ``worker.keys``, the scripts of
``worker/redis/lua``. Callers never build a key or send a raw command themselves.

Every change that must not happen twice (a transition, an admission, a budget hold, a slot)
is one Lua script, so concurrent workers and stale message copies cannot double count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.lock import Lock

from jobs.pricing import currency
from jobs.registry import REGISTRY
from worker.lines.records import TABLE, Home, LineRecord, LineStatus, Transition, encode_changes
from worker.redis import keys
from worker.redis.claims import Claim
from worker.redis.groups import GroupStore

LUA = Path(__file__).with_name("lua")


def home_key(home: Home, provider: str, batch: str, queue: str = "") -> str:
    """The zset a line waits in; a READY pool line waits in its pool's ``queue``."""
    if home is Home.READY:
        return keys.ready(batch, queue or provider)
    if home is Home.FLIGHT:
        return keys.flight(provider)
    if home is Home.STORE:
        return keys.STORE
    return "-"


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


@dataclass(frozen=True)
class Breaker:
    """When a failing provider cools down, and for how long (``IMAGEBATCH_BREAKER_*``)."""

    failures: int
    cooldown_s: float
    max_s: float


@dataclass(frozen=True)
class Health:
    """A provider's breaker as Redis holds it: cooling down until ``until`` (0: healthy), its
    probe line out until ``probe``, ``failures`` in a row so far."""

    until: float = 0.0
    probe: float = 0.0
    failures: int = 0

    def state(self, now: float) -> str:
        """``healthy``, ``cooling`` (no submits), ``probing`` (one line out), or ``cooled``
        (its next line is the probe)."""
        if not self.until:
            return "healthy"
        if now < self.until:
            return "cooling"
        return "probing" if now < self.probe else "cooled"

    def describe(self, now: float) -> str:
        if not self.until:
            return "healthy"
        if now < self.until:
            return f"cooling down until {time.strftime('%H:%M:%S', time.localtime(self.until))}"
        return "probing" if now < self.probe else "cooled down: the next line is its probe"


@dataclass(frozen=True)
class Applied:
    applied: bool
    last: bool
    """The batch's last line just ended: finalize it."""


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
    health: Health = Health()


@dataclass(frozen=True)
class Fleet:
    batches: list[BatchView]
    providers: list[ProviderView]


class State:
    """The Redis state store. Values come back as ``str`` (``decode_responses``)."""

    def __init__(self, client: redis.Redis[str]) -> None:
        self.client = client
        self._scripts = {
            path.stem: client.register_script(path.read_text()) for path in LUA.glob("*.lua")
        }

    def _run(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        return self._scripts[name](keys=keys_, args=args)

    def run_script(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        """Run ``lua/NAME.lua`` (for the other modules of ``worker.redis``)."""
        return self._run(name, keys_, args)

    @property
    def groups(self) -> GroupStore:
        """A group provider's groups (``worker.redis.groups``)."""
        return GroupStore(self)

    def note_provider(self, provider: str) -> None:
        """``provider`` has lines in the window (a line moved to it): the scheduler pumps it."""
        self.client.sadd(keys.PROVIDERS, provider)

    def ping(self) -> bool:
        return bool(self.client.ping())

    def close(self) -> None:
        self.client.close()

    def claim(self, key: str, lease_s: float) -> Claim | dict[str, Any] | None:
        """Our claim on ``key`` (``keys.inbox_claim``), or what another holder's claim says
        (None: it vanished meanwhile; try later)."""
        return Claim.take(self.client, key, lease_s)

    def lock(self, key: str, timeout: float) -> Lock:
        """A token lock (redis-py's): one holder at a time, released by its holder only, gone
        after ``timeout`` if the holder dies. ``key`` is one of ``keys``' lock names."""
        return self.client.lock(key, timeout=timeout, thread_local=False)

    # -- batches ------------------------------------------------------------------------------

    def batch(self, b: str) -> dict[str, str]:
        return self.client.hgetall(keys.batch(b))

    def set_batch(self, b: str, **values: Any) -> None:
        self.client.hset(keys.batch(b), mapping={k: _text(v) for k, v in values.items()})

    def set_batch_if(self, b: str, name: str, expected: str, **values: Any) -> bool:
        """Set ``values`` on the batch record only while its field ``name`` is ``expected``
        (an owner's token), atomically; False when it is not."""
        key = keys.batch(b)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current: Any = pipe.hget(key, name)  # watching: answered at once
                    if not expected or current != expected:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.hset(key, mapping={k: _text(v) for k, v in values.items()})
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def batch_status(self, b: str) -> str | None:
        return self.client.hget(keys.batch(b), "status")

    def drop_batch_fields(self, b: str, *names: str) -> None:
        self.client.hdel(keys.batch(b), *names)

    def counters(self, b: str) -> dict[str, float]:
        return {k: float(v) for k, v in self.client.hgetall(keys.counters(b)).items()}

    def add_counts(self, b: str, **amounts: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name, amount in amounts.items():
            pipe.hincrbyfloat(keys.counters(b), name, amount)
        pipe.execute()

    def active_batches(self) -> list[str]:
        return sorted(self.client.smembers(keys.BATCHES))

    def deactivate(self, b: str) -> None:
        self.client.srem(keys.BATCHES, b)

    def seed(
        self,
        b: str,
        record: Mapping[str, Any],
        counts: Mapping[str, float],
        skip: bytes,
        prior: Mapping[int, int],
    ) -> None:
        """Write a new or resumed batch: its record, counters, skip bitmap and prior attempts.

        Whatever Redis held for the batch before is replaced: the output store's part files
        are the record a resume trusts, and they went into ``counts``, ``skip`` and ``prior``.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(keys.counters(b), keys.skip(b), keys.prior(b), keys.rows(b))
        pipe.delete(keys.batch(b))
        pipe.hset(keys.batch(b), mapping={k: _text(v) for k, v in record.items()})
        if counts:
            pipe.hset(keys.counters(b), mapping={k: _text(v) for k, v in counts.items()})
        if skip:
            pipe.set(keys.skip(b), skip)
        items = list(prior.items())
        for start in range(0, len(items), 1000):
            chunk = dict(items[start : start + 1000])
            pipe.hset(keys.prior(b), mapping={str(k): str(v) for k, v in chunk.items()})
        pipe.sadd(keys.BATCHES, b)
        pipe.lpush(keys.WAKE, "batch")
        pipe.execute()

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

    def line_count(self, b: str) -> int:
        """Line records of the batch in Redis right now (the window's occupancy, for tests)."""
        return sum(1 for _ in self.client.scan_iter(match=keys.line_pattern(b), count=1000))

    def lines(self, b: str) -> Iterator[LineRecord]:
        for key in self.client.scan_iter(match=keys.line_pattern(b), count=1000):
            data = self.client.hgetall(key)
            if data:
                yield LineRecord.from_hash(b, int(key.rsplit(":", 1)[1]), data)

    def expire_record(self, b: str, seconds: int) -> None:
        """A finalized batch's record (with its summary) lives on this long for ``status``."""
        self.client.expire(keys.batch(b), seconds)

    def release_held(self, b: str, now: float) -> int:
        """Every READY line of the batch due now (a resume releases the lines an interrupt
        held back, whatever time they were held to); returns how many."""
        released = 0
        for rec in self.lines(b):
            if rec.status is LineStatus.READY:
                released += self.release(rec, now)
        return released

    def release(self, rec: LineRecord, now: float) -> int:
        """Make a waiting line due ``now`` if it is still waiting (``ZADD XX LT``: a line the
        scheduler took meanwhile is not put back, a line due sooner is not delayed)."""
        ready = keys.ready(rec.batch, rec.ready_queue)
        moved = int(self.client.zadd(ready, {rec.member: now}, xx=True, lt=True, ch=True))
        if moved:
            registered = (keys.POOLS, rec.batch + rec.queue) if rec.queue else None
            self.client.sadd(*(registered or (keys.queues(rec.provider), rec.batch)))
        return moved

    def purge(self, b: str) -> None:
        """Delete every key of the batch except its record (which keeps the summary)."""
        batch_keys: list[str] = []
        for key in self.client.scan_iter(match=keys.batch_pattern(b), count=1000):
            batch_keys.append(key)
            if len(batch_keys) >= 500:
                self.client.delete(*batch_keys)
                batch_keys = []
        if batch_keys:
            self.client.delete(*batch_keys)
        self.client.srem(keys.BATCHES, b)

    # -- the feeder ---------------------------------------------------------------------------

    def skip_bits(self, b: str, first: int, count: int) -> bytes:
        """The skip bitmap's bytes covering lines ``first .. first + count - 1``."""
        start, end = first // 8, (first + count - 1) // 8
        value = self.client.execute_command("GETRANGE", keys.skip(b), start, end, NEVER_DECODE=True)
        return bytes(value or b"")

    def prior_attempts(self, b: str, idxs: list[int]) -> dict[int, int]:
        if not idxs:
            return {}
        values = self.client.hmget(keys.prior(b), [str(i) for i in idxs])
        return {i: int(v) for i, v in zip(idxs, values, strict=True) if v is not None}

    def admit(
        self,
        b: str,
        expected_idx: int,
        cursor: tuple[int, int, int],
        lines: list[LineRecord],
        ended: list[tuple[int, str, str]],
        eligible: float,
    ) -> bool:
        """Admit ``lines`` (and rows of lines that end at once) if the cursor is still
        ``expected_idx``; ``cursor`` is the new (index, byte offset, line number)."""
        args: list[Any] = [
            expected_idx,
            *cursor,
            keys.LINE_FORMAT,
            keys.READY_FORMAT,
            keys.QUEUES_FORMAT,
            repr(eligible),
            len(lines),
        ]
        for rec in lines:
            data = rec.to_hash()
            args += [rec.idx, rec.ready_queue, len(data)]
            for name, value in data.items():
                args += [name, value]
        args.append(len(ended))
        for idx, status, row in ended:
            args += [idx, status, row]
        target = [keys.batch(b), keys.PROVIDERS, keys.counters(b), keys.rows(b), keys.WAKE]
        return bool(self._run("admit", [*target, keys.POOLS], args))

    # -- the scheduler ------------------------------------------------------------------------

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
    ) -> Pumped:
        """Hand out up to ``polls`` due polls and ``submits`` READY lines of ``provider``, within
        its cap and each kind's token bucket (``pump.lua``). ``defaults`` (cap, submit rate,
        poll rate) count until the controller has written its own."""
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
        self.client.hset(keys.limit(provider), mapping={k: _text(v) for k, v in values.items()})

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
        """Block up to ``timeout`` for the scheduler's next event; the events that came."""
        if timeout <= 0:
            return frozenset()
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

    # -- tasks --------------------------------------------------------------------------------

    def begin(self, b: str, idx: int, seq: int, owner: str) -> LineRecord | None:
        raw = self._run("begin", [keys.line(b, idx)], [seq, owner])
        if not raw:
            return None
        return LineRecord.from_hash(b, idx, dict(zip(raw[::2], raw[1::2], strict=True)))

    def read(self, b: str, idx: int) -> LineRecord | None:
        data = self.client.hgetall(keys.line(b, idx))
        return LineRecord.from_hash(b, idx, data) if data else None

    def apply(
        self,
        rec: LineRecord,
        t: Transition,
        *,
        model: str,
        index_jobs: bool,
        drop_keys: Iterable[str] = (),
        immediate: frozenset[str] | None = None,
        total: int = -1,
    ) -> Applied:
        """Apply ``t`` to ``rec`` if ``rec.seq`` and ``rec.status`` are still current. Of
        ``t.counts``, only the names in ``immediate`` are added here (all, when None); the
        caller adds the rest."""
        if immediate is None:
            immediate = frozenset(t.counts)
        now = time.time()
        old, new = rec.info.home, TABLE[t.status].home
        # A line may move to another provider (a group's line falling back to the synchronous
        # API): it waits in that provider's READY set from now on.
        provider = str(t.changes.get("provider") or rec.provider)
        job_op = ""
        if index_jobs:
            job = str(t.changes.get("job_id", rec.job_id) or "")
            if new is Home.FLIGHT and job and t.status is LineStatus.SUBMITTED:
                job_op = f"set:{job}"
            elif old is Home.FLIGHT and new is not Home.FLIGHT and rec.job_id:
                job_op = f"del:{rec.job_id}"
        # Once a latency is learned, a sample of the jobs keeps it current.
        learned = rec.expected_s > 0 and rec.idx % 4 != 0
        latency = None if learned else t.latency_s
        sample = "" if latency is None else repr(latency)
        if latency is not None and t.queue_share is not None:
            sample += f" {t.queue_share!r}"
        fields = encode_changes(t.changes)
        counts = {k: v for k, v in t.counts.items() if v and k in immediate}
        if t.row is not None and t.row.credits:
            unit = REGISTRY[rec.provider].credit_unit
            name = f"credits:{currency(rec.provider, unit)}"
            counts[name] = counts.get(name, 0.0) + t.row.credits
        drop = list(drop_keys)
        args: list[Any] = [
            rec.seq,
            rec.member,
            t.status.value,
            repr(now + t.due_in),
            "1" if t.row is not None else "0",
            t.row.model_dump_json() if t.row is not None else "",
            rec.idx,
            job_op,
            sample,
            "store" if new is Home.STORE and old is not Home.STORE and t.due_in <= 0 else "",
            rec.status.value,
            len(fields),
        ]
        for name, value in fields.items():
            args += [name, value]
        args.append(len(counts))
        for name, amount in counts.items():
            args += [name, repr(float(amount))]
        args.append(len(drop))
        args += drop
        args.append(total)
        provider = str(t.changes.get("provider", rec.provider))
        queue = str(t.changes.get("queue", rec.queue))
        target = [
            keys.line(rec.batch, rec.idx),
            home_key(old, rec.provider, rec.batch, rec.queue),
            home_key(new, provider, rec.batch, queue),
            keys.counters(rec.batch),
            keys.rows(rec.batch),
            keys.WAKE,
            keys.batch(rec.batch),
            keys.jobs(rec.provider) if job_op else "-",
            keys.latency(rec.provider, model) if latency is not None else "-",
            (keys.POOLS if queue else keys.queues(provider))
            if new is Home.READY and old is not Home.READY
            else "-",
        ]
        applied, done, total = self._run("apply", target, args)
        return Applied(bool(applied), bool(applied) and int(total) >= 0 and done == total)

    # -- pools: who left a batch, and each provider's breaker ----------------------------------

    def leave_pool(self, b: str, provider: str, reason: str) -> bool:
        """Take ``provider`` out of the batch's pool for good; True the first time."""
        return bool(self.client.hsetnx(keys.out(b), provider, reason))

    def out_of_pool(self, b: str) -> dict[str, str]:
        """The providers that left the batch's pool, each with why."""
        return dict(self.client.hgetall(keys.out(b)))

    def verdict(self, provider: str, ok: bool, now: float, breaker: Breaker) -> str:
        """Count one submit's outcome toward the provider's breaker (``health.lua``); returns
        ``cooling <until>`` when a cooldown starts, ``healthy`` when an answer ends one."""
        return str(
            self._run(
                "health",
                [keys.health(provider)],
                [
                    repr(now),
                    "1" if ok else "0",
                    breaker.failures,
                    breaker.cooldown_s,
                    breaker.max_s,
                ],
            )
        )

    def health(self, provider: str) -> Health:
        found = self.client.hmget(keys.health(provider), ["until", "probe", "failures"])
        until, probe, failures = (float(v or 0) for v in found)
        return Health(until, probe, int(failures))

    def reserve(self, b: str, amount: float, budget: float) -> bool:
        return bool(self._run("reserve", [keys.counters(b)], [repr(amount), repr(budget)]))

    def renew(self, entries: Iterable[tuple[str, str]], until: float) -> None:
        """Push the leases of running steps to ``until`` (``ZADD XX GT``: never shortens one)."""
        pipe = self.client.pipeline(transaction=False)
        for zset, member in entries:
            pipe.zadd(zset, {member: until}, xx=True, gt=True)
        pipe.execute()

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

    def line_of_job(self, provider: str, job_id: str) -> tuple[str, int] | None:
        found = self.client.hget(keys.jobs(provider), job_id)
        return keys.parse_member(found) if found else None

    def worker_alive(self, host: str, pid: int, ttl: float) -> None:
        self.client.set(keys.worker(host, pid), repr(time.time()), px=int(ttl * 1000))

    def worker_seen(self, host: str) -> bool:
        return any(self.client.scan_iter(match=keys.workers(host)))

    def workers_alive(self) -> int:
        return sum(1 for _ in self.client.scan_iter(match=keys.workers()))

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

    # -- rows and blobs -----------------------------------------------------------------------

    def pending_rows(self, b: str, most: int) -> list[str]:
        return self.client.lrange(keys.rows(b), 0, most - 1)

    def unflushed(self, b: str) -> int:
        return int(self.client.llen(keys.rows(b)))

    def drop_rows(self, b: str, count: int) -> None:
        self.client.ltrim(keys.rows(b), count, -1)

    def put_blob(self, b: str, idx: int, k: int, data: bytes, ttl: float) -> str:
        key = keys.blob(b, idx, k)
        self.client.set(key, data, ex=int(ttl))
        return key

    def get_blob(self, key: str) -> bytes | None:
        value = self.client.execute_command("GET", key, NEVER_DECODE=True)
        return value if isinstance(value, bytes) else None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)
