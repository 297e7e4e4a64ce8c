"""Batch and line state in Redis: the record every task reads before it acts.

Keys (``B`` = batch id, ``I`` = the line's index among counted lines):
    ib:B            hash  the batch: out, total, provider, status, stop_reason, summary, ...
    ib:B:n          hash  counters: done, succeeded, failed, rejected, credits, reserved, ...
    ib:B:i:I        hash  one line: status, seq, attempt, job_id, artifacts, row, ...
    ib:B:l:I        str   a lease: the task currently working on the line
    ib:B:blob:I:K   bytes image K of line I when the provider sent it inline (until stored)
    ib:B:due        zset  lines by the time their next step should have started (sweeper)
    ib:active       set   batches not yet finalized
    ib:rate:P       hash  provider P's shared token bucket (and pause after a 429)
    ib:slots:P      zset  provider P's in-flight jobs, scored by lease expiry
    ib:parked:P     list  lines waiting for one of P's slots ("batch idx seq"), oldest first

Every transition that must not happen twice (a line finishing, a budget reservation, a slot)
is one Lua script, so concurrent workers and redelivered tasks cannot double count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

TERMINAL = frozenset({"succeeded", "failed", "rejected"})

FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2, -1} end
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'succeeded' or s == 'failed' or s == 'rejected' then return {-1, -1} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'row', ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HINCRBYFLOAT', KEYS[2], 'credits', ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[4])
local done = redis.call('HINCRBY', KEYS[2], 'done', 1)
local total = tonumber(redis.call('HGET', KEYS[3], 'total') or '-1')
return {done, total}
"""

SEAL = """
redis.call('HSET', KEYS[1], 'total', ARGV[1])
return tonumber(redis.call('HGET', KEYS[2], 'done') or '0')
"""

RESERVE = """
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local limit = tonumber(ARGV[2])
if limit >= 0 and reserved + tonumber(ARGV[1]) > limit + 1e-9 then return 0 end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', ARGV[1])
return 1
"""

RATE_LIMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'pause')
local pause = tonumber(b[3]) or 0
if pause > now then return tostring(pause - now) end
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
"""

PAUSE = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'pause') or '0')
if until_ > current then redis.call('HSET', KEYS[1], 'pause', tostring(until_)) end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""

SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local expiry = now + tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], expiry, ARGV[1])
  return 1
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], expiry, ARGV[1])
  return 1
end
return 0
"""


class State:
    """Typed access to the keys above. Values come back as ``str`` (decode_responses)."""

    def __init__(self, client: redis.Redis[str]) -> None:
        self.r = client
        self._finish = client.register_script(FINISH)
        self._seal = client.register_script(SEAL)
        self._reserve = client.register_script(RESERVE)
        self._token = client.register_script(RATE_LIMIT)
        self._pause = client.register_script(PAUSE)
        self._slot = client.register_script(SLOT)

    # -- the batch -------------------------------------------------------------------------

    @staticmethod
    def meta_key(batch: str) -> str:
        return f"ib:{batch}"

    @staticmethod
    def item_key(batch: str, idx: int) -> str:
        return f"ib:{batch}:i:{idx}"

    def meta(self, batch: str) -> dict[str, str]:
        return self.r.hgetall(self.meta_key(batch))

    def set_meta(self, batch: str, **fields: Any) -> None:
        self.r.hset(self.meta_key(batch), mapping={k: _str(v) for k, v in fields.items()})

    def counts(self, batch: str) -> dict[str, float]:
        raw: dict[str, str] = self.r.hgetall(f"ib:{batch}:n")
        return {key: float(value) for key, value in raw.items()}

    def bump(self, batch: str, counter: str, amount: int = 1) -> None:
        self.r.hincrby(f"ib:{batch}:n", counter, amount)

    def seal(self, batch: str, total: int) -> int:
        """Record the line count once enqueueing is over; returns how many are already done."""
        return int(self._seal(keys=[self.meta_key(batch), f"ib:{batch}:n"], args=[total]))

    def reset_run(self, batch: str) -> None:
        """Forget a finished run's counters (its rows live on in the output store)."""
        self.r.delete(f"ib:{batch}:n")
        self.r.hdel(
            self.meta_key(batch),
            "total",
            "summary",
            "finished_at",
            "status",
            "stop_reason",
            "finalizing",
        )

    # -- lines -----------------------------------------------------------------------------

    def add_item(self, batch: str, idx: int, fields: dict[str, Any]) -> bool:
        """Create the line's record unless it exists (a resumed batch keeps its progress)."""
        key = self.item_key(batch, idx)
        if self.r.hsetnx(key, "status", fields.get("status", "pending")) == 0:
            return False
        self.r.hset(key, mapping={k: _str(v) for k, v in fields.items()})
        return True

    def item(self, batch: str, idx: int) -> dict[str, str]:
        return self.r.hgetall(self.item_key(batch, idx))

    def update(self, batch: str, idx: int, **fields: Any) -> None:
        self.r.hset(self.item_key(batch, idx), mapping={k: _str(v) for k, v in fields.items()})

    def next_seq(self, batch: str, idx: int) -> int:
        """Move the line to its next step; tasks holding an older ``seq`` are stale copies."""
        key = self.item_key(batch, idx)
        pipe = self.r.pipeline()
        pipe.hincrby(key, "seq", 1)
        pipe.hset(key, "starts", 0)
        return int(pipe.execute()[0])

    def schedule(self, batch: str, idx: int, in_s: float) -> None:
        """The line's next step should start within ``in_s``; the sweeper checks it did."""
        self.r.zadd(f"ib:{batch}:due", {str(idx): time.time() + in_s})

    def overdue(self, batch: str, grace_s: float, limit: int = 1000) -> list[int]:
        due = self.r.zrangebyscore(f"ib:{batch}:due", "-inf", time.time() - grace_s, 0, limit)
        return [int(idx) for idx in due]

    def activate(self, batch: str) -> None:
        self.r.sadd("ib:active", batch)

    def active(self) -> list[str]:
        return sorted(self.r.smembers("ib:active"))

    def deactivate(self, batch: str) -> None:
        self.r.srem("ib:active", batch)

    def count_start(self, batch: str, idx: int) -> int:
        return int(self.r.hincrby(self.item_key(batch, idx), "starts", 1))

    def lease(self, batch: str, idx: int, seconds: float) -> bool:
        return bool(self.r.set(f"ib:{batch}:l:{idx}", "1", nx=True, px=int(seconds * 1000)))

    def lease_left(self, batch: str, idx: int) -> float:
        return max(0.0, int(self.r.pttl(f"ib:{batch}:l:{idx}")) / 1000)

    def release(self, batch: str, idx: int) -> None:
        self.r.delete(f"ib:{batch}:l:{idx}")

    def finish(
        self, batch: str, idx: int, status: str, row: str, credits: float
    ) -> tuple[int, int]:
        """Mark the line terminal once; returns (done, total), done < 0 if it already was."""
        done, total = self._finish(
            keys=[
                self.item_key(batch, idx),
                f"ib:{batch}:n",
                self.meta_key(batch),
                f"ib:{batch}:due",
            ],
            args=[status, row, repr(float(credits)), idx],
        )
        return int(done), int(total)

    def rows(self, batch: str, total: int, chunk: int = 500) -> Iterator[str | None]:
        """Each line's row in index order, fetched in pipelined chunks (bounded memory)."""
        for start in range(0, total, chunk):
            pipe = self.r.pipeline(transaction=False)
            for idx in range(start, min(total, start + chunk)):
                pipe.hget(self.item_key(batch, idx), "row")
            yield from pipe.execute()

    def put_blob(self, batch: str, idx: int, k: int, data: bytes, ttl: int) -> str:
        key = f"ib:{batch}:blob:{idx}:{k}"
        self.r.set(key, data, ex=ttl)
        return key

    def get_blob(self, key: str) -> bytes | None:
        value = self.r.execute_command("GET", key, NEVER_DECODE=True)
        return value if isinstance(value, bytes) else None

    def purge(self, batch: str) -> int:
        """Delete every key of the batch but its record (and the summary it now holds)."""
        removed = 0
        keys: list[str] = []
        for key in self.r.scan_iter(match=f"ib:{batch}:*", count=1000):
            keys.append(key)
            if len(keys) >= 1000:
                removed += int(self.r.delete(*keys))
                keys = []
        if keys:
            removed += int(self.r.delete(*keys))
        return removed

    # -- money and limits, shared by every worker -------------------------------------------

    def reserve(self, batch: str, amount: float, limit: float | None) -> bool:
        args = [repr(float(amount)), repr(-1.0 if limit is None else float(limit))]
        return bool(self._reserve(keys=[f"ib:{batch}:n"], args=args))

    def unreserve(self, batch: str, amount: float) -> None:
        self.r.hincrbyfloat(f"ib:{batch}:n", "reserved", -float(amount))

    def take_token(self, provider: str, rate: float, burst: float) -> float:
        """0 when a request may go now; else the seconds to wait (shared by all workers)."""
        return float(self._token(keys=[f"ib:rate:{provider}"], args=[rate, burst]))

    def pause(self, provider: str, seconds: float) -> None:
        """A 429 slows every worker down, not just the one that saw it."""
        self._pause(keys=[f"ib:rate:{provider}"], args=[seconds])

    def take_slot(self, provider: str, member: str, limit: int, lease_s: float) -> bool:
        return bool(self._slot(keys=[f"ib:slots:{provider}"], args=[member, limit, lease_s]))

    def free_slot(self, provider: str, member: str) -> tuple[str, int, int] | None:
        """Give the slot back; returns the longest-parked line, which should now try again."""
        if not self.r.zrem(f"ib:slots:{provider}", member):
            return None
        return self.unpark(provider)

    def unpark(self, provider: str) -> tuple[str, int, int] | None:
        """The longest-parked line of this provider, taken off the list."""
        parked = self.r.rpop(f"ib:parked:{provider}")
        if parked is None:
            return None
        batch, idx, seq = parked.rsplit(" ", 2)
        return batch, int(idx), int(seq)

    def park(self, provider: str, batch: str, idx: int, seq: int) -> None:
        self.r.lpush(f"ib:parked:{provider}", f"{batch} {idx} {seq}")


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)
