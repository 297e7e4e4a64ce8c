"""``.state/batch.json``: what ``status`` and ``ls`` show of a batch once Redis forgot it."""

from __future__ import annotations

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
    keep = ("batch_id", "status", "out_uri", "provider", "source", "manifest_sha")
    info: dict[str, Any] = {name: str(record[name]) for name in keep if name in record}
    if record.get("total") not in (None, ""):
        info["total"] = int(record["total"])
    info |= {
        "started_at": record.get("started_at"),
        "runs": int(record.get("runs", 1)),
        "counters": {k: float(v) for k, v in counts.items() if not k.startswith("reserved")},
        "updated_at": now_iso(),
    }
    write_json(store, info_key(batch), info)
