"""``State``'s part for one line's record: a step begins it (``begin.lua``), a transition moves
it (``apply.lua``: its status, its home, the slot it holds, its row, the counters, in one
script), a resume releases the lines an interrupt held, a heartbeat renews leases, and a
line's budget is held before its submit (``reserve.lua``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from jobs.pricing import currency
from jobs.registry import REGISTRY
from worker.lines.records import TABLE, Home, LineRecord, LineStatus, Transition, encode_changes
from worker.redis import keys
from worker.redis.scripts import Scripted


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
class Applied:
    applied: bool
    last: bool
    """The batch's last line just ended: finalize it."""


def _job_op(rec: LineRecord, t: Transition, old: Home, new: Home) -> str:
    """The job index's change (webhooks find a line by its job id): ``set:JOB`` when the line
    is submitted, ``del:JOB`` when it leaves flight, else nothing."""
    job = str(t.changes.get("job_id", rec.job_id) or "")
    if new is Home.FLIGHT and job and t.status is LineStatus.SUBMITTED:
        return f"set:{job}"
    if old is Home.FLIGHT and new is not Home.FLIGHT and rec.job_id:
        return f"del:{rec.job_id}"
    return ""


def _latency_sample(rec: LineRecord, t: Transition) -> tuple[float | None, str]:
    """The job latency the transition teaches (``"SECONDS [QUEUE_SHARE]"``), if any: once a
    latency is learned, a sample of the jobs keeps it current."""
    learned = rec.expected_s > 0 and rec.idx % 4 != 0
    latency = None if learned else t.latency_s
    sample = "" if latency is None else repr(latency)
    if latency is not None and t.queue_share is not None:
        sample += f" {t.queue_share!r}"
    return latency, sample


def _counts(rec: LineRecord, t: Transition) -> dict[str, float]:
    """The counts added with the transition: its own, and the row's credits under its
    currency."""
    counts = {k: v for k, v in t.counts.items() if v}
    if t.row is not None and t.row.credits:
        unit = REGISTRY[rec.provider].credit_unit
        name = f"credits:{currency(rec.provider, unit)}"
        counts[name] = counts.get(name, 0.0) + t.row.credits
    return counts


class LineState(Scripted):
    """A line's record in Redis (a part of ``State``)."""

    def begin(self, b: str, idx: int, seq: int, owner: str) -> LineRecord | None:
        data = self.begin_hash(keys.line(b, idx), seq, owner)
        return LineRecord.from_hash(b, idx, data) if data else None

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
        total: int = -1,
    ) -> Applied:
        """Apply ``t`` to ``rec`` if ``rec.seq`` and ``rec.status`` are still current, and add
        its counts to the batch's counters in the same script."""
        now = time.time()
        old, new = rec.info.home, TABLE[t.status].home
        job_op = _job_op(rec, t, old, new) if index_jobs else ""
        latency, sample = _latency_sample(rec, t)
        fields = encode_changes(t.changes)
        counts = _counts(rec, t)
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
        # A line may move to another provider (a group's line falling back to the synchronous
        # API): it waits in that provider's READY set from now on.
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
            keys.WAKE_AT,
        ]
        applied, done, total = self._run("apply", target, args)
        return Applied(bool(applied), bool(applied) and int(total) >= 0 and done == total)

    def lines(self, b: str) -> Iterator[LineRecord]:
        for key in self.client.scan_iter(match=keys.line_pattern(b), count=1000):
            data = self.client.hgetall(key)
            if data:
                yield LineRecord.from_hash(b, int(key.rsplit(":", 1)[1]), data)

    def line_count(self, b: str) -> int:
        """Line records of the batch in Redis right now (the window's occupancy, for tests)."""
        return sum(1 for _ in self.client.scan_iter(match=keys.line_pattern(b), count=1000))

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

    def renew(self, entries: Iterable[tuple[str, str]], until: float) -> None:
        """Push the leases of running steps to ``until`` (``ZADD XX GT``: never shortens one)."""
        pipe = self.client.pipeline(transaction=False)
        for zset, member in entries:
            pipe.zadd(zset, {member: until}, xx=True, gt=True)
        pipe.execute()

    def line_of_job(self, provider: str, job_id: str) -> tuple[str, int] | None:
        found = self.client.hget(keys.jobs(provider), job_id)
        return keys.parse_member(found) if found else None

    def reserve(self, b: str, amount: float, budget: float) -> bool:
        return bool(self._run("reserve", [keys.counters(b)], [repr(amount), repr(budget)]))
