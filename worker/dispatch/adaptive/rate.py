"""How fast to send one kind of request (submits, polls) to a provider: ``update_rate``, once
per interval (about a second), on the kind's ``RateState``.

**The rate.** A 429 is either *ours* (we are above the account's real limit) or *noise* (the
provider refuses some requests whatever our rate: shared capacity short). TCP's AIMD takes
every loss for congestion, which is why the old limiter (x0.7 per 429) sat at its floor under
3 % random 429s: the known weakness of loss-based TCP on lossy links, which TCP Westwood and BBR
answer by looking at what gets through rather than at each loss. So this is AIMD with *loss
discrimination* and a BBR-like model of the limit:

* **Evidence, not single 429s.** The share of 429s among recent requests (counts decayed over
  about ``WINDOW_REQUESTS`` requests or ``WINDOW_S``, whichever is shorter) must exceed the
  noise floor ``q`` by ``MIN_EXCESS`` and by ``Z_TRIGGER`` binomial standard deviations, with at
  least ``MIN_THROTTLED`` 429s, before the rate is cut.
* **Cut to what got through, then find out whose the 429s were.** The cut goes to the rate the
  provider accepted (BBR's delivery rate: with a real limit L, that is L), the lower of
  ``rate·(1 - share)/(1 - q)`` and the last interval's accepted requests, times
  ``CUT_MARGIN``. VERIFY then measures the share at the lower rate (after ``VERIFY_SETTLE_S``,
  on ``VERIFY_SAMPLES``): significantly lower (``Z_FELL``; near a limit met before, halfway
  back to ``q`` is enough) means ours, and what got through becomes the limit estimate. Higher
  (``Z_WORSE``), or above what noise ever is (``NOISE_MAX``), means the provider's burst hid
  part of our overshoot: cut again. Neither: CONFIRM goes back to the old rate and measures
  again; the same share there means noise (the old rate stays, both measurements become
  evidence of ``q``), a higher one means ours. Noise is believed only on two steady
  measurements that agree, because a wrong noise verdict would teach the controller to
  tolerate its own 429s; and only when our load really rose between them, this kind's and
  all kinds' together (``_load_changed``): a kind whose demand, not its rate, sets what it
  sends, or one whose rise another kind's fall offset under one limit for both, learns
  nothing from an unchanged share. ``q`` is decayed counts (half-life ``NOISE_HALF_LIFE_S``,
  shrunk by a prior of ``NOISE_PRIOR`` clean requests), so noise that stops is forgotten.
* **Increase per interval of successes** (not after N quiet seconds): while the rate is what
  holds work back and recent 429s are no more than ``q`` explains, it grows by ``FAST_STEP`` of
  the ceiling per second; within ``NEAR`` of the limit estimate it crosses that band in about
  ``PROBE_REQUESTS`` requests (CUBIC's plateau around its last loss point), so each probe past
  a real limit, which costs a few 429s, comes once per so many requests. Passing the estimate
  by ``NEAR`` without trouble moves it up and doubles the probe step (BBR's probe-up): an
  upgraded account, or an estimate from a wrong verdict, is outgrown in a minute or two.
* **Slow start** (limits not configured, the ceiling is only a default): start at
  ``START_FRACTION`` of the ceiling and double per second while the rate binds and no 429
  comes (TCP slow start). A configured limit starts at the ceiling. A rate the provider
  announces (``X-RateLimit`` headers) replaces either guess and is a second ceiling from then on.
* **Blocked**: ``BLOCKED_RUN`` requests refused in a row, or nearly all of an interval's, is not
  a rate to fit but an account refusing everything. The kind pauses (``pause_until``) until the
  largest Retry-After, then slow-starts back towards the rate it had (TCP's retransmission
  timeout) instead of being cut to the floor.

The rate stays within ``[floor, ceiling]``, floor ``max(FLOOR_FRACTION·ceiling, FLOOR_RATE)``
(never above the ceiling): low enough for a small account, never zero.

Google SRE's client-side throttling, ``max(0, (requests - K·accepts)/(requests + 1))``, was not
used: it lets ``K - 1`` refused requests through per accepted one, far above the 1 % of 429s
wanted once the limit is known, and it cannot tell noise from a limit.
"""

from __future__ import annotations

import math
from dataclasses import replace

from worker.dispatch.adaptive.states import (
    NOISE_HALF_LIFE_S,
    NOISE_MAX,
    START_FRACTION,
    Z_NOISE_MAX,
    Interval,
    Phase,
    RateState,
)

WINDOW_REQUESTS = 100.0
WINDOW_S = 20.0
"""The 429 share is over about the last ``WINDOW_REQUESTS`` requests, or the last ``WINDOW_S``
if that holds fewer (a slow kind must not judge its rate by a minute ago)."""
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
FAST_STEP = 0.05
"""Increase per second as a share of the ceiling, away from a known limit: floor to ceiling in
about 20 s."""
NEAR = 0.1
PROBE_REQUESTS = 500.0
PROBE_MIN_S = 20.0
PROBE_MAX_S = 120.0
"""Within ``NEAR`` of the limit estimate the rate crosses that band in ``PROBE_REQUESTS``
requests, but in no less than ``PROBE_MIN_S`` nor more than ``PROBE_MAX_S``: a probe past a
real limit costs a few 429s, so probes come once per so many requests, not seconds."""
HOLD_SENT = 5
"""Growth holds while the interval (the window, if the interval had fewer requests than this)
shows more 429s than the noise floor explains."""
MAX_STEP_S = 2.0
"""An update after a long gap grows the rate as if at most this long had passed."""
BLOCKED_RUN = 5
BLOCKED_SENT = 10
BLOCKED_SHARE = 0.9
BLOCKED_PAUSE_S = 5.0
"""Blocked: ``BLOCKED_RUN`` requests refused in a row, or at least ``BLOCKED_SENT`` in an
interval with ``BLOCKED_SHARE`` of them refused. The pause lasts the largest Retry-After
(``BLOCKED_PAUSE_S`` without one)."""


def start_rate(ceiling: float, *, configured: bool, now: float) -> RateState:
    """Configured limits are the account's: start at them. A default ceiling is only a guess:
    start below it and grow fast (slow start)."""
    if ceiling <= 0:
        raise ValueError(f"ceiling must be positive, not {ceiling}")
    state = RateState(ceiling=ceiling, rate=ceiling, phase=Phase.STEADY, updated_at=now, since=now)
    if configured:
        return state
    rate = max(state.floor, START_FRACTION * ceiling)
    return replace(state, rate=rate, phase=Phase.SLOW_START, target=ceiling)


def update_rate(
    state: RateState, interval: Interval, *, hold: bool = False, first: bool = True
) -> RateState:
    """The next state after one interval of this kind's requests. Under a limit that covers
    every kind, a rise here would spoil another kind's measurement: ``hold``, another kind is
    measuring, so this one may be cut but does not grow, and its own measurement goes back up
    (CONFIRM) only if it began ``first`` and has waited ``VERIFY_MAX_S``."""
    now = interval.now
    elapsed = max(0.0, now - state.updated_at)
    sent = max(0, interval.sent)
    throttled = min(sent, max(0, interval.throttled))
    kept = 0.5 ** (elapsed / NOISE_HALF_LIFE_S)
    decay = math.exp(-max(sent / WINDOW_REQUESTS, elapsed / WINDOW_S))
    run = state.refused_run if not sent else state.refused_run + sent if throttled == sent else 0
    state = replace(
        state,
        updated_at=max(now, state.updated_at),
        noise_sent=state.noise_sent * kept,
        noise_throttled=state.noise_throttled * kept,
        window_sent=state.window_sent * decay + sent,
        window_throttled=state.window_throttled * decay + throttled,
        refused_run=run,
    )
    if interval.hint is not None and interval.hint > 0:
        state = replace(state, hint=interval.hint)
        if state.phase is Phase.SLOW_START:
            state = replace(state, rate=state.top, phase=Phase.STEADY, since=now)
        state = replace(state, rate=min(state.rate, state.top))
    if run >= BLOCKED_RUN or (sent >= BLOCKED_SENT and throttled >= BLOCKED_SHARE * sent):
        return _blocked(state, now, interval.retry_after)
    if state.phase in (Phase.VERIFY, Phase.CONFIRM):
        held = hold and not (first and now - state.since >= VERIFY_MAX_S)
        return _measure(state, now, (sent, throttled, max(0, interval.others)), elapsed, held)
    if _significant(state.window_sent, state.window_throttled, state.noise):
        # The window dilutes a sudden overshoot; the last interval's 429s beyond what noise
        # explains do not, and what it got through is sharper still when it had enough
        # requests (with a real limit, it is the limit, even while the provider's burst lasts).
        q = state.noise
        beyond = throttled - 1 - Z_TRIGGER * math.sqrt(sent * q * (1 - q))
        share = max(state.share, beyond / sent if sent else 0.0)
        accepted = None
        if sent >= MIN_SAMPLES and elapsed:
            accepted = (sent - throttled) / elapsed
            # More sent than the rate allows (the dispatcher's own burst): the share says what
            # got through of that, not of the rate.
            share = 1 - (1 - share) * max(1.0, sent / elapsed / state.rate)
        return _cut(state, now, max(0.0, share), restore=state.rate, accepted=accepted)
    if hold:
        return state
    return _grow(state, interval, min(elapsed, MAX_STEP_S), sent, throttled)


def _significant(n: float, k: float, q: float) -> bool:
    """``k`` 429s among ``n`` requests are more than a noise floor ``q`` explains."""
    if k < MIN_THROTTLED or (n < MIN_SAMPLES and k < n / 2):
        return False
    return k > n * (q + MIN_EXCESS) + Z_TRIGGER * math.sqrt(n * q * (1 - q))


def _cut(
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


def _measure(
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
    steady = replace(state, phase=Phase.STEADY, since=now, window_sent=n, window_throttled=k)
    if n < VERIFY_MIN_SENT:
        return steady  # too little demand to tell: keep this rate, the safer side
    q = state.noise
    share, base = k / n, state.base_throttled / max(state.base_sent, 1.0)
    z = _z(base, state.base_sent, share, n)
    if beyond_noise or (z >= Z_WORSE and share > q + MIN_EXCESS):
        # More 429s than the measurement before, or than noise ever is. In VERIFY the
        # provider's burst had hidden part of our overshoot; in CONFIRM they came back with
        # the old rate. Ours: cut to what gets through now.
        return _cut(steady, now, share, restore=state.before_rate)
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
        if _significant(n, k, q):
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


def _grow(
    state: RateState, interval: Interval, elapsed: float, sent: int, throttled: int
) -> RateState:
    """Increase per interval of successes, while this rate is what holds work back."""
    if interval.now < state.pause_until or not interval.binding:
        return state
    if sent < HOLD_SENT:  # a few requests a second: most intervals are empty
        sent, throttled = round(state.window_sent), round(state.window_throttled)
    expected = state.noise * sent
    if throttled > expected + 2 * math.sqrt(expected) + 0.5:
        if state.phase is Phase.SLOW_START:
            return replace(state, phase=Phase.STEADY, since=interval.now)  # the first sign
        return state
    if state.phase is Phase.SLOW_START:
        target = min(state.top, state.target)
        rate = min(target, state.rate * 2 ** min(elapsed, 1.0))
        phase = Phase.STEADY if rate >= target else Phase.SLOW_START
        return replace(state, rate=rate, phase=phase)
    limit, raises, fast = state.limit, state.raises, FAST_STEP * state.top
    if limit is not None and state.rate > limit * (1 + NEAR):
        limit, raises = state.rate, raises + 1  # passed cleanly: the limit is higher
    if limit is not None and state.rate >= limit * (1 - NEAR):
        # Across the band around the limit in PROBE_REQUESTS requests, within PROBE_MIN_S and
        # PROBE_MAX_S: a probe past the limit costs a few 429s, so one per so many requests.
        per_second = min(1 / PROBE_MIN_S, max(state.rate / PROBE_REQUESTS, 1 / PROBE_MAX_S))
        step = min(fast, NEAR * limit * per_second * 2**raises)
    else:
        step = fast
    return replace(
        state, rate=min(state.top, state.rate + step * elapsed), limit=limit, raises=raises
    )


def _blocked(state: RateState, now: float, retry_after: float | None) -> RateState:
    """Nearly everything refused: the account is blocked, not merely over its rate. Wait it
    out, then slow-start back towards the rate we had."""
    wait = retry_after if retry_after is not None and retry_after > 0 else BLOCKED_PAUSE_S
    if state.phase is Phase.SLOW_START:
        target = state.target
    elif state.phase in (Phase.VERIFY, Phase.CONFIRM):
        target = state.before_rate
    else:
        target = state.rate
    return replace(
        state,
        pause_until=max(state.pause_until, now + wait),
        phase=Phase.SLOW_START,
        since=now,
        target=target,
        rate=max(state.floor, min(state.rate, START_FRACTION * target)),
        window_sent=0.0,
        window_throttled=0.0,
        verify_sent=0.0,
        verify_throttled=0.0,
        refused_run=0,
    )
