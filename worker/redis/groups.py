"""The Redis side of groups (``worker.lines.groups``): forming one from READY lines, claiming
due ones for dispatch, a task's compare-and-set saves, and putting a group found in the
output store back after Redis was lost. Keys come from ``worker.redis.keys``; every change
that must not happen twice is one Lua script."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import redis

from worker.lines.groups import GroupRecord, encode_group_changes
from worker.lines.records import LineRecord
from worker.redis import keys


class Scripts(Protocol):
    """What groups need of ``State``: its client and its Lua scripts."""

    client: redis.Redis[str]

    def run_script(self, name: str, keys_: list[str], args: list[Any]) -> Any: ...

    def begin_hash(self, key: str, seq: int, owner: str) -> dict[str, str] | None: ...


FRAMING = 160
"""Bytes an input-file line adds to its request's JSON (custom_id, method, url, braces)."""
Due = float | Literal["keep", "done"]


class GroupStore:
    """A group provider's groups in Redis, for the scheduler and the group task."""

    def __init__(self, state: Scripts) -> None:
        self.state = state
        self.client = state.client

    # -- the scheduler --------------------------------------------------------------------------

    def queued_batches(self, provider: str) -> list[str]:
        """Batches with READY lines for ``provider``."""
        return sorted(self.client.smembers(keys.queues(provider)))

    def ready_due(self, batch: str, provider: str, now: float) -> tuple[int, float | None]:
        """How many of the batch's READY lines for ``provider`` are due, and when the newest
        of them became due (how long the feeder has added none)."""
        key = keys.ready(batch, provider)
        pipe = self.client.pipeline(transaction=False)
        pipe.zcount(key, "-inf", now)
        pipe.zrevrangebyscore(key, now, "-inf", start=0, num=1, withscores=True)
        count, newest = pipe.execute()
        return int(count), (float(newest[0][1]) if newest else None)

    def lines_in_groups(self, provider: str) -> int:
        """Lines in ``provider``'s open groups: what its in-flight cap counts."""
        members = self.client.zrange(keys.groups(provider), 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for member in members:
            batch, group = member.rsplit(" ", 1)
            pipe.hget(keys.group(batch, group), "size")
        return sum(int(size or 0) for size in pipe.execute())

    def form(
        self, batch: str, provider: str, group: str, most: int, max_bytes: int, now: float
    ) -> int:
        """Take up to ``most`` due READY lines of one model into the new group ``group``;
        returns how many (0: none were due, and no group was made)."""
        taken = self.state.run_script(
            "group_form",
            [
                keys.ready(batch, provider),
                keys.group(batch, group),
                keys.group_members(batch, group),
                keys.groups(provider),
                keys.batch_groups(batch),
                keys.queues(provider),
            ],
            [repr(now), batch, group, provider, most, max_bytes, FRAMING, keys.LINE_FORMAT],
        )
        return int(taken)

    def claim(
        self, provider: str, now: float, lease: float, most: int
    ) -> tuple[list[tuple[str, str, int]], float | None]:
        """Due groups, each with the new seq its task runs under; when the next is due."""
        claimed, nxt = self.state.run_script(
            "claim", [keys.groups(provider)], [repr(now), lease, most, keys.GROUP_FORMAT]
        )
        found = [(*member.rsplit(" ", 1), int(seq)) for member, seq in claimed]
        return [(b, g, seq) for b, g, seq in found], (float(nxt) if nxt else None)

    # -- the group task -------------------------------------------------------------------------

    def begin(self, batch: str, group: str, seq: int, owner: str) -> GroupRecord | None:
        """The group, if this dispatch (``seq``) is its latest and no copy of it began."""
        data = self.state.begin_hash(keys.group(batch, group), seq, owner)
        return GroupRecord.from_hash(batch, group, data) if data else None

    def get(self, batch: str, group: str) -> GroupRecord | None:
        data = self.client.hgetall(keys.group(batch, group))
        return GroupRecord.from_hash(batch, group, data) if data else None

    def members(self, batch: str, group: str) -> dict[int, int]:
        """The group's lines: index → the attempt the group holds it at."""
        found = self.client.hgetall(keys.group_members(batch, group))
        return {int(idx): int(attempt) for idx, attempt in found.items()}

    def of_batch(self, batch: str) -> list[GroupRecord]:
        """The batch's open groups, oldest first."""
        ids = sorted(self.client.smembers(keys.batch_groups(batch)))
        pipe = self.client.pipeline(transaction=False)
        for group in ids:
            pipe.hgetall(keys.group(batch, group))
        found = [
            GroupRecord.from_hash(batch, group, data)
            for group, data in zip(ids, pipe.execute(), strict=True)
            if data
        ]
        return sorted(found, key=lambda g: (g.formed_at, g.id))

    def save(self, rec: GroupRecord, due: Due, **changes: Any) -> bool:
        """Set ``changes`` and the next step's time if the group is still ``rec.seq``'s.

        ``due``: when the group's next step is due, ``keep`` (the task goes on under its
        lease) or ``done`` (no line is left in it: its keys go)."""
        args: list[Any] = [rec.seq, rec.member, due if isinstance(due, str) else repr(due)]
        for name, value in encode_group_changes(changes).items():
            args += [name, value]
        saved = self.state.run_script(
            "group_save",
            [
                keys.group(rec.batch, rec.id),
                keys.group_members(rec.batch, rec.id),
                keys.groups(rec.provider),
                keys.batch_groups(rec.batch),
            ],
            args,
        )
        return bool(saved)

    def lines(self, batch: str, idxs: Iterable[int]) -> list[LineRecord]:
        """The line records of ``idxs`` that are in Redis, in the order asked."""
        wanted = list(idxs)
        pipe = self.client.pipeline(transaction=False)
        for idx in wanted:
            pipe.hgetall(keys.line(batch, idx))
        return [
            LineRecord.from_hash(batch, idx, data)
            for idx, data in zip(wanted, pipe.execute(), strict=True)
            if data
        ]

    def set_line_fields(self, rec: LineRecord, **values: str) -> None:
        """Fields of a line its group owns (a GROUPED line no step runs on)."""
        self.client.hset(keys.line(rec.batch, rec.idx), mapping={k: v for k, v in values.items()})

    def due_now(self, batch: str, now: float) -> None:
        """Every open group of the batch looks again now (a cancel, a resume)."""
        pipe = self.client.pipeline(transaction=False)
        for rec in self.of_batch(batch):
            pipe.zadd(keys.groups(rec.provider), {rec.member: now}, xx=True)
        pipe.lpush(keys.WAKE, "batch")
        pipe.execute()

    # -- a resume after Redis was lost ---------------------------------------------------------

    def adopt(
        self,
        groups: Sequence[tuple[GroupRecord, Mapping[int, int]]],
        lines: Sequence[LineRecord],
        now: float,
    ) -> None:
        """Put groups found in the output store back, with their lines GROUPED in them:
        each group looks for (or polls) its job at once instead of being sent again."""
        pipe = self.client.pipeline(transaction=True)
        for rec, members in groups:
            pipe.delete(keys.group(rec.batch, rec.id), keys.group_members(rec.batch, rec.id))
            pipe.hset(
                keys.group(rec.batch, rec.id), mapping={k: v for k, v in rec.to_hash().items()}
            )
            pipe.hset(
                keys.group_members(rec.batch, rec.id),
                mapping={str(i): str(a) for i, a in members.items()},
            )
            pipe.zadd(keys.groups(rec.provider), {rec.member: now})
            pipe.sadd(keys.batch_groups(rec.batch), rec.id)
            pipe.sadd(keys.PROVIDERS, rec.provider)
        for line in lines:
            pipe.hset(
                keys.line(line.batch, line.idx), mapping={k: v for k, v in line.to_hash().items()}
            )
        pipe.lpush(keys.WAKE, "batch")
        pipe.execute()
