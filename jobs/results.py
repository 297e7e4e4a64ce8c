"""Where a batch's outputs live, and how results.jsonl and summary.json are written.

Besides the two files users read, each finished line leaves a small record under
``BATCH/.state/lines/ID.json``. It is the durable record of truth: a re-run reads it to skip
lines already stored (even if Redis was wiped) and to number new attempts past old ones.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from jobs.request import ResultRow
from jobs.storage import Store

STATE_DIR = ".state/lines"


def image_key(batch: str, line_id: str, k: int, extension: str) -> str:
    return f"{batch}/images/{line_id}/{k}.{extension}"


def record_key(batch: str, line_id: str) -> str:
    return f"{batch}/{STATE_DIR}/{line_id}.json"


def results_key(batch: str) -> str:
    return f"{batch}/results.jsonl"


def summary_key(batch: str) -> str:
    return f"{batch}/summary.json"


def manifest_key(batch: str) -> str:
    return f"{batch}/manifest.jsonl"


@dataclass
class Tally:
    """Counts and credits of the rows written, for summary.json."""

    total: int = 0
    by_status: dict[str, int] = field(
        default_factory=lambda: {"succeeded": 0, "failed": 0, "rejected": 0}
    )
    credits: float = 0.0

    def add(self, row: ResultRow) -> None:
        self.total += 1
        self.by_status[row.status] += 1
        self.credits += row.credits


def write_results(store: Store, batch: str, rows: Iterable[str]) -> Tally:
    """Stream rows (JSON strings, manifest order) into results.jsonl; returns the tally."""
    tally = Tally()
    handle, path = tempfile.mkstemp(prefix="imagebatch-results-", suffix=".jsonl")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for text in rows:
                row = ResultRow.model_validate_json(text)
                tally.add(row)
                out.write(row.model_dump_json() + "\n")
        store.put_file(results_key(batch), path, "application/x-ndjson")
    finally:
        os.unlink(path)
    return tally


def write_summary(store: Store, batch: str, summary: dict[str, Any]) -> None:
    data = json.dumps(summary, indent=2).encode()
    store.put(summary_key(batch), data, "application/json")


def read_records(store: Store, batch: str) -> dict[str, ResultRow]:
    """Every durable line record of the batch, by line id (one listing, then one GET each)."""
    records: dict[str, ResultRow] = {}
    prefix = f"{batch}/{STATE_DIR}/"
    for key in store.list_keys(prefix):
        data = store.get(key)
        if data is None:
            continue
        try:
            row = ResultRow.model_validate_json(data)
        except ValidationError:
            continue
        if row.id is not None:
            records[row.id] = row
    return records


def images_intact(store: Store, batch: str, row: ResultRow) -> bool:
    """True when every image of a succeeded row is stored with the sha256 the row records."""
    if row.status != "succeeded" or not row.images or row.id is None:
        return False
    for k, image in enumerate(row.images):
        extension = image.uri.rsplit(".", 1)[-1]
        if store.sha256_of(image_key(batch, row.id, k, extension)) != image.sha256:
            return False
    return True
