"""What the controllers hold: frozen states, each stored in Redis as ``to_dict()`` and read back
with ``from_dict`` (new settings applied), and what one interval of requests showed
(``Interval``). The knobs the states themselves use are here: where a start begins
(``START_FRACTION``), the rate's floor and how noise is counted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace
from enum import StrEnum
from typing import Any, Self, cast

START_FRACTION = 0.25
"""Not configured: the first rate (and cap) as a share of the default ceiling."""
POLL_START_FRACTION = 0.5
"""The polls' first rate, not configured: higher, since the first polls come a few seconds
after the first submits, all at once, and a poll held back holds a paid slot idle (a 429 on
a poll costs nothing but the retry)."""
FLOOR_FRACTION = 0.05
FLOOR_RATE = 0.1
"""The rate never goes below ``max(FLOOR_FRACTION·ceiling, FLOOR_RATE)`` (nor above the
ceiling): an account below that gets 429s, answered by pauses, but the rate is never zero."""
NOISE_MAX = 0.2
Z_NOISE_MAX = 2.0
"""A share of 429s above ``NOISE_MAX`` (by ``Z_NOISE_MAX`` standard deviations) is not noise
to ride out: it is taken for ours."""
NOISE_HALF_LIFE_S = 300.0
NOISE_PRIOR = 20.0
"""``q = noise_throttled / (noise_sent + NOISE_PRIOR)``; both counts halve every half-life."""


class Phase(StrEnum):
    """Where a controller is in its cycle."""

    SLOW_START = "slow_start"
    """The ceiling is only a guess: double until the first 429."""
    STEADY = "steady"
    """Additive increase while the rate binds; a cut on evidence of our own 429s."""
    VERIFY = "verify"
    """Just cut: do the 429s fall at the lower rate (ours) or not?"""
    CONFIRM = "confirm"
    """They did not fall: back at the old rate, are they the same (noise) or more (ours)?"""


class Kind(StrEnum):
    """The request kinds the dispatcher paces separately."""

    SUBMIT = "submit"
    POLL = "poll"


@dataclass(frozen=True)
class Interval:
    """What happened to one request kind since the last update."""

    now: float
    sent: int
    """Requests of this kind sent."""
    throttled: int
    """Of them, answered 429 (rate kind)."""
    binding: bool
    """This rate held work back (requests waited for tokens)."""
    retry_after: float | None = None
    """The largest Retry-After among the 429s, in seconds."""
    others: int = 0
    """Requests of the provider's other kinds sent in the same interval: where one limit
    covers every kind, they change this kind's share of 429s too."""
    hint: float | None = None
    """A rate (requests per second) the provider announced in its X-RateLimit headers."""


class Stored:
    """A controller's state as Redis keeps it: ``to_dict`` as JSON, ``from_dict`` back, with
    new settings (``ceiling``) applied through ``clamped``."""

    ceiling: float

    def to_dict(self) -> dict[str, float | str | None]:
        return {f.name: plain(getattr(self, f.name)) for f in fields(cast(Any, self))}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, ceiling: float | None = None) -> Self:
        state = cls(**stored(cls, data))
        return state if ceiling is None or ceiling == state.ceiling else state.clamped(ceiling)

    def clamped(self, ceiling: float) -> Self:
        """The state under a new ceiling (its rate or cap brought within it)."""
        raise NotImplementedError


@dataclass(frozen=True)
class RateState(Stored):
    """One request kind's controller; ``rate`` is what to pace at, ``pause_until`` when to
    resume after a block (0: no pause)."""

    ceiling: float
    rate: float
    phase: Phase
    updated_at: float
    pause_until: float = 0.0
    since: float = 0.0
    """When the current phase began (VERIFY, CONFIRM: the change of rate)."""
    target: float = 0.0
    """SLOW_START: where doubling stops (the ceiling, or the rate before a block)."""
    before_rate: float = 0.0
    """VERIFY, CONFIRM: the rate before the cut, kept if the 429s prove to be noise."""
    candidate: float = 0.0
    """VERIFY: what got through at the cut, the limit estimate if the 429s prove ours."""
    limit: float | None = None
    """The account's rate limit as our own 429s showed it (None: not met yet). A rate that
    passes it by ``NEAR`` without trouble moves it up."""
    raises: int = 0
    """How many times the rate passed ``limit`` since the last cut: the probe step doubles
    each time."""
    hint: float | None = None
    """The rate the provider announced: a second ceiling."""
    window_sent: float = 0.0
    window_throttled: float = 0.0
    """Recent requests and 429s (decayed counts)."""
    base_sent: float = 0.0
    base_throttled: float = 0.0
    """VERIFY: the window that triggered the cut; CONFIRM: the measurement at the lower rate."""
    base_others: float = 0.0
    base_seconds: float = 0.0
    """CONFIRM: the other kinds' requests during the measurement at the lower rate, and its
    length (what our load was there)."""
    verify_sent: float = 0.0
    verify_throttled: float = 0.0
    """VERIFY, CONFIRM: the measurement at the current rate."""
    verify_others: float = 0.0
    verify_seconds: float = 0.0
    """VERIFY, CONFIRM: the other kinds' requests during the measurement, and its length."""
    noise_sent: float = 0.0
    noise_throttled: float = 0.0
    """Requests and 429s measured where the 429s were shown not to be ours."""
    refused_run: int = 0
    """Requests refused in a row (an interval with any request accepted ends the run)."""

    @property
    def top(self) -> float:
        """The highest rate allowed: the ceiling, or the provider's hint if lower."""
        return self.ceiling if self.hint is None else max(self.floor, min(self.ceiling, self.hint))

    @property
    def floor(self) -> float:
        return min(self.ceiling, max(FLOOR_FRACTION * self.ceiling, FLOOR_RATE))

    @property
    def noise(self) -> float:
        """``q``: the share of 429s that are not ours (towards 0 on little evidence)."""
        return min(NOISE_MAX, self.noise_throttled / (self.noise_sent + NOISE_PRIOR))

    @property
    def share(self) -> float:
        """The share of 429s among recent requests."""
        return self.window_throttled / self.window_sent if self.window_sent > 0 else 0.0

    def clamped(self, ceiling: float) -> RateState:
        if ceiling <= 0:
            raise ValueError(f"ceiling must be positive, not {ceiling}")
        state = replace(self, ceiling=ceiling)
        return replace(state, rate=min(state.top, max(state.floor, state.rate)))


@dataclass(frozen=True)
class CapState(Stored):
    """How many jobs may be in flight at the provider at once (each submit takes a slot)."""

    ceiling: int
    cap: int
    phase: Phase
    """SLOW_START (doubling) or STEADY."""
    changed_at: float
    """The last concurrency 429 or raise."""
    bound_since: float | None = None
    """Since when the cap has held work back without a break (None: it does not now)."""

    def clamped(self, ceiling: float) -> CapState:
        if ceiling < 1:
            raise ValueError(f"ceiling must be at least 1, not {ceiling}")
        return replace(self, ceiling=int(ceiling), cap=max(1, min(int(ceiling), self.cap)))


# --- (de)serialisation -------------------------------------------------------------------------


def plain(value: object) -> float | str | None:
    """A field as JSON has it: numbers as floats, the phase as its value."""
    if value is None:
        return None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool | int | float):
        return float(value)
    raise TypeError(f"not a plain value: {value!r}")


def stored(cls: type, data: Mapping[str, object]) -> dict[str, Any]:
    """A state class's fields read back by their annotations; one the stored form lacks (a
    state saved by an older version) takes its default."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.type == "Phase":
            values[f.name] = Phase(text(data, f.name))
        elif f.type == "float | None":
            values[f.name] = optional(data, f.name)
        else:
            value = number(data, f.name, None if f.default is MISSING else float(f.default))
            values[f.name] = int(value) if f.type == "int" else value
    return values


def text(data: Mapping[str, object], key: str) -> str:
    value = data[key]
    return value.decode() if isinstance(value, bytes) else str(value)


def number(data: Mapping[str, object], key: str, default: float | None = None) -> float:
    """A number as JSON or a Redis hash stores it (float, int, str or bytes)."""
    value = data.get(key)
    if value is None or value in ("", b""):
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, int | float | str):
        return float(value)
    raise TypeError(f"{key}: not a number: {value!r}")


def optional(data: Mapping[str, object], key: str) -> float | None:
    value = data.get(key)
    if value is None or value in ("", b"", "None", b"None"):
        return None
    return number(data, key)
