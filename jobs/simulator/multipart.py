"""Reading a ``multipart/form-data`` body, as ``POST /v1/files`` receives one.

The stdlib's ``email`` parser copies a 200 MB upload several times over; this slices it once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r'(?:^|;)\s*name="([^"]*)"')
_FILENAME = re.compile(r'(?:^|;)\s*filename="([^"]*)"')


@dataclass(frozen=True)
class Part:
    """One form field: a file when ``filename`` is set."""

    data: bytes
    filename: str | None = None


def boundary(content_type: str) -> str | None:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value.strip('"'):
            return value.strip('"')
    return None


def parse_form(content_type: str, body: bytes) -> dict[str, Part] | None:
    """The fields by name, or None when the body is not well-formed multipart."""
    marker = boundary(content_type)
    if marker is None:
        return None
    delimiter = b"--" + marker.encode()
    pos = body.find(delimiter)
    if pos < 0:
        return None
    fields: dict[str, Part] = {}
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return fields
        if not body.startswith(b"\r\n", pos):
            return None
        head_end = body.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            return None
        disposition = _disposition(body[pos + 2 : head_end].decode("utf-8", "replace"))
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        if disposition is None or end < 0:
            return None
        name, filename = disposition
        fields[name] = Part(body[head_end + 4 : end], filename)
        pos = end + 2


def _disposition(headers: str) -> tuple[str, str | None] | None:
    for header in headers.split("\r\n"):
        key, _, value = header.partition(":")
        if key.strip().lower() == "content-disposition":
            name, filename = _NAME.search(value), _FILENAME.search(value)
            if name is None:
                return None
            return name[1], filename[1] if filename else None
    return None
