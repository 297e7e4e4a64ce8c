"""What earlier runs of a batch left, as a start reads it: the part files of rows (in bulk:
a finished line is never bought again, a failed one is retried under a new attempt), the
counters they carried (submits, jobs, polls add up across runs) and the seconds they worked.

``Skip`` is the bitmap a start builds of the lines that already have a row (rejected now,
stored by an earlier run, in a group found again, taken from another batch): the feeder
skips them without parsing them (``worker.batch.feeder.SkipMap`` reads it back).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jobs.output import parts
from jobs.pricing import currency
from jobs.settings import CoreSettings
from jobs.storage import Store


class Skip:
    """A bit per counted line (by index) that already has a row."""

    def __init__(self) -> None:
        self.bits = bytearray()

    def has(self, idx: int) -> bool:
        byte = idx // 8
        return byte < len(self.bits) and bool(self.bits[byte] & (0x80 >> (idx % 8)))

    def set(self, idx: int) -> None:
        byte = idx // 8
        if byte >= len(self.bits):
            self.bits.extend(b"\x00" * (byte + 1 - len(self.bits)))
        self.bits[byte] |= 0x80 >> (idx % 8)


@dataclass
class Earlier:
    """What the part files say: the counters recounted from the rows, each failed line's last
    attempt, and how many lines are stored already."""

    counts: dict[str, float]
    prior: dict[int, int] = field(default_factory=dict)
    carried: int = 0

    def attempts(self, idx: int) -> int:
        """Attempts an earlier run made of line ``idx`` (0: none failed)."""
        return self.prior.get(idx, 0)


def read_earlier(
    settings: CoreSettings,
    store: Store,
    batch: str,
    rejected: dict[int, str],
    lines: int,
    skip: Skip,
) -> Earlier:
    """Read the batch's part files: each succeeded line is skipped and counted (its credits
    too), each failed line's attempts are kept so its next one is new; ``rejected`` lines
    have their row from this start."""
    earlier = Earlier({"rejected": len(rejected), "done": len(rejected)})
    counts, prior = earlier.counts, earlier.prior
    for part in parts.read_parts(store, batch):
        for idx, text in part.items():
            if idx in rejected or idx >= lines:
                continue
            row = _status_only(text)
            if row["status"] == "succeeded":
                skip.set(idx)
                earlier.carried += 1
                counts["done"] += 1
                counts["succeeded"] = counts.get("succeeded", 0) + 1
                provider = row["provider"]
                unit = settings.provider_spec(provider).credit_unit
                name = f"credits:{currency(provider, unit)}"
                counts[name] = counts.get(name, 0.0) + float(row.get("credits") or 0)
            elif row["status"] == "failed":
                prior[idx] = max(prior.get(idx, 0), int(row.get("attempts") or 0))
    return earlier


def carry_counters(info: dict[str, Any], counts: dict[str, float]) -> None:
    """What earlier runs sent and paid for (submits, jobs, polls, ...) adds up across runs; the
    rows' counts were recounted from the part files."""
    before = info.get("counters") or {}
    for name, value in before.items():
        if not _recounted(name) and value:
            counts[name] = float(value)


def worked(info: dict[str, Any]) -> float:
    """Seconds the batch's earlier runs worked: recorded since the record holds them; for a
    batch an earlier version finished, its first start to its finalize."""
    if info.get("elapsed_s") is not None:
        return float(info["elapsed_s"])
    summary = info.get("summary") or {}
    try:
        started = datetime.fromisoformat(summary["started_at"])
        finished = datetime.fromisoformat(summary["finished_at"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return max(0.0, (finished - started).total_seconds())


def _recounted(counter: str) -> bool:
    """Counters a start recounts from the stored rows (the others add up across runs)."""
    return counter in ("done", "succeeded", "failed", "rejected", "reserved") or (
        counter.startswith("credits:")
    )


def _status_only(text: str) -> dict[str, Any]:
    """What a resume needs of a stored row; a succeeded row (most of them, in a big resume)
    is recognised without parsing it all. The fields read come before any text a user or a
    provider wrote into the row (and such text has its quotes escaped)."""
    if text.partition('"status":"')[2].startswith('succeeded"'):
        provider = text.partition('"provider":"')[2].partition('"')[0]
        credits = text.partition('"credits":')[2].partition(",")[0]
        return {"status": "succeeded", "provider": provider, "credits": float(credits or 0)}
    row: dict[str, Any] = json.loads(text)
    return row
