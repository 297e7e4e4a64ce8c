"""``.state/groups/G.json``: a group of lines sent to a group provider as one job (an OpenAI
batch), as durable as the results themselves.

It is written before the job is created (the lines, their attempts, the input file and the
metadata the create carries) and again once the job's id is known, so whatever is lost after
that (the create's answer, the worker, Redis) the job is found again by its id or, failing
that, by its metadata: a group is never bought twice. A resume reads these records to put
lines that are in a job back into it (``adoptions``) instead of sending them again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.output import layout
from jobs.storage import Store

REFUSED = "token_limit_exceeded"
"""A create refused for the account's enqueued limit: nothing ran, nothing was billed."""


@dataclass
class Create:
    """One ``POST /v1/batches`` of the group (a refused one is followed by another)."""

    attempt: int
    job_id: str | None = None
    """The provider job's id; None while the create's answer is not known."""
    status: str = "creating"
    """``creating`` until the answer is saved, then the job's last known status."""
    refused: str | None = None
    """``token_limit_exceeded``: the job failed validation, ran nothing, cost nothing."""


@dataclass
class GroupFile:
    """What ``.state/groups/G.json`` holds."""

    group: str
    batch: str
    provider: str
    model: str
    members: list[tuple[int, int]]
    """(line index, attempt) in input-file order; a line's request is ``custom_id`` of both."""
    formed_at: float
    input_file_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    creates: list[Create] = field(default_factory=list)
    status: str = "formed"
    counts: dict[str, int] = field(default_factory=dict)
    """The job's ``request_counts`` when last saved."""

    @property
    def job_id(self) -> str | None:
        """The job the group's lines are in (the last create's, once answered)."""
        return self.creates[-1].job_id if self.creates else None

    def used(self) -> int:
        """Jobs of this group that ran (a create refused for the enqueued limit did not)."""
        return sum(1 for c in self.creates if c.job_id and c.refused is None)

    def refused(self) -> int:
        return sum(1 for c in self.creates if c.refused is not None)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["members"] = [list(m) for m in self.members]
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> GroupFile:
        data: dict[str, Any] = json.loads(raw)
        data["members"] = [(int(i), int(a)) for i, a in data.get("members", [])]
        data["creates"] = [Create(**c) for c in data.get("creates", [])]
        return cls(**data)


def write(store: Store, record: GroupFile) -> None:
    store.put(layout.group_key(record.batch, record.group), record.to_json(), "application/json")


def read(store: Store, batch: str, group: str) -> GroupFile | None:
    raw = store.get(layout.group_key(batch, group))
    return None if raw is None else GroupFile.from_json(raw)


def records(store: Store, batch: str) -> Iterator[GroupFile]:
    """Every group the batch ever sent, oldest first (one read each)."""
    found = []
    for key in store.list_keys(layout.groups_prefix(batch)):
        if key.endswith(".json"):
            raw = store.get(key)
            if raw is not None:
                found.append(GroupFile.from_json(raw))
    yield from sorted(found, key=lambda r: (r.formed_at, r.group))


def jobs_used(store: Store, batch: str) -> tuple[int, int]:
    """(provider jobs that ran, creates refused for the enqueued limit) over the batch."""
    used = refused = 0
    for record in records(store, batch):
        used += record.used()
        refused += record.refused()
    return used, refused


@dataclass(frozen=True)
class Adoption:
    """A group a resume puts back in Redis, with the lines still waiting on its job."""

    record: GroupFile
    members: list[tuple[int, int]]


def adoptions(
    store: Store, batch: str, has_row: Callable[[int], bool], prior: Callable[[int], int]
) -> list[Adoption]:
    """The groups whose job holds lines that have no row yet: each such line (its attempt
    later than any failed row's) goes back into its latest group, whose job is found again
    rather than bought again. A group whose every line is settled is left alone."""
    latest: dict[int, tuple[int, str]] = {}
    by_group: dict[str, GroupFile] = {}
    for record in records(store, batch):
        if not record.creates:
            continue  # saved before any create was sent: nothing was bought
        by_group[record.group] = record
        for idx, attempt in record.members:
            if has_row(idx) or attempt <= prior(idx):
                continue
            if idx not in latest or attempt > latest[idx][0]:
                latest[idx] = (attempt, record.group)
    members: dict[str, list[tuple[int, int]]] = {}
    for idx, (attempt, group) in sorted(latest.items()):
        members.setdefault(group, []).append((idx, attempt))
    return [Adoption(by_group[g], lines) for g, lines in members.items()]
