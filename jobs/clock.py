"""Time as imagebatch writes it for people and records: ISO timestamps in UTC, durations."""

from __future__ import annotations

from datetime import UTC, datetime


def now_iso() -> str:
    """``2026-12-07T03:37:53Z``: second precision, UTC, as every row and record carries it."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def duration(seconds: float) -> str:
    """How long, for people: ``41s``, ``6m05s``, ``2h04m``."""
    whole = max(0, round(seconds))
    if whole < 90:
        return f"{whole}s"
    if whole < 5400:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
