"""How fast to send each kind of request to a provider, and how many jobs to keep in flight.

Pure functions over frozen states: the dispatcher passes the clock (``now``) and the counts of
the last interval (about a second), stores ``to_dict()`` in Redis and paces a token bucket at
``state.rate``. Each request kind (submits, polls) has its own :class:`RateState`, so a poll
429 never slows submits; the in-flight cap has a :class:`CapState`.

The controllers, a module each: ``rate`` (one per request kind: AIMD that tells our own 429s
from the provider's noise, by the measurements of ``verdict``), ``cap`` (the in-flight cap:
set by a concurrency 429, regrown a step at a time), over the frozen states of ``states``.
``Limits`` here is one provider's three together, as ``worker.dispatch.limits`` keeps them
(``docs/architecture.md``, "Limits").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import get_args

from jobs.settings import Limit
from worker.dispatch.adaptive.cap import (
    CAP_REGROW_S,
    CAP_SLOW_START_S,
    on_concurrency_429,
    start_cap,
    update_cap,
)
from worker.dispatch.adaptive.rate import start_rate, update_rate
from worker.dispatch.adaptive.states import (
    POLL_START_FRACTION,
    CapState,
    Interval,
    Kind,
    Phase,
    RateState,
)

__all__ = [
    "CAP_REGROW_S",
    "CAP_SLOW_START_S",
    "EVERY_LIMIT",
    "POLL_START_FRACTION",
    "CapState",
    "Interval",
    "Kind",
    "Limits",
    "Phase",
    "RateState",
    "on_concurrency_429",
    "start_cap",
    "start_limits",
    "start_rate",
    "update_cap",
    "update_limits",
    "update_rate",
]


@dataclass(frozen=True)
class Limits:
    """One provider's controllers: a rate per request kind, and the in-flight cap. A kind's
    state changes only through its own intervals."""

    submits: RateState
    polls: RateState
    cap: CapState

    def rate(self, kind: Kind) -> RateState:
        return self.submits if kind is Kind.SUBMIT else self.polls

    def to_dict(self) -> dict[str, dict[str, float | str | None]]:
        return {
            str(Kind.SUBMIT): self.submits.to_dict(),
            str(Kind.POLL): self.polls.to_dict(),
            "cap": self.cap.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, object]]) -> Limits:
        return cls(
            submits=RateState.from_dict(data[Kind.SUBMIT]),
            polls=RateState.from_dict(data[Kind.POLL]),
            cap=CapState.from_dict(data["cap"]),
        )


def start_limits(
    *,
    submits_per_second: float,
    polls_per_second: float,
    max_in_flight: int,
    configured: Collection[Limit],
    now: float,
) -> Limits:
    """A provider's first limits: the ``configured`` ones are the account's (start at them, no
    429 provoked); the others are defaults, guesses approached by slow start (polls from
    higher up, ``POLL_START_FRACTION``)."""
    return Limits(
        submits=start_rate(submits_per_second, configured="submits" in configured, now=now),
        polls=start_rate(
            polls_per_second,
            configured="polls" in configured,
            now=now,
            fraction=POLL_START_FRACTION,
        ),
        cap=start_cap(max_in_flight, configured="cap" in configured, now=now),
    )


EVERY_LIMIT: frozenset[Limit] = frozenset(get_args(Limit))
"""All three told: the account's own limits."""


MEASURING = frozenset({Phase.VERIFY, Phase.CONFIRM})


def update_limits(limits: Limits, kind: Kind, interval: Interval) -> Limits:
    """``update_rate`` on the one kind the interval counted, so that one kind's cut is never
    judged against the other's rise: while the other measures, it does not grow, and its own
    measurement does not go back up (unless it began first and has waited long enough)."""
    state = limits.rate(kind)
    other = limits.polls if kind is Kind.SUBMIT else limits.submits
    hold = other.phase in MEASURING
    updated = update_rate(state, interval, hold=hold, first=_began_first(kind, state, other))
    if kind is Kind.SUBMIT:
        return replace(limits, submits=updated)
    return replace(limits, polls=updated)


def _began_first(kind: Kind, state: RateState, other: RateState) -> bool:
    """Whether ``kind``'s measurement began before ``other``'s (submits first on a tie): of
    two measurements waiting for each other, that one goes on, so neither waits for ever."""
    if other.phase is Phase.CONFIRM:
        return False
    submits = kind is Kind.SUBMIT
    return (state.since, not submits) < (other.since, submits)
