"""What a finished batch adds up to, and the files users read: ``results.jsonl`` (one row per
counted line, in manifest order), ``failed.jsonl`` (the lines to fix and run again) and the
small JSON records (``summary.json``, ``.state/batch.json``)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from jobs.manifest.backlog import Cursor, Source, lines_from, original
from jobs.output.layout import failed_key, results_key
from jobs.pricing import Money, ProviderTotal, money_of
from jobs.storage import Store


@dataclass
class Tally:
    """Counts and money of the rows written, for summary.json (money never mixes units)."""

    total: int = 0
    by_status: dict[str, int] = field(
        default_factory=lambda: {"succeeded": 0, "failed": 0, "rejected": 0}
    )
    by_provider: dict[str, ProviderTotal] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    reused: int = 0
    """Lines taken from another batch under the same output (not bought, not in
    ``by_provider``)."""

    @property
    def money(self) -> Money:
        return money_of(self.by_provider)

    def add(self, row: Mapping[str, Any], units: Mapping[str, str]) -> None:
        """Count one row; ``units``: each provider's credit unit ("credits" for one not in it)."""
        self.total += 1
        status = str(row["status"])
        self.by_status[status] = self.by_status.get(status, 0) + 1
        error = row.get("error")
        if isinstance(error, dict) and status != "succeeded":
            kind = str(error.get("type"))
            self.failures[kind] = self.failures.get(kind, 0) + 1
        if row.get("reused_from"):
            self.reused += 1
            return
        provider = row.get("provider")
        if not isinstance(provider, str) or status == "rejected":
            return
        totals = self.by_provider.get(provider)
        if totals is None:
            totals = self.by_provider[provider] = ProviderTotal(unit=units.get(provider, "credits"))
        totals.lines += 1
        totals.images += len(row.get("images") or ())
        totals.credits += float(row.get("credits") or 0)


def write_results(
    store: Store,
    batch: str,
    rows: Iterable[tuple[int, str]],
    manifest: Source,
    units: Mapping[str, str],
    total: int,
) -> Tally:
    """Stream rows (index order) into results.jsonl, and the failed and rejected lines, with
    their reason in a ``#`` comment the manifest reader skips, into failed.jsonl.

    The archived ``manifest``'s counted lines are read alongside the rows (each its original
    bytes, in chunks: a line over the size cap is copied without being held), so a line in
    failed.jsonl is exactly what the user wrote, ready to fix.
    Raises ``IncompleteBatch`` when a counted line has no row.
    """
    tally = Tally()
    lines = lines_from(manifest, Cursor())
    out_fd, out_path = tempfile.mkstemp(prefix="imagebatch-results-", suffix=".jsonl")
    bad_fd, bad_path = tempfile.mkstemp(prefix="imagebatch-failed-", suffix=".jsonl")
    try:
        with os.fdopen(out_fd, "w", encoding="utf-8") as out, os.fdopen(bad_fd, "wb") as bad:
            expected = 0
            for idx, text in rows:
                if idx != expected:
                    raise IncompleteBatch(f"line index {expected} has no result row")
                expected += 1
                row = json.loads(text)
                line = next(lines, None)
                tally.add(row, units)
                out.write(text + "\n")
                if row["status"] != "succeeded":
                    bad.write(f"{failure_comment(row)}\n".encode())
                    _copy_line(original(manifest, line) if line else (), bad)
            if expected != total:
                raise IncompleteBatch(f"{total - expected} lines have no result row")
        store.put_file(results_key(batch), out_path, "application/x-ndjson")
        store.put_file(failed_key(batch), bad_path, "application/x-ndjson")
    finally:
        os.unlink(out_path)
        os.unlink(bad_path)
    return tally


def failure_comment(row: Mapping[str, Any]) -> str:
    """``# line 3: rejected: why`` (a rejection's type is its status: said once), or
    ``# line 5: failed (timeout): why``."""
    error = row.get("error") or {}
    kind = error.get("type")
    status = str(row["status"])
    said = status if kind in (None, status) else f"{status} ({kind})"
    reason = str(error.get("message")).replace("\r", " ").replace("\n", " ")
    return f"# line {row['line']}: {said}: {reason}"


def _copy_line(chunks: Iterable[bytes], out: BinaryIO) -> None:
    """Write one line from its chunks, with exactly one ``\n`` at its end."""
    pending = b""
    for chunk in chunks:
        data = pending + chunk
        out.write(data[:-2])
        pending = data[-2:]
    out.write(pending.rstrip(b"\r\n") + b"\n")


class IncompleteBatch(RuntimeError):
    """Finalize found a counted line without a row: it must not write a results manifest."""


def write_json(store: Store, key: str, value: Mapping[str, Any]) -> None:
    store.put(key, json.dumps(value, indent=2).encode(), "application/json")


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    data = store.get(key)
    if data is None:
        return None
    value = json.loads(data)
    return value if isinstance(value, dict) else None
