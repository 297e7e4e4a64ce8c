"""How fast to send one kind of request (submits, polls) to a provider: ``update_rate``, once
per interval (about a second), on the kind's ``RateState``.

**The rate.** A 429 is either *ours* (we are above the account's real limit) or *noise* (the
provider refuses some requests whatever our rate: shared capacity short). TCP's AIMD takes
every loss for congestion, which is why the old limiter (x0.7 per 429) sat at its floor under
3 % random 429s: the known weakness of loss-based TCP on lossy links, which TCP Westwood and BBR
answer by looking at what gets through rather than at each loss. So this is AIMD with *loss
discrimination* and a BBR-like model of the limit:

* **Evidence, not single 429s; cut to what got through, then find out whose they were**
  (``worker.dispatch.adaptive.verdict``). A cut needs the share of 429s among recent requests
  (counts decayed over about ``WINDOW_REQUESTS`` requests or ``WINDOW_S``, whichever is
  shorter) significantly above the noise floor ``q``. It goes to the rate the provider
  accepted (BBR's delivery rate), and two measurements follow: VERIFY at the lower rate (a
  clear fall: ours, and what got through is the limit estimate) and, if it did not fall,
  CONFIRM at the old rate (the same share: noise, the old rate stays and both measurements
  teach ``q``). Noise is believed only on two steady measurements that agree and only when our
  load really rose between them, because a wrong noise verdict would teach the controller to
  tolerate its own 429s. ``q`` is decayed counts (half-life ``NOISE_HALF_LIFE_S``, shrunk by a
  prior of ``NOISE_PRIOR`` clean requests), so noise that stops is forgotten.
* **Increase per interval of successes** (not after N quiet seconds): while the rate is what
  holds work back and recent 429s are no more than ``q`` explains, it grows by ``FAST_STEP`` of
  the ceiling per second; within ``NEAR`` of the limit estimate it crosses that band in about
  ``PROBE_REQUESTS`` requests (CUBIC's plateau around its last loss point), so each probe past
  a real limit, which costs a few 429s, comes once per so many requests. Passing the estimate
  by ``NEAR`` without trouble moves it up and doubles the probe step (BBR's probe-up): an
  upgraded account, or an estimate from a wrong verdict, is outgrown in a minute or two.
* **Slow start** (limits not configured, the ceiling is only a default): start at
  ``START_FRACTION`` of the ceiling (polls at ``POLL_START_FRACTION``) and double per second
  while the rate binds and no 429 comes (TCP slow start). A configured limit starts at the
  ceiling. A rate the provider announces (``X-RateLimit`` headers) replaces either guess and
  is a second ceiling from then on.
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
    START_FRACTION,
    Interval,
    Phase,
    RateState,
)
from worker.dispatch.adaptive.verdict import (
    MIN_SAMPLES,
    NEAR,
    VERIFY_MAX_S,
    Z_TRIGGER,
    cut,
    measure,
    significant,
)

WINDOW_REQUESTS = 100.0
WINDOW_S = 20.0
"""The 429 share is over about the last ``WINDOW_REQUESTS`` requests, or the last ``WINDOW_S``
if that holds fewer (a slow kind must not judge its rate by a minute ago)."""
FAST_STEP = 0.05
"""Increase per second as a share of the ceiling, away from a known limit: floor to ceiling in
about 20 s."""
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


def start_rate(
    ceiling: float, *, configured: bool, now: float, fraction: float = START_FRACTION
) -> RateState:
    """Configured limits are the account's: start at them. A default ceiling is only a guess:
    start below it and grow fast (slow start)."""
    if ceiling <= 0:
        raise ValueError(f"ceiling must be positive, not {ceiling}")
    state = RateState(ceiling=ceiling, rate=ceiling, phase=Phase.STEADY, updated_at=now, since=now)
    if configured:
        return state
    rate = max(state.floor, fraction * ceiling)
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
        return measure(state, now, (sent, throttled, max(0, interval.others)), elapsed, held)
    if significant(state.window_sent, state.window_throttled, state.noise):
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
        return cut(state, now, max(0.0, share), restore=state.rate, accepted=accepted)
    if hold:
        return state
    return _grow(state, interval, min(elapsed, MAX_STEP_S), sent, throttled)


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
