"""Tiny composable JSON-body checks, so each surface's schema reads like the provider's docs.

A check takes ``(path, value)`` and returns the problems found; ``obj`` rejects unknown keys,
because every simulated provider treats a field it does not know as an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request body, at a dotted ``field`` path."""

    field: str
    reason: str
    kind: Literal["unknown", "missing", "invalid"] = "invalid"

    @property
    def code(self) -> str:
        return {"unknown": "unknown_parameter", "missing": "missing_required_parameter"}.get(
            self.kind, "invalid_value"
        )

    @property
    def message(self) -> str:
        if self.kind == "unknown":
            return f"Unknown parameter: '{self.field}'."
        if self.kind == "missing":
            return f"Missing required parameter: '{self.field}'."
        return f"Invalid value for '{self.field}': {self.reason}."


Check = Callable[[str, Any], list[Problem]]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def one_of(*allowed: object) -> Check:
    listed = ", ".join(map(str, allowed))

    def check(path: str, value: Any) -> list[Problem]:
        ok = isinstance(value, str) and value in allowed
        return [] if ok else [Problem(path, f"must be one of {listed}")]

    return check


def integer(lo: int, hi: int | None = None) -> Check:
    def check(path: str, value: Any) -> list[Problem]:
        if _is_int(value) and value >= lo and (hi is None or value <= hi):
            return []
        span = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        return [Problem(path, f"must be an integer {span}")]

    return check


def number_in(*allowed: float) -> Check:
    def check(path: str, value: Any) -> list[Problem]:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value in allowed
        return [] if ok else [Problem(path, f"must be one of {', '.join(map(str, allowed))}")]

    return check


def text(min_len: int = 0, max_len: int | None = None) -> Check:
    def check(path: str, value: Any) -> list[Problem]:
        if not isinstance(value, str):
            return [Problem(path, "must be a string")]
        if len(value) < min_len:
            return [Problem(path, "must not be empty" if min_len == 1 else f"min {min_len} chars")]
        if max_len is not None and len(value) > max_len:
            return [Problem(path, f"must be at most {max_len} characters")]
        return []

    return check


def url(path: str, value: Any) -> list[Problem]:
    ok = isinstance(value, str) and value.startswith(("http://", "https://", "data:"))
    return [] if ok else [Problem(path, "must be an http(s) or data URL")]


def http_url(path: str, value: Any) -> list[Problem]:
    """An absolute http(s) URL with a host: where the simulator itself may send requests."""
    ok = isinstance(value, str) and re.match(r"https?://[^/?#\s]+", value) is not None
    return [] if ok else [Problem(path, "must be an http(s) URL")]


def matches(pattern: str) -> Check:
    """A string in which ``pattern`` is found (JSON Schema ``pattern``: a search, not a match)."""
    compiled = re.compile(pattern)

    def check(path: str, value: Any) -> list[Problem]:
        if isinstance(value, str) and compiled.search(value):
            return []
        return [Problem(path, f"must match {pattern}")]

    return check


def all_of(*checks: Check) -> Check:
    """The problems of the first check that finds any, so one bad value gives one message."""

    def check(path: str, value: Any) -> list[Problem]:
        for inner in checks:
            problems = inner(path, value)
            if problems:
                return problems
        return []

    return check


def boolean(path: str, value: Any) -> list[Problem]:
    return [] if isinstance(value, bool) else [Problem(path, "must be a boolean")]


def rejected(reason: str) -> Check:
    """A field the provider knows but refuses (e.g. ``response_format`` for gpt-image)."""
    return lambda path, value: [Problem(path, reason)]


def nullable(inner: Check) -> Check:
    return lambda path, value: [] if value is None else inner(path, value)


def any_of(*checks: Check, reason: str) -> Check:
    def check(path: str, value: Any) -> list[Problem]:
        return [] if any(not c(path, value) for c in checks) else [Problem(path, reason)]

    return check


def list_of(item: Check, min_items: int = 0, max_items: int | None = None) -> Check:
    def check(path: str, value: Any) -> list[Problem]:
        if not isinstance(value, list):
            return [Problem(path, "must be an array")]
        if len(value) < min_items or (max_items is not None and len(value) > max_items):
            limit = f"{min_items}..{max_items}" if max_items is not None else f">= {min_items}"
            return [Problem(path, f"must have {limit} items")]
        return [p for i, v in enumerate(value) for p in item(f"{path}[{i}]", v)]

    return check


def obj(
    fields: Mapping[str, Check], required: tuple[str, ...] = (), *, closed: bool = True
) -> Check:
    """An object with these optional ``fields``, of which ``required`` must be present.

    ``closed`` (the default) makes any other key an error, as JSON Schema's
    ``additionalProperties: false``.
    """

    def check(path: str, value: Any) -> list[Problem]:
        if not isinstance(value, dict):
            return [Problem(path or "body", "must be a JSON object")]
        problems = [Problem(_join(path, k), "", "missing") for k in required if k not in value]
        for key, item in value.items():
            if key not in fields:
                if closed:
                    problems.append(Problem(_join(path, key), "", "unknown"))
            else:
                problems.extend(fields[key](_join(path, key), item))
        return problems

    return check


def validate(schema: Check, body: Any) -> list[Problem]:
    return schema("", body)


_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "default", "examples"}
)
_KEYWORDS = frozenset(
    {
        "type", "enum", "const", "properties", "required", "additionalProperties", "items",
        "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum", "pattern",
    }
)  # fmt: skip


def from_json_schema(schema: Mapping[str, Any]) -> Check:
    """Compile the subset of JSON Schema a request schema uses into a ``Check``.

    Used where the simulator serves a schema (Oxen's ``json_request_schema``) and must accept
    exactly what it says; a keyword outside the subset raises ``ValueError`` at compile time
    rather than being silently ignored.
    """
    unknown = set(schema) - _ANNOTATIONS - _KEYWORDS
    if unknown:
        raise ValueError(f"unsupported JSON Schema keywords: {', '.join(sorted(unknown))}")
    kind = schema.get("type")
    checks: list[Check] = []
    if "const" in schema or "enum" in schema:
        allowed = [schema["const"]] if "const" in schema else list(schema["enum"])
        if not all(isinstance(v, str) for v in allowed):
            raise ValueError("only string enums and consts are supported")
        checks.append(one_of(*allowed))
    if kind == "object":
        extra = schema.get("additionalProperties", True)
        if not isinstance(extra, bool):
            raise ValueError("additionalProperties must be a boolean")
        fields = {k: from_json_schema(v) for k, v in schema.get("properties", {}).items()}
        checks.append(obj(fields, tuple(schema.get("required", ())), closed=not extra))
    elif kind == "array":
        item = from_json_schema(schema.get("items", {}))
        checks.append(list_of(item, schema.get("minItems", 0), schema.get("maxItems")))
    elif kind == "string":
        checks.append(text(schema.get("minLength", 0), schema.get("maxLength")))
        if "pattern" in schema:
            checks.append(matches(schema["pattern"]))
    elif kind == "integer":
        checks.append(integer(schema.get("minimum", -(2**63)), schema.get("maximum")))
    elif kind == "boolean":
        checks.append(boolean)
    elif kind is not None:
        raise ValueError(f"unsupported JSON Schema type {kind!r}")
    return all_of(*checks)
