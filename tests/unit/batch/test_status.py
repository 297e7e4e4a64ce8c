"""``status`` and ``ls`` read what any version of imagebatch left in the output store: the
defect was a ``.state/batch.json`` written by an interrupted or still-running batch with its
numbers as strings (``"total": "300"``), which crashed ``status`` and, through it, ``ls`` for
every batch under the location."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.output import layout
from jobs.storage import LocalStore
from worker.batch import status


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
    text = status.describe(snap)
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
    lines = [status.describe(snap) for snap in status.listing(store)]
    # Then the readable batches are listed, newest first, and the broken ones do not stop it
    ids = [line.split(":")[0] for line in lines]
    assert ids[:2] == ["good", "old"], lines
    assert set(ids) <= {"good", "old", "odd"}, lines
