"""Prove a downloaded PNG, JPEG or WebP is whole without decoding its pixels.

A full decode costs milliseconds per image (tens for a real 2-3 MB PNG) and proves little
more for our purpose, which is "the bytes the provider encoded arrived intact": PNG carries
a CRC in every chunk and must end with IEND; WebP's RIFF header states the file's exact
length; a JPEG must be a well-formed run of segments up to its scan and end with its EOI
marker. Any cut or garbled download fails one of these. The dimensions for the result row
come from the same headers. ``bench/image_check.py`` measures both ways.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""JPEG start-of-frame markers (baseline, progressive, lossless…), not DHT/JPG/DAC."""


class BadImage(ValueError):
    """The bytes are not a whole PNG, JPEG or WebP; the message says what is wrong."""


@dataclass(frozen=True)
class Shape:
    format: str
    """``png``, ``jpeg`` or ``webp``."""
    width: int
    height: int


def inspect(data: bytes) -> Shape:
    """The format and size of a whole image; ``BadImage`` for anything cut or malformed."""
    body = data.rstrip(b"\x00")  # some servers pad a body with zeros; the image ends before
    if body.startswith(PNG_SIGNATURE):
        return _png(body)
    if body.startswith(b"\xff\xd8"):
        return _jpeg(body)
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return _webp(data)
    raise BadImage("not PNG, JPEG or WebP")


def _png(data: bytes) -> Shape:
    pos, size, width, height, seen_data = len(PNG_SIGNATURE), len(data), 0, 0, False
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > size:
            raise BadImage(f"PNG cut short in its {kind.decode('latin-1')} chunk")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise BadImage(f"PNG {kind.decode('latin-1')} chunk fails its CRC")
        if pos == len(PNG_SIGNATURE):
            if kind != b"IHDR" or length < 8:
                raise BadImage("PNG does not start with IHDR")
            width, height = struct.unpack_from(">II", data, pos + 8)
        seen_data = seen_data or kind == b"IDAT"
        if kind == b"IEND":
            if end != size:
                raise BadImage("PNG has bytes after IEND")
            if not seen_data or not width or not height:
                raise BadImage("PNG has no image data")
            return Shape("png", width, height)
        pos = end
    raise BadImage("PNG is cut short (no IEND)")


def _jpeg(data: bytes) -> Shape:
    pos, size, width, height = 2, len(data), 0, 0
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            raise BadImage("JPEG segment does not start with a marker")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > size:
            raise BadImage("JPEG cut short in a header segment")
        if marker in SOF_MARKERS:
            height, width = struct.unpack_from(">HH", data, pos + 5)
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the EOI marker
            if not width or not height:
                raise BadImage("JPEG has no frame header before its scan")
            if not data.endswith(b"\xff\xd9"):
                raise BadImage("JPEG is cut short (no end marker)")
            return Shape("jpeg", width, height)
        pos += 2 + length
    raise BadImage("JPEG is cut short before its scan")


def _webp(data: bytes) -> Shape:
    (declared,) = struct.unpack_from("<I", data, 4)
    if declared + 8 != len(data) and declared + 8 != len(data.rstrip(b"\x00")):
        raise BadImage(f"WebP says {declared + 8} bytes but {len(data)} arrived")
    kind = data[12:16]
    chunk = data[20:]
    if kind == b"VP8 " and len(chunk) >= 10 and chunk[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", chunk, 6)
        return Shape("webp", width & 0x3FFF, height & 0x3FFF)
    if kind == b"VP8L" and len(chunk) >= 5 and chunk[0] == 0x2F:
        (bits,) = struct.unpack_from("<I", chunk, 1)
        return Shape("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X" and len(chunk) >= 10:
        width = int.from_bytes(chunk[4:7], "little") + 1
        height = int.from_bytes(chunk[7:10], "little") + 1
        return Shape("webp", width, height)
    raise BadImage("WebP has no VP8, VP8L or VP8X header")
