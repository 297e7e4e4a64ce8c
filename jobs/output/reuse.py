"""Never buying the same image twice: a line already bought and stored under the same output,
in any batch, is taken from there (its images copied, its row saying where from) instead of
being bought again.

The index is the batches' own, written beside their part files: ``BATCH/.state/stored/C.tsv``
holds ``FINGERPRINT<TAB>INDEX`` for each succeeded line of part file C (every image stored),
rewritten whenever the part file is (so it never lists a row the part file does not hold).
Nothing is shared between batches: two batches running at once under one output each write
only their own files, and read the others' as they stand (each file is replaced whole, so a
reader sees the old or the new one). A line counts as bought from the moment its row is
flushed, whether its batch finished, stopped or was interrupted.

A new batch looks lines up in bulk, in two passes and bounded memory:

1. ``Wanted``: the manifest's fingerprints, 8 bytes a line; ``find`` reads every other
   batch's index files (in parallel, a few ahead) and claims, for each manifest line still
   without a row, the first stored line with its fingerprint (``Claims``, 12 bytes a line).
2. ``take`` walks the manifest again, and for each claimed line reads the source's row (its
   part file, a few cached), checks it (the full fingerprint, succeeded, every image), copies
   the images into this batch (``Store.copy_new``: S3 copies server-side with a checksum, a
   directory hard-links) and writes the row here, credits 0, ``reused_from`` naming the source.

A line whose copy fails is bought as usual. The fingerprint (``ImageRequest.fingerprint``)
holds the line's id, its provider and every field that decides what is bought, never its
metadata; its first 64 bits select candidates, the full digest (in the source's row) decides.
"""

from __future__ import annotations

import contextlib
import json
from array import array
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from jobs.clock import now_iso
from jobs.errors import StorageError
from jobs.manifest import parse
from jobs.manifest.backlog import Cursor, Opened, lines_from
from jobs.manifest.request import ImageRequest
from jobs.output import layout, parts
from jobs.output.rows import ImageRef, ResultRow, ReusedFrom
from jobs.storage import Store

THREADS = 16
T = TypeVar("T")


def record(store: Store, batch: str, chunk: int, rows: Mapping[int, str]) -> None:
    """Add finished rows to chunk ``chunk``: its part file, then its index (written from the
    whole part file, so a crash between the two is mended by the chunk's next write)."""
    merged = parts.write_part(store, batch, chunk, rows)
    store.put(layout.stored_key(batch, chunk), index_entries(merged), "text/tab-separated-values")


def index_entries(rows: Mapping[int, str]) -> bytes:
    """``FINGERPRINT<TAB>INDEX`` lines for the succeeded rows among ``rows``."""
    found = ((stored_fingerprint(text), idx) for idx, text in sorted(rows.items()))
    return "".join(f"{fp}\t{idx}\n" for fp, idx in found if fp).encode()


def stored_fingerprint(text: str) -> str | None:
    """A succeeded row's fingerprint, read without parsing the row: ``status`` and
    ``fingerprint`` come before anything a user or provider wrote into it (``metadata``), and
    text in a JSON string has its quotes escaped, so the first match is the field itself."""
    if not text.partition('"status":"')[2].startswith('succeeded"'):
        return None
    value = text.partition('"fingerprint":')[2]
    return value[1:65] if value.startswith('"') and value[65:66] == '"' else None


class Wanted:
    """The fingerprints of a manifest's lines, 8 bytes a line: each is the top bits of its
    fingerprint with the line's index in the low bits, in one sorted array."""

    def __init__(self) -> None:
        self._keys: array[int] = array("Q")
        self._lines: array[int] = array("I")
        self._packed: array[int] = array("Q")
        self._shift = 1

    def add(self, fingerprint: str, idx: int) -> None:
        self._keys.append(int(fingerprint[:16], 16))
        self._lines.append(idx)

    def __len__(self) -> int:
        return len(self._packed) or len(self._lines)

    def freeze(self) -> None:
        """Sort for lookups; nothing may be added after."""
        shift = self._shift = max(1, max(self._lines, default=0).bit_length())
        pairs = zip(self._keys, self._lines, strict=True)
        packed = sorted((key >> shift) << shift | idx for key, idx in pairs)
        self._packed = array("Q", packed)
        self._keys, self._lines = array("Q"), array("I")

    def lines(self, fingerprint: str) -> Iterator[int]:
        """The indexes of the lines whose fingerprint may be this one (the full digest, in the
        stored row, decides)."""
        mask = (1 << self._shift) - 1
        key = (int(fingerprint[:16], 16) >> self._shift) << self._shift
        pos = bisect_left(self._packed, key)
        while pos < len(self._packed) and self._packed[pos] & ~mask == key:
            yield self._packed[pos] & mask
            pos += 1


@dataclass
class Claims:
    """For each manifest line, the stored line it will be taken from, if any (12 bytes a
    line: the source batch's number, its part file and its index)."""

    size: int
    batches: list[str] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self._batch = array("I", bytes(4 * self.size))
        self._chunk = array("I", bytes(4 * self.size))
        self._line = array("I", bytes(4 * self.size))

    def claim(self, idx: int, batch: int, chunk: int, line: int) -> bool:
        if self._batch[idx]:
            return False
        self._batch[idx], self._chunk[idx], self._line[idx] = batch + 1, chunk, line
        self.count += 1
        return True

    def source(self, idx: int) -> tuple[str, int, int] | None:
        """(batch, part chunk, line index) of the claimed source, or None."""
        number = self._batch[idx] if idx < self.size else 0
        if not number:
            return None
        return self.batches[number - 1], self._chunk[idx], self._line[idx]


def find(
    store: Store,
    wanted: Wanted,
    total: int,
    *,
    exclude: str | None = None,
    done: Callable[[int], bool] = lambda idx: False,
    threads: int = THREADS,
) -> Claims:
    """Claim a stored line for every manifest line that has one under ``store`` (in any batch
    but ``exclude``) and no row yet (``done``)."""
    claims = Claims(total)
    if not len(wanted):
        return claims
    batches = [name for name in store.list_children("") if name != exclude]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        listed = pool.map(lambda name: list(store.list_keys(f"{name}/{layout.STORED}/")), batches)
        files = ((number, key) for number, keys in enumerate(listed) for key in keys)

        def read(item: tuple[int, str]) -> tuple[int, int, list[tuple[int, int]]]:
            number, key = item
            chunk = int(key.rsplit("/", 1)[1].split(".")[0])
            found: list[tuple[int, int]] = []
            for entry in (store.get(key) or b"").decode().splitlines():
                fp, _, idx = entry.partition("\t")
                if len(fp) != 64 or not idx.isdigit():
                    continue  # not an entry of ours: ignored, like a non-hex one below
                with contextlib.suppress(ValueError):
                    found.extend((line, int(idx)) for line in wanted.lines(fp))
            return number, chunk, found

        claims.batches = batches
        for number, chunk, found in _ahead(pool, read, files, threads):
            for line, idx in found:
                if line < total and not done(line):
                    claims.claim(line, number, chunk, idx)
    return claims


ProviderOf = Callable[[ImageRequest], str]


def take(
    store: Store,
    batch: str,
    manifest: str,
    claims: Claims,
    provider_of: ProviderOf,
    chunk_lines: int,
    *,
    threads: int = THREADS,
) -> Iterator[tuple[int, ImageRequest]]:
    """Copy every claimed line's images into ``batch`` and write its row there; yields each
    line's index and request once its row is stored. ``manifest`` is a local copy of the
    manifest."""
    if not claims.count:
        return
    sources = _Sources(store)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: list[Future[_Copied]] = []
        chunk = -1
        for idx, number, request, (source, part, line) in claimed(manifest, claims):
            if idx // chunk_lines != chunk:
                yield from _store_rows(store, batch, chunk, pending)
                chunk, pending = idx // chunk_lines, []
            stored = sources.row(source, part, line)
            if stored is not None:
                copy = _Copy(store, batch, idx, number, request, source, stored)
                pending.append(pool.submit(copy, provider_of(request)))
        yield from _store_rows(store, batch, chunk, pending)


def claimed(
    manifest: str, claims: Claims
) -> Iterator[tuple[int, int, ImageRequest, tuple[str, int, int]]]:
    """The claimed lines of the (local) manifest, in order: index, line number, request and
    the claimed source."""
    with open(manifest, "rb") as handle:
        for entry in lines_from(Opened(handle), Cursor()):
            source = claims.source(entry.idx)
            if source is None or entry.data is None:
                continue
            request = parse.parse_line(entry.number, entry.data, None).request
            if request is not None:
                yield entry.idx, entry.number, request, source


_Copied = tuple[int, ImageRequest, str | None]
"""A claimed line's index, request and new row (None: it is bought instead)."""


def _store_rows(
    store: Store, batch: str, chunk: int, pending: list[Future[_Copied]]
) -> Iterator[tuple[int, ImageRequest]]:
    """Once every image of a chunk's reused lines is copied, their rows go in together."""
    copied = [future.result() for future in pending]
    rows = {idx: row for idx, _, row in copied if row is not None}
    if rows:
        record(store, batch, chunk, rows)
    yield from ((idx, request) for idx, request, row in copied if row is not None)


@dataclass(frozen=True)
class _Copy:
    """One reused line: its source row checked, its images copied, its row made."""

    store: Store
    batch: str
    idx: int
    number: int
    request: ImageRequest
    source: str
    stored: dict[str, Any]

    def __call__(self, provider: str) -> _Copied:
        request, stored, store = self.request, self.stored, self.store
        fingerprint = request.fingerprint(provider)
        images: list[dict[str, Any]] = stored.get("images") or []
        if (
            stored.get("status") != "succeeded"
            or stored.get("fingerprint") != fingerprint
            or len(images) != request.n
        ):
            return self.idx, request, None
        line_id = request.line_id
        copied: list[ImageRef] = []
        try:
            for k, image in enumerate(images):
                extension = str(image["uri"]).rsplit(".", 1)[1]
                key = layout.image_key(self.batch, line_id, k, extension)
                source = layout.image_key(self.source, line_id, k, extension)
                store.copy_new(source, key, image["sha256"], int(image["bytes"]))
                copied.append(ImageRef.model_validate({**image, "uri": store.uri(key)}))
        except (StorageError, KeyError, IndexError, ValueError):
            # Bought as usual instead; what was copied goes, so the purchase can be stored.
            for k, ref in enumerate(copied):
                store.delete(layout.image_key(self.batch, line_id, k, ref.uri.rsplit(".", 1)[1]))
            return self.idx, request, None
        row = ResultRow(
            line=self.number,
            id=line_id,
            status="succeeded",
            prompt=request.prompt,
            model=request.model,
            provider=stored.get("provider") or provider,
            fingerprint=fingerprint,
            images=copied,
            metadata=request.metadata,
            completed_at=now_iso(),
            reused_from=ReusedFrom(
                batch=self.source, line=int(stored["line"]), job_id=stored.get("job_id")
            ),
        )
        return self.idx, request, row.model_dump_json()


class _Sources:
    """Source rows by (batch, chunk, index), a few part files cached: a re-run of a manifest
    reads its source's part files in order, each once."""

    KEEP = 32

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cached: OrderedDict[tuple[str, int], dict[int, str]] = OrderedDict()

    def row(self, batch: str, chunk: int, idx: int) -> dict[str, Any] | None:
        key = (batch, chunk)
        rows = self.cached.get(key)
        if rows is None:
            data = self.store.get(layout.part_key(batch, chunk))
            rows = self.cached[key] = parts.decode_entries(data) if data else {}
            if len(self.cached) > self.KEEP:
                self.cached.popitem(last=False)
        self.cached.move_to_end(key)
        text = rows.get(idx)
        if text is None:
            return None
        value = json.loads(text)
        return value if isinstance(value, dict) else None


def _ahead(
    pool: ThreadPoolExecutor, work: Callable[[Any], T], items: Iterable[Any], threads: int
) -> Iterator[T]:
    """``work`` over ``items`` in ``pool``, results in order, at most ``2 * threads`` ahead."""
    running: deque[Future[T]] = deque()
    for item in items:
        running.append(pool.submit(work, item))
        if len(running) >= 2 * threads:
            yield running.popleft().result()
    while running:
        yield running.popleft().result()
