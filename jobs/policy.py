"""When to try again and when to look again: pure functions, so they are tested without Redis.

``set_testing(True)`` removes every wait (as stamina's testing mode does), so retry paths run
instantly in unit tests; production code never calls it.
"""

from __future__ import annotations

import random

_testing = False
MAX_RETRY_AFTER_S = 900.0
"""A provider asking for longer than this is taken as asking for this (a ``Retry-After: 1e9``
must not pause a batch for decades)."""


def set_testing(on: bool) -> None:
    """Make ``backoff`` and the poll delays return 0 (tests only)."""
    global _testing
    _testing = on


def testing() -> bool:
    return _testing


def backoff(tries: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before try ``tries + 1``: uniform in
    ``[0, min(cap, base * 2 ** (tries - 1))]``."""
    if _testing or base <= 0 or cap <= 0:
        return 0.0
    ceiling = min(cap, base * 2 ** max(0, tries - 1))
    return (rng or random).uniform(0, ceiling)


def retry_wait(tries: int, base: float, cap: float, retry_after: float | None) -> float:
    """The provider's Retry-After when it gave one (never less), else backoff."""
    if retry_after is not None:
        return 0.0 if _testing else min(MAX_RETRY_AFTER_S, max(0.0, retry_after))
    return backoff(tries, base, cap)


def first_poll(expected_s: float | None, initial_s: float, webhook_s: float | None) -> float:
    """Seconds from a job's acceptance to its first poll.

    With a learned latency the first look comes just after the job is expected to be done, so
    most jobs take one poll; without one, after ``initial_s``. With webhooks on, polling is
    only the fallback for a webhook that never came.
    """
    if _testing:
        return 0.0
    if webhook_s is not None:
        return max(webhook_s, 3 * (expected_s or initial_s))
    if expected_s is None:
        return initial_s
    return expected_s * 1.005 + 0.02


def next_poll(
    polls: int,
    expected_s: float | None,
    initial_s: float,
    max_s: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the poll after ``polls`` pending answers: short steps that grow by half,
    with ±20 % jitter so jobs submitted together do not poll together."""
    if _testing:
        return 0.0
    step = 0.08 * expected_s if expected_s is not None else initial_s
    delay = max(0.2, step) * 1.5 ** max(0, polls - 1)
    return min(max_s, delay) * (rng or random).uniform(0.8, 1.2)
