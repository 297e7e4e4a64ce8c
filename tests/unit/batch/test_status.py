"""``status`` and ``ls`` read what any version of imagebatch left in the output store: the
defect was a ``.state/batch.json`` written by an interrupted or still-running batch with its
numbers as strings (``"total": "300"``), which crashed ``status`` and, through it, ``ls`` for
every batch under the location."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from jobs.output import layout
from jobs.storage import LocalStore
from tests.runtime_support import put_line, record, seed_batch, text_client
from worker.batch import snapshot, status
from worker.lines.records import LineStatus
from worker.redis.state import State


def write_info(store: LocalStore, batch: str, info: dict[str, Any] | str) -> None:
    text = info if isinstance(info, str) else json.dumps(info)
    store.put(layout.info_key(batch), text.encode(), "application/json")


OLD_STYLE = {
    "batch_id": "old",
    "status": "interrupted",
    "total": "300",
    "runs": "2",
    "started_at": "2026-11-02T09:00:00Z",
    "counters": {"done": "120", "succeeded": "100", "failed": "15", "rejected": "5",
                 "credits:credits": "400.0"},
}  # fmt: skip


def test_a_record_with_numbers_written_as_strings_is_shown_with_its_counts(
    tmp_path: Path,
) -> None:
    # Given the record an interrupted batch of an earlier version left (numbers as strings)
    store = LocalStore(str(tmp_path))
    write_info(store, "old", OLD_STYLE)
    # When status reads it
    snap = status.from_store(store, "old")
    # Then it is described with its numbers, not a TypeError
    assert snap is not None
    assert (snap.total, snap.done, snap.succeeded, snap.failed) == (300, 120, 100, 15)
    text = snapshot.describe(snap)
    assert text.startswith("old: interrupted · 120/300 done · 100 succeeded · 15 failed"), text
    assert "400 credits" in text, text


def test_one_unreadable_record_does_not_hide_the_other_batches_from_ls(tmp_path: Path) -> None:
    # Given an output location with a good batch, an old-style one and three broken records
    store = LocalStore(str(tmp_path))
    write_info(store, "old", OLD_STYLE)
    good = {
        "batch_id": "good",
        "status": "running",
        "total": 4,
        "started_at": "2026-11-03T09:00:00Z",
        "counters": {"done": 2.0, "succeeded": 2.0},
    }
    write_info(store, "good", good)
    write_info(store, "torn", '{"batch_id": "torn", "total": 3')
    write_info(store, "odd", {"batch_id": "odd", "total": [1], "counters": "x", "started_at": 5})
    write_info(store, "list", "[1, 2]")
    # When ls lists it, and each line is described
    lines = [snapshot.describe(snap) for snap in status.listing(store)]
    # Then the readable batches are listed, newest first, and the broken ones do not stop it
    ids = [line.split(":")[0] for line in lines]
    assert ids[:2] == ["good", "old"], lines
    assert set(ids) <= {"good", "old", "odd"}, lines


def test_a_live_snapshot_separates_waiting_submitted_and_storing_lines(
    redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    """The defect: "in progress" counted every line without a row, the 300 not yet submitted
    too. Now the lines left are split by where they wait."""
    state = State(text_client(redis_url))
    try:
        # Given a batch of 10: 2 done, 2 ready in the window, 2 bought, 1 being stored (and the
        # rest still in the manifest), beside another batch with lines of its own
        seed_batch(state, "b1", total=10)
        state.add_counts("b1", done=2, succeeded=2)
        homes = [LineStatus.READY] * 2 + [LineStatus.SUBMITTING, LineStatus.SUBMITTED]
        homes.append(LineStatus.FETCHED)
        for idx, line_status in enumerate(homes):
            put_line(state, record(idx, batch="b1", status=line_status))
        seed_batch(state, "b10", total=5)
        for idx, line_status in enumerate([LineStatus.READY, LineStatus.SUBMITTED]):
            put_line(state, record(idx, batch="b10", status=line_status))
        # When status reads it
        snap = status.from_redis(state, "b1")
    finally:
        state.close()
    # Then 5 are waiting (2 in the window, 3 in the manifest), 2 submitted, 1 storing
    assert snap is not None and snap.breakdown() == (5, 2, 1)
    text = snapshot.describe(snap)
    assert (
        "2/10 done · 2 succeeded · 0 failed · 0 rejected · 5 waiting · 2 submitted · 1 storing"
        in text
    )
    assert "in progress" not in text
