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


FIRST_LOOK = 0.6
"""With a learned latency, the first poll comes at this share of it: most jobs still run, so
the poll sees their progress, and two such looks tell when the job will end."""
END_MARGIN_S = 0.03
"""A poll planned for a job's predicted end comes this much after it."""
SOON_S = 0.1
"""The shortest wait between two polls of a job."""
POLL_LEAD_S = 0.1
"""A poll due this soon is handed out now (with the others of the dispatcher's pass, which
sees a burst of events at most every ``MIN_TICK_S``); its task waits for the moment it is due
(the line's ``poll_at``). Sent early, it finds the job a moment before its end and costs a
second poll and a slot idle for ``SOON_S``; sent late, the slot idles until it arrives."""


def first_poll(expected_s: float | None, initial_s: float, webhook_s: float | None) -> float:
    """Seconds from a job's acceptance to its first poll.

    With a learned latency the first look comes well before the job is expected to be done
    (``FIRST_LOOK``): a provider that reports progress then tells when it will end, and the slot
    is free within a few hundred ms of it. Without one, after ``initial_s``. With webhooks on,
    polling is only the fallback for a webhook that never came.
    """
    if _testing:
        return 0.0
    if webhook_s is not None:
        return max(webhook_s, 3 * (expected_s or initial_s))
    if expected_s is None:
        return initial_s
    return FIRST_LOOK * expected_s


def after_progress(
    t: float,
    progress: int,
    before: tuple[float, int] | None,
    max_s: float,
    queue: float | None = None,
) -> float | None:
    """Seconds until the next poll of a job that reported ``progress`` (0-100) ``t`` seconds
    after it was accepted, with ``before`` the (t, progress) of the previous look, if any, and
    ``queue`` the learned share of a job's time before its progress starts (``queue_share``);
    None when progress says nothing (0, or no change since the last look).

    Two looks extrapolate the end (progress rising at its recent pace). One look and the
    learned queue share place it too: progress runs evenly over the rest of the job, so
    ``t = D·(q + (1 - q)·p/100)``, ``p`` read as the middle of its whole percent. Either way
    the next poll goes just after the end. One look and nothing learned only bound it
    (``t·100/p`` if progress rose from the start), so the next look comes a quarter of the way
    there, close enough to measure the pace.
    """
    if _testing:
        return 0.0
    if progress <= 0:
        return None
    if progress >= 100:
        return SOON_S
    if before is not None:
        then, earlier = before
        if progress <= earlier or t <= then:
            return None
        pace = (progress - earlier) / (t - then)
        return min(max_s, max(SOON_S, (100 - progress) / pace + END_MARGIN_S))
    if queue is not None:
        whole = t / (queue + (1 - queue) * _share(progress))
        return min(max_s, max(SOON_S, whole - t + END_MARGIN_S))
    remaining = t * (100 - progress) / progress
    return min(max_s, max(SOON_S, 0.25 * remaining))


def _share(progress: int) -> float:
    """The share of the job a whole-number ``progress`` stands for: its middle, since providers
    report a percentage cut down (so the learned queue share and the ends placed from it are
    not biased by half a point, tens of ms on a job of seconds)."""
    return (progress + 0.5) / 100


def queue_share(t: float, progress: int, latency: float) -> float | None:
    """What a finished job says of its provider's progress: the share of its time before the
    progress began, from one look (``progress`` at ``t``) and its whole ``latency``."""
    if not 0 < progress < 100 or latency <= 0 or t <= 0:
        return None
    done = _share(progress)
    share = (t / latency - done) / (1 - done)
    return min(0.9, max(0.0, share))


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
