"""Stream a JSONL manifest into validated requests and rejections, one line at a time.

Memory stays bounded whatever the manifest's size: lines are read in chunks, a line longer
than ``MAX_LINE_BYTES`` is rejected without being held whole, and only the ids seen so far
are kept (to refuse duplicates).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from jobs.errors import ManifestError
from jobs.request import ImageRequest

MAX_LINE_BYTES = 1024 * 1024
BOM = b"\xef\xbb\xbf"
FIELDS = tuple(ImageRequest.model_fields)

ProviderCheck = Callable[[ImageRequest], list[tuple[str, str]]]
"""Returns the (field, reason) problems the line's provider has with it."""


@dataclass(frozen=True)
class Line:
    """One counted manifest line: a request, or the reason it was rejected."""

    number: int
    request: ImageRequest | None
    rejection: ManifestError | None = None
    raw: dict[str, Any] | None = None

    @property
    def id(self) -> str | None:
        if self.request is not None:
            return self.request.line_id
        raw_id = (self.raw or {}).get("id")
        return raw_id if isinstance(raw_id, str) else None


def split_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, bytes) per physical line; ``None`` for a line over the size cap."""
    number = 0
    pending = bytearray()
    overlong = False
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not overlong:
                    pending += chunk[start:]
                    if len(pending) > MAX_LINE_BYTES:
                        overlong, pending = True, bytearray()
                break
            number += 1
            if overlong or len(pending) + end - start > MAX_LINE_BYTES:
                yield number, None
            else:
                yield number, bytes(pending + chunk[start:end])
            pending, overlong = bytearray(), False
            start = end + 1
    if pending or overlong:
        yield number + 1, None if overlong else bytes(pending)


def read_manifest(
    chunks: Iterable[bytes], check_provider: ProviderCheck | None = None
) -> Iterator[Line]:
    """Yield every counted line in order; blank and ``#`` lines are skipped and get no row."""
    seen: set[str] = set()
    for number, data in split_lines(chunks):
        if data is None:
            yield Line(number, None, ManifestError(number, f"line is over {MAX_LINE_BYTES} bytes"))
            continue
        if number == 1 and data.startswith(BOM):
            data = data[len(BOM) :]
        data = data.rstrip(b"\r")
        if not data.strip() or data.lstrip().startswith(b"#"):
            continue
        line = parse_line(number, data, check_provider)
        if line.request is not None:
            line_id = line.request.line_id
            if line_id in seen:
                reason = f"id {line_id!r} repeats an earlier line's id"
                line = Line(number, None, ManifestError(number, reason, "id"), line.raw)
            else:
                seen.add(line_id)
        yield line


def parse_line(number: int, data: bytes, check_provider: ProviderCheck | None) -> Line:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Line(number, None, ManifestError(number, f"not valid UTF-8 (byte {exc.start})"))
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return Line(number, None, ManifestError(number, f"not valid JSON: {exc.msg}"))
    if not isinstance(raw, dict):
        return Line(number, None, ManifestError(number, "not a JSON object"))
    for key, value in raw.items():
        # Valid JSON may still escape a lone surrogate (\ud800), which no UTF-8 output holds.
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode("ascii")
            name = key if key.isprintable() else ascii(key)[1:-1]
            reason = f"{name}: not valid Unicode text (lone surrogate {bad})"
            return Line(number, None, ManifestError(number, reason, name))
    try:
        request = ImageRequest.model_validate(raw)
    except ValidationError as exc:
        field, reason = describe(exc, raw)
        return Line(number, None, ManifestError(number, reason, field), raw)
    problems = check_provider(request) if check_provider is not None else []
    if problems:
        field, reason = problems[0]
        return Line(number, None, ManifestError(number, reason, field), raw)
    return Line(number, request, None, raw)


def describe(exc: ValidationError, raw: dict[str, Any]) -> tuple[str | None, str]:
    """The first validation error as (field, readable reason), in the manifest's own terms."""
    error = exc.errors()[0]
    loc = error["loc"]
    field = str(loc[0]) if loc else None
    where = ".".join(str(part) for part in loc)
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        guess = difflib.get_close_matches(str(field), FIELDS, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        shown = str(field) if str(field).isprintable() else ascii(field)[1:-1]
        return field, f"unknown field '{shown}'{hint}"
    if kind == "missing":
        return field, f"{where} is required"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        allowed = expected.replace("'", "").replace(" or ", ", ")
        return field, f"{where} {value!r} is not one of {allowed}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "value_error":
        return field, message
    shown = repr(value) if not isinstance(value, dict | list) or len(repr(value)) < 60 else "..."
    return field, f"{where} {shown}: {message[0].lower()}{message[1:]}"


def rejected_row_fields(line: Line) -> dict[str, Any]:
    """What a rejected line's result row can still say about it."""
    raw = line.raw or {}

    def usable(value: Any) -> bool:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, TypeError, ValueError):
            return False
        return True

    def text(name: str) -> Any:
        value = raw.get(name)
        return value if isinstance(value, str) and usable(value) else None

    metadata = raw.get("metadata")
    return {
        "prompt": text("prompt"),
        "model": text("model"),
        "provider": text("provider"),
        "metadata": metadata if isinstance(metadata, dict) and usable(metadata) else None,
    }
