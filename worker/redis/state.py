"""Typed access to imagebatch's Redis state: the keys of ``worker.redis.keys``, the scripts of
``worker/redis/lua``. Callers never build a key or send a raw command themselves: ``State`` is
the only way in (``docs/architecture.md``, "Redis").

Every change that must not happen twice (a transition, an admission, a budget hold, a slot)
is one Lua script, so concurrent workers and stale message copies cannot double count.

``State`` is one API built from parts, each its own module under ``worker/redis``:
``line_state`` (a line's record: begin, apply, release, leases, budget holds),
``scheduling`` (the pump, the adaptive limits, the latencies learned, the scheduler's wake-ups),
``pools`` (who left a batch's pool, each provider's breaker) and ``views`` (the fleet read
whole, for ``status`` and the metrics). This module holds the batch: its record, counters,
seed and purge, the feeder's admission, its rows waiting for a flush, and locks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis
from redis.lock import Lock

from worker.lines.records import LineRecord
from worker.redis import keys
from worker.redis.claims import Claim
from worker.redis.groups import GroupStore
from worker.redis.line_state import LineState
from worker.redis.pools import Pools
from worker.redis.scheduling import Scheduling
from worker.redis.scripts import text
from worker.redis.views import Views


class State(LineState, Scheduling, Pools, Views):
    """The Redis state store. Values come back as ``str`` (``decode_responses``)."""

    @property
    def groups(self) -> GroupStore:
        """A group provider's groups (``worker.redis.groups``)."""
        return GroupStore(self)

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
        self.client.hset(keys.batch(b), mapping={k: text(v) for k, v in values.items()})

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
                    pipe.hset(key, mapping={k: text(v) for k, v in values.items()})
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
        pipe.hset(keys.batch(b), mapping={k: text(v) for k, v in record.items()})
        if counts:
            pipe.hset(keys.counters(b), mapping={k: text(v) for k, v in counts.items()})
        if skip:
            pipe.set(keys.skip(b), skip)
        items = list(prior.items())
        for start in range(0, len(items), 1000):
            chunk = dict(items[start : start + 1000])
            pipe.hset(keys.prior(b), mapping={str(k): str(v) for k, v in chunk.items()})
        pipe.sadd(keys.BATCHES, b)
        pipe.lpush(keys.WAKE, "batch")
        pipe.execute()

    def expire_record(self, b: str, seconds: int) -> None:
        """A finalized batch's record (with its summary) lives on this long for ``status``."""
        self.client.expire(keys.batch(b), seconds)

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
