"""``.state/batch.json``: what ``status`` and ``ls`` show of a batch once Redis forgot it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from jobs.clock import now_iso
from jobs.output.layout import info_key
from jobs.output.results import write_json
from jobs.storage import Store


def write_info(
    store: Store, batch: str, record: Mapping[str, Any], counts: Mapping[str, float]
) -> None:
    """Write the batch's record as ``status`` and ``ls`` read it. ``record`` may come straight
    from Redis (every value a string): numbers are written as numbers."""
    keep = (
        *("batch_id", "status", "out_uri", "provider", "source", "manifest_sha"),
        "max_usd_per_image",
    )
    info: dict[str, Any] = {name: str(record[name]) for name in keep if name in record}
    if record.get("fresh"):
        info["fresh"] = True
    if record.get("total") not in (None, ""):
        info["total"] = int(record["total"])
    info |= {
        "started_at": record.get("started_at"),
        "runs": int(record.get("runs", 1)),
        "elapsed_s": elapsed_s(record),
        "counters": {k: float(v) for k, v in counts.items() if not k.startswith("reserved")},
        "updated_at": now_iso(),
    }
    write_json(store, info_key(batch), info)


def elapsed_s(record: Mapping[str, Any]) -> float:
    """Seconds the batch's runs have worked, added up: the earlier runs' (``elapsed_before``)
    and this one's so far (since ``run_started``; a run with nothing to do adds nothing).
    A batch resumed a day later took its runs' time, not a day."""
    before = float(record.get("elapsed_before") or 0.0)
    started = record.get("run_started")
    now = max(0.0, time.time() - float(started)) if started not in (None, "") else 0.0
    return round(before + now, 3)
