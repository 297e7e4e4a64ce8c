"""The feeder: admits the archived manifest's next lines into the window as it frees up.

Any worker may run it (``imagebatch.feed``); a token lock keeps two from reading at once, and
the admission itself is a compare-and-set on the cursor (``admit.lua``), so a feed that runs
twice, or late, admits nothing twice. Lines that already have a row (rejected at submit, or
finished by an earlier run) are skipped by the batch's skip bitmap without being parsed. In a
stopped or cancelled batch the lines not yet bought end at once, as failed rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from jobs.checker import Checker
from jobs.errors import ImagebatchError
from jobs.manifest import parse
from jobs.manifest.backlog import Cursor, Stored, lines_from
from jobs.manifest.parse import Line
from jobs.output import layout
from jobs.output.rows import ResultRow
from jobs.routing import PoolRules, queue_name
from worker.lines.endings import make_row, stopped_error
from worker.lines.records import BatchStatus, LineRecord, first_seq
from worker.redis import keys
from worker.runtime import Runtime

log = logging.getLogger(__name__)


def checker(rt: Runtime, meta: Mapping[str, str]) -> Checker:
    """The batch's line checker: its provider (or pool), as ``run`` started it."""
    keyed = meta.get("keyed")
    most = meta.get("max_usd_per_image")
    rules = PoolRules(
        keyed=tuple(keyed.split(",")) if keyed else rt.settings.keyed(),
        usd_rates=rt.settings.usd_rates(),
        max_usd_per_image=float(most) if most else None,
    )
    return Checker(rt.provider, meta["provider"], rules)


FEED_LOCK_S = 20
"""How long a feed holds its batch's lock at most: a worker killed mid-feed stalls the batch's
window this long. ``admit.lua`` moves the cursor only from where the feed read it, so a slow
feed that outlives the lock still admits no line twice."""


def feed(rt: Runtime, batch: str) -> int:
    """Admit as many lines as the window has room for; returns how many were handled."""
    lock = rt.state.lock(keys.lock(batch, "feed"), timeout=FEED_LOCK_S)
    if not lock.acquire(blocking=False):
        return 0
    try:
        return _feed(rt, batch)
    finally:
        lock.release()


def _feed(rt: Runtime, batch: str) -> int:
    state, settings = rt.state, rt.settings
    meta = state.batch(batch)
    if not meta or "total" not in meta:
        return 0
    status = BatchStatus(meta["status"])
    if status in (BatchStatus.FINISHED, BatchStatus.INTERRUPTED):
        return 0
    total, window = int(meta["total"]), int(meta["window"])
    cursor = Cursor(int(meta["cursor_idx"]), int(meta["cursor_offset"]), int(meta["cursor_line"]))
    done = int(state.counters(batch).get("done", 0))
    running = status is BatchStatus.RUNNING
    room = window - (int(meta.get("admitted", 0)) - done)
    if not running:
        room = settings.chunk_lines
    if cursor.idx >= total or room <= 0:
        return 0
    manifest = Stored(rt.store(meta["out"]), layout.manifest_key(batch))
    check = checker(rt, meta)
    read = _read(rt, batch, manifest, cursor, check, room, total)
    prior = state.prior_attempts(batch, [idx for idx, _, _ in read.candidates])
    admitted: list[LineRecord] = []
    seq = first_seq(time.time())
    for idx, number, line in read.candidates:
        assert line.request is not None
        attempt = prior.get(idx, 0) + 1
        pool = check.pool_of(line.request)
        rec = LineRecord(
            batch=batch,
            idx=idx,
            line=number,
            id=line.request.line_id,
            provider=check.provider_of(line.request),
            pool=pool,
            queue=queue_name(pool) if pool else "",
            request_json=line.request.model_dump_json(exclude_none=True),
            attempt=attempt,
            first_attempt=attempt,
            seq=seq,
            settled=seq,
        )
        if running:
            admitted.append(rec)
        else:
            row = make_row(rec, "failed", stopped_error(meta)).model_dump_json()
            read.ended.append((idx, "failed", row))
    if read.last == cursor:
        return 0
    cursor_now = (read.last.idx, read.last.offset, read.last.line)
    if not state.admit(batch, cursor.idx, cursor_now, admitted, read.ended, time.time()):
        log.info("batch %s: another feed moved the cursor first", batch)
        return 0
    return len(admitted) + len(read.ended)


@dataclass
class _Read:
    """The backlog's next lines as the feeder read them: those to admit (index, line number,
    parsed line), those that end at once (index, status, row), and the cursor after them."""

    last: Cursor
    candidates: list[tuple[int, int, Line]] = field(default_factory=list)
    ended: list[tuple[int, str, str]] = field(default_factory=list)


def _read(
    rt: Runtime,
    batch: str,
    manifest: Stored,
    cursor: Cursor,
    check: Checker,
    room: int,
    total: int,
) -> _Read:
    """Up to ``room`` lines from ``cursor``: lines with a row already are skipped unparsed; a
    line that no longer validates ends here, rejected."""
    skip = SkipMap(rt, batch, total)
    read = _Read(cursor)
    for entry in lines_from(manifest, cursor):
        if len(read.candidates) + len(read.ended) >= room or entry.idx >= total:
            break
        read.last = Cursor(entry.idx + 1, entry.end, entry.number)
        if skip.has(entry.idx):
            continue
        if entry.data is None:
            continue  # over the size cap: rejected at submit, and in the skip bitmap
        line = parse.parse_line(entry.number, entry.data, check)
        if line.request is None:
            # Valid when submitted, not now (a provider's schema changed): it ends here.
            error = line.rejection or ImagebatchError("the line no longer validates")
            row = manifest_rejection_row(line, error)
            read.ended.append((entry.idx, "rejected", row))
            continue
        read.candidates.append((entry.idx, entry.number, line))
    return read


class SkipMap:
    """The batch's skip bitmap, fetched a block at a time as the feeder walks forward."""

    BLOCK = 8 * 4096

    def __init__(self, rt: Runtime, batch: str, total: int) -> None:
        self.rt, self.batch, self.total = rt, batch, total
        self.first: int | None = None
        self.bits = b""

    def has(self, idx: int) -> bool:
        if self.first is None or not self.first <= idx < self.first + self.BLOCK:
            self.first = idx - idx % 8
            count = min(self.BLOCK, max(1, self.total - self.first))
            self.bits = self.rt.state.skip_bits(self.batch, self.first, count)
        byte = (idx - self.first) // 8
        return byte < len(self.bits) and bool(self.bits[byte] & (0x80 >> (idx % 8)))


def manifest_rejection_row(line: Line, error: ImagebatchError) -> str:
    row = ResultRow.model_validate(
        {
            "line": line.number,
            "id": line.id,
            "status": "rejected",
            "error": error.as_row_error(),
            **parse.rejected_row_fields(line),
        }
    )
    return row.model_dump_json()
