"""After a cut: whose were the 429s? ``significant`` says when 429s call for a cut, ``cut``
makes it, and ``measure`` runs the measurements that follow (VERIFY at the lower rate, CONFIRM
back at the old one) to their verdict. The design is ``worker.dispatch.adaptive.rate``'s.

* **Evidence, not single 429s.** The share of 429s among recent requests must exceed the noise
  floor ``q`` by ``MIN_EXCESS`` and by ``Z_TRIGGER`` binomial standard deviations, with at
  least ``MIN_THROTTLED`` 429s, before the rate is cut.
* **Cut to what got through, then find out.** The cut goes to the rate the provider accepted
  (BBR's delivery rate: with a real limit L, that is L), times ``CUT_MARGIN``. VERIFY measures
  the share at the lower rate: significantly lower (``Z_FELL``; near a limit met before,
  halfway back to ``q`` is enough) means ours, and what got through becomes the limit
  estimate. Higher (``Z_WORSE``), or above what noise ever is (``NOISE_MAX``), means the
  provider's burst hid part of our overshoot: cut again. Neither: CONFIRM goes back to the old
  rate and measures again; the same share there, with our load risen between the two
  (``_load_changed``), means noise; a higher one means ours.
"""

from __future__ import annotations

import math
from dataclasses import replace

from worker.dispatch.adaptive.states import NOISE_MAX, Z_NOISE_MAX, Phase, RateState

MIN_SAMPLES = 10.0
MIN_THROTTLED = 2.0
"""No cut on fewer 429s in the window, nor on fewer requests unless most were refused."""
MIN_EXCESS = 0.015
Z_TRIGGER = 2.5
"""A cut needs the share above ``q + MIN_EXCESS`` by ``Z_TRIGGER`` standard deviations of a
binomial at ``q``. With ``q`` learnt, noise alone still triggers one every 7 minutes or so at
10 % (measured), each costing a few seconds at 90 % of the rate."""
CUT_MARGIN = 0.9
"""The cut goes this far below what got through, so the provider's bucket refills."""
VERIFY_SETTLE_S = 2.5
"""Intervals ending this soon after a change are not measured: their requests left before it,
and the provider's bucket is still empty."""
VERIFY_SAMPLES = 60.0
VERIFY_MIN_S = 2.0
VERIFY_MAX_S = 30.0
VERIFY_MIN_SENT = 3.0
"""A measurement ends after ``VERIFY_SAMPLES`` requests and ``VERIFY_MIN_S``, or after
``VERIFY_MAX_S`` on what there is (with fewer than ``VERIFY_MIN_SENT``, no verdict)."""
Z_FELL = 1.5
FELL_FRACTION = 0.5
"""Ours when the share fell by ``Z_FELL`` standard errors; near a limit met before, when its
excess over ``q`` fell by ``FELL_FRACTION``."""
KNOWN_BELOW = 0.05
"""A cut from within ``KNOWN_BELOW`` under the limit estimate (or above it) is near a limit met
before, where the halfway fall suffices; further below, 429s are more likely noise."""
LOAD_CHANGE = 0.05
LOAD_KEPT = 0.5
"""A noise verdict needs our load to have risen between VERIFY and CONFIRM: this kind's
requests a second by ``LOAD_CHANGE`` (a cut goes at least a tenth below), and all kinds'
together by ``LOAD_KEPT`` of that (under one limit for every kind, a rise offset by another
kind's fall changes nothing)."""
Z_WORSE = 2.0
"""A share this many standard errors above the one compared with: ours, cut again."""
NEAR = 0.1
"""The band around the limit estimate: growth slows within it, and a noise verdict at a rate
within it drops the estimate."""


def significant(n: float, k: float, q: float) -> bool:
    """``k`` 429s among ``n`` requests are more than a noise floor ``q`` explains."""
    if k < MIN_THROTTLED or (n < MIN_SAMPLES and k < n / 2):
        return False
    return k > n * (q + MIN_EXCESS) + Z_TRIGGER * math.sqrt(n * q * (1 - q))


def cut(
    state: RateState, now: float, share: float, *, restore: float, accepted: float | None = None
) -> RateState:
    """Down to a little below what got through; then find out whose the 429s were."""
    q = state.noise
    got = min(state.rate, state.rate * (1 - share) / (1 - q))
    if accepted is not None:
        # The interval's accepted requests are sharper than a diluted share, but inflated
        # while the provider's burst lasts: the lower of the two.
        got = min(got, accepted / (1 - q))
    return replace(
        _measuring(state, Phase.VERIFY, now, (state.window_sent, state.window_throttled, 0, 0)),
        rate=max(state.floor, got * CUT_MARGIN),
        before_rate=restore,
        candidate=max(state.floor, got),
        raises=0,
    )


def _measuring(
    state: RateState, phase: Phase, now: float, base: tuple[float, float, float, float]
) -> RateState:
    """A new measurement in ``phase``, to be compared with ``base``: requests, 429s, the other
    kinds' requests and the seconds they were counted over."""
    sent, throttled, others, seconds = base
    return replace(
        state,
        phase=phase,
        since=now,
        base_sent=sent,
        base_throttled=throttled,
        base_others=others,
        base_seconds=seconds,
        verify_sent=0.0,
        verify_throttled=0.0,
        verify_others=0.0,
        verify_seconds=0.0,
    )


def measure(
    state: RateState, now: float, counts: tuple[int, int, int], elapsed: float, held: bool
) -> RateState:
    """VERIFY measures the share at the lower rate, CONFIRM at the old one again; each compares
    with the measurement before it (``base_*``). ``counts``: the interval's requests of this
    kind, its 429s, and the other kinds' requests; ``held``: no CONFIRM yet (``update_rate``)."""
    if now - state.since < VERIFY_SETTLE_S:
        return state
    sent, throttled, others = counts
    n, k = state.verify_sent + sent, state.verify_throttled + throttled
    state = replace(
        state,
        verify_sent=n,
        verify_throttled=k,
        verify_others=state.verify_others + others,
        verify_seconds=state.verify_seconds + elapsed,
    )
    waited = now - state.since
    done = (n >= VERIFY_SAMPLES and waited >= VERIFY_MIN_S) or waited >= VERIFY_MAX_S
    beyond_noise = n >= VERIFY_MIN_SENT and k > n * NOISE_MAX + Z_NOISE_MAX * math.sqrt(
        n * NOISE_MAX * (1 - NOISE_MAX)
    )
    if not done and not (beyond_noise and state.phase is Phase.CONFIRM):
        return state
    if n < VERIFY_MIN_SENT:  # too little demand to tell: keep this rate, the safer side
        return replace(state, phase=Phase.STEADY, since=now, window_sent=n, window_throttled=k)
    return _verdict(state, now, beyond_noise, held)


def _verdict(state: RateState, now: float, beyond_noise: bool, held: bool) -> RateState:
    """The measurement's end: ours (a limit estimate, or cut again), noise (the old rate
    stays, ``q`` learns), or not clear yet (CONFIRM, or measure on while ``held``)."""
    n, k = state.verify_sent, state.verify_throttled
    steady = replace(state, phase=Phase.STEADY, since=now, window_sent=n, window_throttled=k)
    q = state.noise
    share, base = k / n, state.base_throttled / max(state.base_sent, 1.0)
    z = _z(base, state.base_sent, share, n)
    if beyond_noise or (z >= Z_WORSE and share > q + MIN_EXCESS):
        # More 429s than the measurement before, or than noise ever is. In VERIFY the
        # provider's burst had hidden part of our overshoot; in CONFIRM they came back with
        # the old rate. Ours: cut to what gets through now.
        return cut(steady, now, share, restore=state.before_rate)
    if state.phase is Phase.CONFIRM and not _load_changed(state):
        # The same share, but our load hardly changed between the measurements (this kind's
        # demand, not its rate, set what it sent; or the other kinds sent less as this one
        # sent more, under a limit that covers them all): no evidence of noise. The safer
        # side: ours, at the lower rate.
        return replace(
            steady, rate=max(state.floor, state.candidate * CUT_MARGIN), limit=state.candidate
        )
    if state.phase is Phase.CONFIRM:
        # The same share at both rates: noise, whatever our rate. Both measurements tell q,
        # and a limit estimate about this rate (from a cut taken for ours) was noise too.
        limit = state.limit
        if limit is not None and limit <= state.rate / CUT_MARGIN * (1 + NEAR):
            limit = None
        return replace(
            steady,
            limit=limit,
            noise_sent=state.noise_sent + state.base_sent + n,
            noise_throttled=state.noise_throttled + state.base_throttled + k,
        )
    limit = state.limit
    known = limit is not None and state.before_rate >= limit * (1 - KNOWN_BELOW)
    if z <= -Z_FELL or (known and share - q <= FELL_FRACTION * (base - q)):
        ours = replace(steady, limit=state.candidate)
        if significant(n, k, q):
            # Still more than q explains: noise not known yet, or a cut too shallow. Learn
            # nothing; the window (this measurement) triggers the next cut, which tells.
            return ours
        return replace(
            ours, noise_sent=state.noise_sent + n, noise_throttled=state.noise_throttled + k
        )
    if held and share < base:
        # Some fall, not a clear one, and going back up would spoil another kind's
        # measurement (which may be what kept the share up): the safer side, ours.
        return replace(steady, limit=state.candidate)
    if held:
        # No fall at all: noise, perhaps. Measure on at this rate until the other kind's
        # measurement has ended (or, begun first, until VERIFY_MAX_S); CONFIRM then tells.
        return state
    # No clear fall: back to the old rate, and measure the share there, steadily this time.
    measured = (n, k, state.verify_others, state.verify_seconds)
    return replace(
        _measuring(state, Phase.CONFIRM, now, measured), rate=min(state.top, state.before_rate)
    )


def _load_changed(state: RateState) -> bool:
    """CONFIRM: did our load rise from the measurement at the lower rate (``base_*``) to this
    one? This kind's requests a second by ``LOAD_CHANGE`` at least, and every kind's together
    by ``LOAD_KEPT`` of that rise (only then does an unchanged share mean noise)."""
    if state.base_seconds <= 0 or state.verify_seconds <= 0:
        return True  # a state stored before the load was measured: judge as before
    lower = state.base_sent / state.base_seconds
    lower_all = lower + state.base_others / state.base_seconds
    higher = state.verify_sent / state.verify_seconds
    higher_all = higher + state.verify_others / state.verify_seconds
    rise = higher - lower
    return rise >= LOAD_CHANGE * lower and higher_all - lower_all >= LOAD_KEPT * rise


def _z(base: float, base_n: float, share: float, n: float) -> float:
    """How many standard errors ``share`` (of ``n``) lies above ``base`` (of ``base_n``)."""
    pooled = (base * base_n + share * n) / (base_n + n)
    spread = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / max(base_n, 1.0) + 1 / n))
    return (share - base) / spread
