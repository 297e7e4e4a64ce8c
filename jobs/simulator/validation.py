"""Tiny composable JSON-body checks, so each surface's schema reads like the provider's docs.

A check takes ``(path, value)`` and returns the problems found; ``obj`` rejects unknown keys,
because every simulated provider treats a field it does not know as an error.
"""

from __future__ import annotations

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


def obj(fields: Mapping[str, Check], required: tuple[str, ...] = ()) -> Check:
    """An object with exactly these optional ``fields``, of which ``required`` must be present."""

    def check(path: str, value: Any) -> list[Problem]:
        if not isinstance(value, dict):
            return [Problem(path or "body", "must be a JSON object")]
        problems = [Problem(_join(path, k), "", "missing") for k in required if k not in value]
        for key, item in value.items():
            if key not in fields:
                problems.append(Problem(_join(path, key), "", "unknown"))
            else:
                problems.extend(fields[key](_join(path, key), item))
        return problems

    return check


def validate(schema: Check, body: Any) -> list[Problem]:
    return schema("", body)
