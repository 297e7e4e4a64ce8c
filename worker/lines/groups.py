"""A group of lines sent to a group provider (OpenAI's Batch API) as one job: its status, the
record Redis keeps of it, and how a line is named in the job's files (``custom_id``).

    FORMED ─input uploaded, group saved in the output store─▶ CREATING ─job id saved─▶ RUNNING
    RUNNING ─job ended─▶ COLLECTING ─every line mapped─▶ (gone)
    RUNNING ─refused for the enqueued limit─▶ WAITING ─later─▶ CREATING (a new create)

A create is never sent twice blindly: a group found ``CREATING`` (a lost answer, a crash, a
resume) looks for its job by the metadata it carries before it creates again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any


class GroupStatus(StrEnum):
    """Where a group is; stored in its Redis record."""

    FORMED = "formed"
    """Its lines were taken from READY; nothing was sent yet."""
    CREATING = "creating"
    """Input uploaded, group saved durably; a create may be out: find its job before another."""
    RUNNING = "running"
    """The provider job exists (its id saved in Redis and the output store); polled."""
    WAITING = "waiting"
    """The job was refused for the account's enqueued limit: created again after a wait."""
    COLLECTING = "collecting"
    """The job ended: its output and error files are being mapped to the lines."""


ACTIVE_JOB = frozenset({GroupStatus.RUNNING, GroupStatus.COLLECTING})
"""Statuses in which the group's job exists and may have bought images."""


@dataclass(frozen=True)
class GroupRecord:
    """One group, as its Redis hash (``ib:B:g:G``) holds it."""

    batch: str
    id: str
    provider: str
    model: str = ""
    status: GroupStatus = GroupStatus.FORMED
    size: int = 0
    """Lines in the group when it was formed."""
    seq: int = 1
    """Bumped by every dispatch of the group: an older copy of its task is stale."""
    owner: str = ""
    formed_at: float = 0.0
    input_file_id: str = ""
    tries: int = 0
    """Creates sent (a refusal for the enqueued limit is followed by another)."""
    job_id: str = ""
    """The provider job's id (an OpenAI batch), once its create was answered or found."""
    created_at: float = 0.0
    job_status: str = ""
    """The provider's own word for the job (``validating``, ``in_progress``…)."""
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancel: int = 0
    """1 once a cancel of the job was asked for."""

    @property
    def member(self) -> str:
        return f"{self.batch} {self.id}"

    def metadata(self) -> dict[str, str]:
        """What the create carries, and what finds its job again: our batch, group and try."""
        return {
            "imagebatch_batch": self.batch,
            "imagebatch_group": self.id,
            "imagebatch_try": str(self.tries),
        }

    @classmethod
    def from_hash(cls, batch: str, group: str, data: dict[str, str]) -> GroupRecord:
        values: dict[str, Any] = {"batch": batch, "id": group}
        for f in fields(cls):
            raw = data.get(f.name)
            if f.name in ("batch", "id") or raw is None:
                continue
            values[f.name] = _decode(f.name, raw)
        return cls(**values)

    def to_hash(self) -> dict[str, str]:
        return {f.name: _encode(getattr(self, f.name)) for f in fields(self) if f.name != "id"}

    def evolve(self, **changes: Any) -> GroupRecord:
        return replace(self, **changes)


_INTS = {"size", "seq", "tries", "total", "completed", "failed", "cancel"}
_FLOATS = {"formed_at", "created_at"}


def _decode(name: str, raw: str) -> Any:
    if name in _INTS:
        return int(raw)
    if name in _FLOATS:
        return float(raw)
    if name == "status":
        return GroupStatus(raw)
    return raw


def _encode(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def encode_group_changes(changes: dict[str, Any]) -> dict[str, str]:
    return {name: _encode(value) for name, value in changes.items()}


_CUSTOM_ID = re.compile(r"(\d+):(\d+):(.+)")


def custom_id(idx: int, attempt: int, line_id: str) -> str:
    """A line's request in a job's files: index, attempt (a later attempt is another
    request) and, for people reading the files, its id. Line ids never hold ``:``."""
    return f"{idx}:{attempt}:{line_id}"


def parse_custom_id(text: str) -> tuple[int, int] | None:
    """(index, attempt) of a ``custom_id``; None for one imagebatch did not write."""
    match = _CUSTOM_ID.fullmatch(text)
    return (int(match[1]), int(match[2])) if match else None
