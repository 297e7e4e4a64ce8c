"""The archived manifest as a backlog: its lines read from any byte offset, in bounded chunks.

The feeder admits the window's next lines from a cursor (byte offset, physical line number,
counted-line index), finalize pairs each row with the line it came from, and a reuse reads
the claimed lines of the local copy; all three read through ``lines_from``, which cuts,
numbers and skips lines exactly as ``jobs.manifest.parse.read_manifest`` does (both cut with
``jobs.manifest.lines``). The backlog reads its bytes itself, from a ``Source``: the archived
manifest in the output store (``Stored``) or an open local file (``Opened``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from jobs.manifest.lines import BOM, PhysicalLine, Splitter, content
from jobs.storage.base import Store

CHUNK = 256 * 1024


class Source(Protocol):
    """Where a backlog's bytes are."""

    def read(self, start: int, end: int) -> bytes | None:
        """Bytes ``start`` to ``end`` (exclusive); fewer at the end."""
        ...


@dataclass(frozen=True)
class Stored:
    """The manifest archived in the output store under ``key``."""

    store: Store
    key: str

    def read(self, start: int, end: int) -> bytes | None:
        return self.store.get_range(self.key, start, end)


@dataclass(frozen=True)
class Opened:
    """A local copy of the manifest, open for reading."""

    handle: BinaryIO

    def read(self, start: int, end: int) -> bytes | None:
        self.handle.seek(start)
        return self.handle.read(end - start)


@dataclass(frozen=True)
class Cursor:
    """Where the backlog's next unread line starts."""

    idx: int = 0
    """Counted lines before it."""
    offset: int = 0
    line: int = 0
    """Physical lines before it."""


@dataclass(frozen=True)
class BacklogLine:
    """One counted line; ``data`` is None for a line over the size cap (never held)."""

    idx: int
    number: int
    data: bytes | None
    end: int
    """Byte offset just past its newline: the cursor after this line."""
    start: int = 0
    """Byte offset of its first byte."""


def _physical(source: Source, cursor: Cursor, size: int) -> Iterator[PhysicalLine]:
    """The physical lines from ``cursor`` on, reading ``size`` bytes at a time."""
    split = Splitter(cursor.offset, cursor.line)
    offset = cursor.offset
    while True:
        data = source.read(offset, offset + size) or b""
        if data:
            yield from split.feed(data)
        if len(data) < size:
            break
        offset += len(data)
    yield from split.end()


def lines_from(source: Source, cursor: Cursor, chunk: int = CHUNK) -> Iterator[BacklogLine]:
    """Every counted line from ``cursor`` on, reading ``chunk`` bytes at a time."""
    idx, start = cursor.idx, cursor.offset
    for number, raw, end in _physical(source, cursor, chunk):
        data = raw if raw is None else content(number, raw)
        begins, start = start, end
        if raw is not None and data is None:
            continue
        yield BacklogLine(idx, number, data, end, begins)
        idx += 1


def original(source: Source, line: BacklogLine, chunk: int = CHUNK) -> Iterator[bytes]:
    """The line as written, for failed.jsonl: its text, or for a line over the size cap (never
    held whole) its bytes streamed from the manifest, line end included."""
    if line.data is not None:
        yield line.data
        return
    offset = line.start
    while offset < line.end:
        data = source.read(offset, min(line.end, offset + chunk)) or b""
        if not data:
            return
        yield data.removeprefix(BOM) if offset == 0 else data
        offset += len(data)
