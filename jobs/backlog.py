"""The archived manifest as a backlog: its lines read from any byte offset, in bounded chunks.

The feeder admits the window's next lines from a cursor (byte offset, physical line number,
counted-line index) and finalize pairs each row with the line it came from; both read the
manifest through ``lines_from``, which numbers and skips lines exactly as
``jobs.manifest.read_manifest`` does (BOM, CRLF, blank and ``#`` lines).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from jobs.manifest import BOM, MAX_LINE_BYTES

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
    """One counted line; ``data`` is None for a line over ``MAX_LINE_BYTES`` (never held)."""

    idx: int
    number: int
    data: bytes | None
    raw: bytes
    """The line as written (without its newline), for failed.jsonl; empty when over the cap."""
    end: int
    """Byte offset just past its newline: the cursor after this line."""


def lines_from(read: ReadRange, cursor: Cursor, chunk: int = CHUNK) -> Iterator[BacklogLine]:
    """Every counted line from ``cursor`` on, reading ``chunk`` bytes at a time."""
    offset, number, idx = cursor.offset, cursor.line, cursor.idx
    pending = bytearray()
    overlong = False
    while True:
        data = read(offset, offset + chunk) or b""
        at_end = len(data) < chunk
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                if not overlong:
                    pending += data[pos:]
                    if len(pending) > MAX_LINE_BYTES:
                        overlong, pending = True, bytearray()
                break
            number += 1
            piece = None if overlong else bytes(pending + data[pos:nl])
            end = offset + nl + 1
            line = _counted(idx, number, piece, end)
            if line is not None:
                yield line
                idx += 1
            pending, overlong, pos = bytearray(), False, nl + 1
        offset += len(data)
        if at_end:
            break
    if pending or overlong:
        line = _counted(idx, number + 1, None if overlong else bytes(pending), offset)
        if line is not None:
            yield line


def _counted(idx: int, number: int, piece: bytes | None, end: int) -> BacklogLine | None:
    if piece is None or len(piece) > MAX_LINE_BYTES:
        return BacklogLine(idx, number, None, b"", end)
    raw = piece[len(BOM) :] if number == 1 and piece.startswith(BOM) else piece
    text = raw.rstrip(b"\r")
    if not text.strip() or text.lstrip().startswith(b"#"):
        return None
    return BacklogLine(idx, number, text, text, end)
