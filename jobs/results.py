"""Where a batch's outputs live, and the durable index of finished lines behind them.

Besides what users read (``images/``, ``results.jsonl``, ``failed.jsonl``, ``summary.json``),
a batch keeps under ``BATCH/.state/``:

    manifest.jsonl      (beside the outputs: ``BATCH/manifest.jsonl``) the archived input, the
                        backlog the feeder reads the window from, by byte offset
    rejected.jsonl      the rows of lines rejected at submit
    parts/CCCCCC.jsonl  the rows of finished lines whose index falls in chunk C
    batch.json          what ``status`` and ``ls`` show once Redis has forgotten the batch

Rows in ``.state`` are ``INDEX<TAB>ROW-JSON`` lines sorted by index, where INDEX counts the
manifest's counted lines from 0. A resume reads the part files in bulk (one request per
chunk, not per line) and ``finalize`` streams them, in index order, into ``results.jsonl``.
"""

from __future__ import annotations

import heapq
import json
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from jobs.pricing import Money, currency
from jobs.storage import Store

STATE = ".state"
PARTS = f"{STATE}/parts"


def image_key(batch: str, line_id: str, k: int, extension: str) -> str:
    return f"{batch}/images/{line_id}/{k}.{extension}"


def results_key(batch: str) -> str:
    return f"{batch}/results.jsonl"


def failed_key(batch: str) -> str:
    return f"{batch}/failed.jsonl"


def summary_key(batch: str) -> str:
    return f"{batch}/summary.json"


def manifest_key(batch: str) -> str:
    return f"{batch}/manifest.jsonl"


def rejected_key(batch: str) -> str:
    return f"{batch}/{STATE}/rejected.jsonl"


def info_key(batch: str) -> str:
    return f"{batch}/{STATE}/batch.json"


def part_key(batch: str, chunk: int) -> str:
    return f"{batch}/{PARTS}/{chunk:06d}.jsonl"


def parse_entry(text: str) -> tuple[int, str]:
    idx, _, row = text.partition("\t")
    return int(idx), row


def encode_entries(entries: Mapping[int, str]) -> bytes:
    return "".join(f"{idx}\t{entries[idx]}\n" for idx in sorted(entries)).encode()


def decode_entries(data: bytes) -> dict[int, str]:
    return dict(parse_entry(line) for line in data.decode().splitlines() if line)


# -- part files ---------------------------------------------------------------------------------


def write_part(store: Store, batch: str, chunk: int, rows: Mapping[int, str]) -> None:
    """Add ``rows`` to chunk ``chunk``'s part file; a row replaces an older one of its line
    (a failed line that a re-run retried)."""
    key = part_key(batch, chunk)
    existing = store.get(key)
    merged = decode_entries(existing) if existing else {}
    merged.update(rows)
    store.put(key, encode_entries(merged), "text/tab-separated-values")


def part_chunks(store: Store, batch: str) -> list[int]:
    prefix = f"{batch}/{PARTS}/"
    return sorted(int(k.removeprefix(prefix).split(".")[0]) for k in store.list_keys(prefix))


def read_parts(store: Store, batch: str, threads: int = 16) -> Iterator[dict[int, str]]:
    """Every part file's rows, fetched in parallel (a resume reads them all at once), at most
    ``2 * threads`` ahead of the reader: memory stays bounded however many parts there are."""

    def load(chunk: int) -> dict[int, str]:
        data = store.get(part_key(batch, chunk))
        return decode_entries(data) if data else {}

    with ThreadPoolExecutor(max_workers=threads) as pool:
        ahead: deque[Future[dict[int, str]]] = deque()
        for chunk in part_chunks(store, batch):
            ahead.append(pool.submit(load, chunk))
            if len(ahead) >= 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def rows_in_order(store: Store, batch: str) -> Iterator[tuple[int, str]]:
    """Every stored row, in index order: the rejected ones merged with the part files."""

    def parts() -> Iterator[tuple[int, str]]:
        for chunk in part_chunks(store, batch):
            data = store.get(part_key(batch, chunk))
            if data:
                yield from sorted(decode_entries(data).items())

    def rejected() -> Iterator[tuple[int, str]]:
        data = store.get(rejected_key(batch))
        if data:
            yield from sorted(decode_entries(data).items())

    last = -1
    for idx, row in heapq.merge(rejected(), parts(), key=lambda entry: entry[0]):
        if idx != last:
            last = idx
            yield idx, row


# -- what finished lines add up to ----------------------------------------------------------


@dataclass
class ProviderTotal:
    """One provider's share of a batch: lines, images, and what they cost (or are estimated to
    cost) in its own unit."""

    lines: int = 0
    images: int = 0
    credits: float = 0.0
    unit: str = "credits"


def money_of(by_provider: Mapping[str, ProviderTotal]) -> Money:
    """Each provider's credits in its own currency: never adds one provider's credits to
    another's, or to dollars."""
    amounts: dict[str, float] = {}
    for name, part in by_provider.items():
        if part.credits:
            key = currency(name, part.unit)
            amounts[key] = round(amounts.get(key, 0.0) + part.credits, 6)
    return Money(amounts)


@dataclass
class Tally:
    """Counts and money of the rows written, for summary.json (money never mixes units)."""

    total: int = 0
    by_status: dict[str, int] = field(
        default_factory=lambda: {"succeeded": 0, "failed": 0, "rejected": 0}
    )
    by_provider: dict[str, ProviderTotal] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def money(self) -> Money:
        return money_of(self.by_provider)

    def add(self, row: Mapping[str, Any], unit_of: Callable[[str], str]) -> None:
        self.total += 1
        status = str(row["status"])
        self.by_status[status] = self.by_status.get(status, 0) + 1
        error = row.get("error")
        if isinstance(error, dict) and status != "succeeded":
            kind = str(error.get("type"))
            self.failures[kind] = self.failures.get(kind, 0) + 1
        provider = row.get("provider")
        if not isinstance(provider, str) or status == "rejected":
            return
        totals = self.by_provider.get(provider)
        if totals is None:
            totals = self.by_provider[provider] = ProviderTotal(unit=unit_of(provider))
        totals.lines += 1
        totals.images += len(row.get("images") or ())
        totals.credits += float(row.get("credits") or 0)


def write_results(
    store: Store,
    batch: str,
    rows: Iterable[tuple[int, str]],
    manifest_lines: Iterator[bytes],
    unit_of: Callable[[str], str],
    total: int,
) -> Tally:
    """Stream rows (index order) into results.jsonl, and the failed and rejected lines, with
    their reason in a ``#`` comment the manifest reader skips, into failed.jsonl.

    ``manifest_lines`` yields the archived manifest's counted lines in order (their original
    bytes), so a line in failed.jsonl is exactly what the user wrote, ready to fix.
    Raises ``IncompleteBatch`` when a counted line has no row.
    """
    tally = Tally()
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
                original = next(manifest_lines, b"")
                tally.add(row, unit_of)
                out.write(text + "\n")
                if row["status"] != "succeeded":
                    error = row.get("error") or {}
                    reason = f"{error.get('type')}: {error.get('message')}".replace("\n", " ")
                    bad.write(f"# line {row['line']}: {row['status']}: {reason}\n".encode())
                    bad.write(original.rstrip(b"\r\n") + b"\n")
            if expected != total:
                raise IncompleteBatch(f"{total - expected} lines have no result row")
        store.put_file(results_key(batch), out_path, "application/x-ndjson")
        store.put_file(failed_key(batch), bad_path, "application/x-ndjson")
    finally:
        os.unlink(out_path)
        os.unlink(bad_path)
    return tally


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
