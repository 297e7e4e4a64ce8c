"""Stream a JSONL manifest into validated requests and rejections, one line at a time.

Memory stays bounded whatever the manifest's size: lines are read in chunks, a line longer
than ``MAX_LINE_BYTES`` is rejected without being held whole, and only the ids seen so far
are kept (to refuse duplicates). A line is rejected alone, whatever it holds: a repeated key
(ambiguous), nesting deeper than ``MAX_DEPTH`` (which would exhaust the recursion of json,
pydantic or the results writer), or any value that fails validation. Values quoted in a
reason go through ``jobs.text.shown``: escaped and cut short.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from jobs.errors import ManifestError
from jobs.manifest.lines import MAX_LINE_BYTES, content, physical_lines
from jobs.manifest.request import ImageRequest
from jobs.text import shown

MAX_DEPTH = 32
"""Deepest nesting of objects and arrays a field may hold: far beyond any real metadata, far
below the depth at which json, pydantic or the results writer give up."""
MAX_DIGITS = 4300
"""Python's own limit on converting digits to int (``sys.get_int_max_str_digits``)."""
MAX_REASON = 400
"""Longest reason a provider check may give; its text may quote the line's values."""
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


def read_manifest(
    chunks: Iterable[bytes], check_provider: ProviderCheck | None = None
) -> Iterator[Line]:
    """Yield every counted line in order; blank and ``#`` lines are skipped and get no row."""
    seen: set[str] = set()
    for number, raw, _ in physical_lines(chunks):
        if raw is None:
            yield Line(number, None, ManifestError(number, f"line is over {MAX_LINE_BYTES} bytes"))
            continue
        data = content(number, raw)
        if data is None:
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
        raw = json.loads(
            text,
            object_pairs_hook=_object,
            parse_constant=_constant,
            parse_float=_finite,
            parse_int=_integer,
        )
    except RecursionError:
        # json.loads recurses once per level: a deep enough line fails before we can look.
        reason = f"the line is nested deeper than {MAX_DEPTH} levels"
        return Line(number, None, ManifestError(number, reason))
    except json.JSONDecodeError as exc:
        return Line(number, None, ManifestError(number, f"not valid JSON: {exc.msg}"))
    except _NotJSON as exc:
        return Line(number, None, ManifestError(number, f"not valid JSON: {exc}"))
    if not isinstance(raw, dict):
        return Line(number, None, ManifestError(number, "not a JSON object"))
    shape = shape_problem(raw)
    if shape is not None:
        # The field's value is ambiguous or too deep to copy into the row: leave it out.
        where, reason = shape
        kept = {key: value for key, value in raw.items() if key != where}
        return Line(number, None, ManifestError(number, reason, shown(where)), kept)
    for key, value in raw.items():
        # Valid JSON may still escape a lone surrogate (\ud800), which no UTF-8 output holds.
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode("ascii")
            name = shown(key)
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
        return Line(number, None, ManifestError(number, shown(reason, MAX_REASON), field), raw)
    return Line(number, request, None, raw)


class _Ambiguous(dict[str, Any]):
    """A JSON object that named a key more than once; ``repeated`` is the first such key."""

    repeated: str = ""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: build the object, marking it when a key repeats (json keeps the
    last value silently, so the line would mean whichever copy came last)."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _Ambiguous(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.repeated = key
            break
        seen.add(key)
    return marked


class _NotJSON(ValueError):
    """A number Python's json would read as something no JSON writer can write back."""


def _constant(name: str) -> float:
    raise _NotJSON(f"{name} is not a JSON number")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _NotJSON(f"number {shown(literal, 40)} is out of range")
    return value


def _integer(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_DIGITS:
        raise _NotJSON(f"a number has more than {MAX_DIGITS} digits")
    return int(literal)


def shape_problem(raw: dict[str, Any]) -> tuple[str, str] | None:
    """The first repeated key or over-deep field of a parsed line, as (field, reason).

    Walks with an explicit stack, never by recursion, so whatever depth parsed is safe here.
    """
    if isinstance(raw, _Ambiguous):
        return raw.repeated, f"duplicate field '{shown(raw.repeated)}' (the line is ambiguous)"
    for field, value in raw.items():
        stack: list[tuple[Any, tuple[str | int, ...]]] = []
        if isinstance(value, dict | list):
            stack.append((value, ()))
        while stack:
            node, path = stack.pop()
            if len(path) >= MAX_DEPTH:
                return field, f"{shown(field)} is nested deeper than {MAX_DEPTH} levels"
            if isinstance(node, _Ambiguous):
                where = _path(field, (*path, node.repeated))
                return field, f"duplicate field '{where}' (the line is ambiguous)"
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend(
                reversed(
                    [
                        (child, (*path, key))
                        for key, child in items
                        if isinstance(child, dict | list)
                    ]
                )
            )
    return None


def _path(field: str, path: tuple[str | int, ...]) -> str:
    """``metadata.tags[1].t``: where in a field a value sits."""
    parts = (f"[{part}]" if isinstance(part, int) else f".{shown(part)}" for part in path)
    return shown(field) + "".join(parts)


def describe(exc: ValidationError, raw: dict[str, Any]) -> tuple[str | None, str]:
    """The first validation error as (field, readable reason), in the manifest's own terms."""
    error = exc.errors()[0]
    loc = error["loc"]
    field = shown(str(loc[0])) if loc else None
    where = shown(".".join(str(part) for part in loc))
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        name = str(loc[0])
        guess = difflib.get_close_matches(name, FIELDS, n=1) if len(name) <= 100 else []
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        return field, f"unknown field '{field}'{hint}"
    if kind == "missing":
        return field, f"{where} is required"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        allowed = expected.replace("'", "").replace(" or ", ", ")
        return field, f"{where} {quoted(value)} is not one of {allowed}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "value_error":
        return field, message
    return field, f"{where} {quoted(value)}: {message[0].lower()}{message[1:]}"


def quoted(value: object) -> str:
    """A value as a reason quotes it: text in quotes, anything else as a short repr."""
    return f"'{shown(value)}'" if isinstance(value, str) else shown(value)


def rejected_row_fields(line: Line) -> dict[str, Any]:
    """What a rejected line's result row can still say about it."""
    raw = line.raw or {}

    def usable(value: Any) -> bool:
        if isinstance(value, dict) and shape_problem({"value": value}) is not None:
            return False
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, TypeError, ValueError, RecursionError):
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
