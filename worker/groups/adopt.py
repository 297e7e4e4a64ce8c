"""A resume after Redis was lost (wiped, an embedded run's Redis gone with Ctrl-C): the groups
saved in the output store whose job still holds lines without a row go back into Redis, each
line GROUPED in its latest group, so the job is found again (by its id, or by its metadata
when the create's answer was never saved) and collected, never bought a second time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from jobs.checker import Checker
from jobs.manifest.parse import Line
from jobs.output import groups as durable
from jobs.storage import Store
from worker.lines.groups import GroupRecord, GroupStatus
from worker.lines.records import LineRecord, LineStatus
from worker.redis.state import State


def group_record(record: durable.GroupFile, size: int) -> GroupRecord:
    """The Redis record of a group found in the output store: its job polled if its id was
    saved, looked for by metadata if not, created again if it was refused for the limit."""
    last = record.creates[-1] if record.creates else durable.Create(0)
    if last.refused is not None:
        status = GroupStatus.WAITING
    elif last.job_id:
        status = GroupStatus.RUNNING
    else:
        status = GroupStatus.CREATING
    return GroupRecord(
        batch=record.batch,
        id=record.group,
        provider=record.provider,
        model=record.model,
        status=status,
        size=size,
        formed_at=record.formed_at,
        input_file_id=record.input_file_id,
        tries=last.attempt,
        job_id=last.job_id or "",
        created_at=record.formed_at,
        job_status=last.status,
    )


def find(
    store: Store, batch: str, has_row: Callable[[int], bool], prior: Callable[[int], int]
) -> list[durable.Adoption]:
    return durable.adoptions(store, batch, has_row, prior)


def adopt(
    state: State,
    batch: str,
    found: list[durable.Adoption],
    lines: Iterable[tuple[int, Line]],
    check: Checker,
    prior: Callable[[int], int],
) -> int:
    """Write the groups and their lines (read from ``lines``, the manifest's counted lines
    with their index, each line's provider as ``check`` routes it) into Redis; returns how
    many lines went back into a group."""
    wanted = {idx: (a.record.group, attempt) for a in found for idx, attempt in a.members}
    records: list[LineRecord] = []
    for idx, line in lines:
        if idx not in wanted or line.request is None:
            continue
        group, attempt = wanted[idx]
        records.append(
            LineRecord(
                batch=batch,
                idx=idx,
                line=line.number,
                id=line.request.line_id,
                provider=check.provider_of(line.request),
                request_json=line.request.model_dump_json(exclude_none=True),
                status=LineStatus.GROUPED,
                attempt=attempt,
                first_attempt=prior(idx) + 1,
                group=group,
            )
        )
    present = {rec.idx for rec in records}
    groups = []
    for adoption in found:
        members = {i: a for i, a in adoption.members if i in present}
        if members:
            groups.append((group_record(adoption.record, len(members)), members))
    state.groups.adopt(groups, records, time.time())
    return len(records)
