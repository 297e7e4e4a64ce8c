"""The durable index of finished lines: part files of rows under ``BATCH/.state/parts/``.

Rows in ``.state`` are ``INDEX<TAB>ROW-JSON`` lines sorted by index, where INDEX counts the
manifest's counted lines from 0. A resume reads the part files in bulk (one request per
chunk, not per line) and ``finalize`` streams them, in index order, into ``results.jsonl``.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from jobs.output.layout import PARTS, part_key, rejected_key
from jobs.storage import Store


def parse_entry(text: str) -> tuple[int, str]:
    idx, _, row = text.partition("\t")
    return int(idx), row


def encode_entries(entries: Mapping[int, str]) -> bytes:
    return "".join(f"{idx}\t{entries[idx]}\n" for idx in sorted(entries)).encode()


def decode_entries(data: bytes) -> dict[int, str]:
    return dict(parse_entry(line) for line in data.decode().splitlines() if line)


def write_part(store: Store, batch: str, chunk: int, rows: Mapping[int, str]) -> dict[int, str]:
    """Add ``rows`` to chunk ``chunk``'s part file; a row replaces an older one of its line
    (a failed line that a re-run retried). Returns every row the part file now holds."""
    key = part_key(batch, chunk)
    existing = store.get(key)
    merged = decode_entries(existing) if existing else {}
    merged.update(rows)
    store.put(key, encode_entries(merged), "text/tab-separated-values")
    return merged


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
