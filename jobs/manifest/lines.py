"""A manifest's physical lines: bytes cut into numbered lines, and which of them count.

Both readers of a manifest cut it here, so they number and skip lines the same way: the
parser (``jobs.manifest.parse.read_manifest``, the whole manifest as it is validated) and the
backlog (``jobs.manifest.backlog``, the archived manifest read from a byte offset). A line
longer than ``MAX_LINE_BYTES`` is never held whole: it is cut as ``None``.

``Splitter`` is fed: its reader reads the bytes (a file, a range of the archived manifest)
and hands each chunk to ``feed``, so the splitter never calls back into its reader.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

MAX_LINE_BYTES = 1024 * 1024
BOM = b"\xef\xbb\xbf"

PhysicalLine = tuple[int, bytes | None, int]
"""(line number, its bytes or None when over the size cap, the offset just past its newline)."""


class Splitter:
    """Cuts chunks of bytes into physical lines, from ``offset``/``number`` on: ``feed`` each
    chunk in order, then ``end`` for a last line without a newline."""

    def __init__(self, offset: int = 0, number: int = 0) -> None:
        self.offset, self.number = offset, number
        self.pending = bytearray()
        self.overlong = False

    def feed(self, chunk: bytes) -> Iterator[PhysicalLine]:
        """The lines ``chunk`` completes."""
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not self.overlong:
                    self.pending += chunk[start:]
                    if len(self.pending) > MAX_LINE_BYTES:
                        self.overlong, self.pending = True, bytearray()
                break
            self.number += 1
            too_long = self.overlong or len(self.pending) + end - start > MAX_LINE_BYTES
            data = None if too_long else bytes(self.pending + chunk[start:end])
            yield self.number, data, self.offset + end + 1
            self.pending, self.overlong = bytearray(), False
            start = end + 1
        self.offset += len(chunk)

    def end(self) -> Iterator[PhysicalLine]:
        """The last line, when the bytes do not end with a newline."""
        if self.pending or self.overlong:
            yield self.number + 1, None if self.overlong else bytes(self.pending), self.offset


def physical_lines(
    chunks: Iterable[bytes], offset: int = 0, number: int = 0
) -> Iterator[PhysicalLine]:
    """Every physical line of ``chunks`` (a file's bytes, read by the caller)."""
    split = Splitter(offset, number)
    for chunk in chunks:
        yield from split.feed(chunk)
    yield from split.end()


def content(number: int, data: bytes) -> bytes | None:
    """A line's text as it is read (BOM and CR stripped), or None when it is not counted:
    blank, or a ``#`` comment."""
    if number == 1 and data.startswith(BOM):
        data = data[len(BOM) :]
    data = data.rstrip(b"\r")
    if not data.strip() or data.lstrip().startswith(b"#"):
        return None
    return data
