"""A group at work in one task: its record, its adapter and line context, and what every
step does to it: save it (compare-and-set on its seq), read its durable record, walk the
lines still waiting on it, and end or move a line through the one path every line takes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from jobs.errors import ImagebatchError
from jobs.output import groups as durable
from jobs.providers.openai_batch import OpenAIBatch
from worker import transitions
from worker.groups import lines
from worker.lines.endings import fail
from worker.lines.groups import GroupRecord
from worker.lines.records import BatchStatus, LineRecord, LineStatus, Transition
from worker.redis.groups import Due
from worker.runtime import Runtime

log = logging.getLogger("imagebatch.groups")

PAGE = 1000
"""Lines read from Redis at a time."""


@dataclass
class Outcome:
    """What one dispatch of a group did, for its task's result and for finalize."""

    outcome: str = ""
    last: set[str] = field(default_factory=set)
    """Batches whose last line ended in this task: finalize them."""

    def as_result(self) -> dict[str, object]:
        return {"outcome": self.outcome}


class StaleGroup(Exception):
    """Another dispatch of the group took over: this one stops at once."""


class GroupWork:
    """A group and what its steps need: the adapter, the line context, the durable record."""

    def __init__(self, rt: Runtime, meta: dict[str, str], rec: GroupRecord) -> None:
        self.rt, self.meta, self.rec = rt, meta, rec
        self.settings = rt.settings
        self.config = rt.settings.group_config(rec.provider)
        if self.config.fallback:
            try:
                rt.provider(self.config.fallback)
            except ImagebatchError as exc:
                log.warning("no fallback to %s: %s", self.config.fallback, exc.message)
                self.config = replace(self.config, fallback=None)
        adapter = rt.provider(rec.provider)
        if not isinstance(adapter, OpenAIBatch):
            raise TypeError(f"{rec.provider} is not a group provider")
        self.adapter = adapter
        self.ctx = rt.context(meta)
        self.store = self.ctx.store
        self.done = Outcome()

    @property
    def status(self) -> BatchStatus:
        return BatchStatus(self.meta.get("status", BatchStatus.RUNNING))

    def count(self, name: str, amount: float = 1) -> None:
        """Add to the batch's counters now (a step counts a few times at most): a finalize
        never reads them without it."""
        self.rt.state.add_counts(self.rec.batch, **{name: amount})

    def save(self, due: Due, **changes: Any) -> None:
        """Save the group if it is still this task's (else stop: ``StaleGroup``)."""
        if not self.rt.state.groups.save(self.rec, due, **changes):
            raise StaleGroup(self.rec.id)
        self.rec = self.rec.evolve(**changes)

    def note(self, outcome: str, level: int = logging.INFO) -> None:
        self.done.outcome = outcome
        log.log(
            level,
            "group %s: %s",
            self.rec.id,
            outcome,
            extra={"batch": self.rec.batch, "provider": self.rec.provider, "step": "group"},
        )

    def durable(self) -> durable.GroupFile:
        """The group's record in the output store (rebuilt from Redis should it be missing)."""
        found = durable.read(self.store, self.rec.batch, self.rec.id)
        if found is not None:
            return found
        members = sorted(self.rt.state.groups.members(self.rec.batch, self.rec.id).items())
        return durable.GroupFile(
            self.rec.id,
            self.rec.batch,
            self.rec.provider,
            self.rec.model,
            members,
            self.rec.formed_at,
            input_file_id=self.rec.input_file_id,
            metadata=self.rec.metadata(),
            creates=[durable.Create(self.rec.tries)],
        )

    def waiting_lines(self) -> Iterator[LineRecord]:
        """The group's lines still waiting on it, in index order, a page at a time."""
        groups = self.rt.state.groups
        members = sorted(groups.members(self.rec.batch, self.rec.id))
        for start in range(0, len(members), PAGE):
            for line in groups.lines(self.rec.batch, members[start : start + PAGE]):
                if line.status is LineStatus.GROUPED and line.group == self.rec.id:
                    yield line

    def apply(self, line: LineRecord, t: Transition) -> bool:
        """The one path every line's transition takes (``transitions.apply``)."""
        moved = t.changes.get("provider")
        if isinstance(moved, str) and moved != line.provider:
            self.rt.state.note_provider(moved)
        applied = transitions.apply(self.rt, line, t, meta=self.meta)
        if applied.last:
            self.done.last.add(line.batch)
        return applied.applied

    def end_all(self, exc: ImagebatchError, stop: tuple[str, str] | None = None) -> None:
        """Every line still in the group fails with ``exc``; the group is gone."""
        for line in self.waiting_lines():
            self.apply(line, fail(line.evolve(**lines.sent(self.rec, line)), exc, stop=stop))
        self.save("done")
        self.note(f"ended: {exc.message}")
