"""The archived manifest as a backlog: its lines read from any byte offset, in bounded chunks.

The feeder admits the window's next lines from a cursor (byte offset, physical line number,
counted-line index) and finalize pairs each row with the line it came from; both read the
manifest through ``lines_from``, which numbers and skips lines exactly as
``jobs.manifest.read_manifest`` does (the same ``physical_lines`` and ``content``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from jobs.manifest.parse import BOM, content, physical_lines

ReadRange = Callable[[int, int], bytes | None]
"""``read(start, end)``: bytes ``start`` to ``end`` (exclusive) of the manifest."""
CHUNK = 256 * 1024


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


def _chunks(read: ReadRange, offset: int, size: int) -> Iterator[bytes]:
    while True:
        data = read(offset, offset + size) or b""
        if data:
            yield data
        if len(data) < size:
            return
        offset += len(data)


def lines_from(read: ReadRange, cursor: Cursor, chunk: int = CHUNK) -> Iterator[BacklogLine]:
    """Every counted line from ``cursor`` on, reading ``chunk`` bytes at a time."""
    idx, start = cursor.idx, cursor.offset
    chunks = _chunks(read, cursor.offset, chunk)
    for number, raw, end in physical_lines(chunks, cursor.offset, cursor.line):
        data = raw if raw is None else content(number, raw)
        begins, start = start, end
        if raw is not None and data is None:
            continue
        yield BacklogLine(idx, number, data, end, begins)
        idx += 1


def original(read: ReadRange, line: BacklogLine, chunk: int = CHUNK) -> Iterator[bytes]:
    """The line as written, for failed.jsonl: its text, or for a line over the size cap (never
    held whole) its bytes streamed from the manifest, line end included."""
    if line.data is not None:
        yield line.data
        return
    offset = line.start
    while offset < line.end:
        data = read(offset, min(line.end, offset + chunk)) or b""
        if not data:
            return
        yield data.removeprefix(BOM) if offset == 0 else data
        offset += len(data)
