"""How many jobs to keep in flight at a provider: the in-flight cap's controller, on its
``CapState``.

**The in-flight cap** needs no statistics: a concurrency 429 is unambiguous (the provider
counted our jobs), so it sets the cap at once, to the limit the message names or else to what
was in flight. The cap then grows by one only after holding work back for ``CAP_REGROW_S``
without a concurrency 429 (Envoy's adaptive concurrency probes its limit the same way, a step at
a time; its latency gradient has no use here, the provider says when we are over). Not
configured, the cap starts at ``START_FRACTION`` of the ceiling and doubles every
``CAP_SLOW_START_S`` that it binds, until the first concurrency 429.
"""

from __future__ import annotations

import math
from dataclasses import replace

from worker.dispatch.adaptive.states import START_FRACTION, CapState, Phase

CAP_SLOW_START_S = 2.0
CAP_REGROW_S = 30.0
"""Not configured, the cap doubles after binding ``CAP_SLOW_START_S``; after a concurrency 429
it grows by one after ``CAP_REGROW_S`` of binding, and as long since its last change."""


def start_cap(ceiling: int, *, configured: bool, now: float) -> CapState:
    """A configured cap is the account's; a default one is a guess, approached by doubling."""
    if ceiling < 1:
        raise ValueError(f"ceiling must be at least 1, not {ceiling}")
    if configured:
        return CapState(ceiling=ceiling, cap=ceiling, phase=Phase.STEADY, changed_at=now)
    cap = max(1, math.ceil(START_FRACTION * ceiling))
    phase = Phase.STEADY if cap >= ceiling else Phase.SLOW_START
    return CapState(ceiling=ceiling, cap=cap, phase=phase, changed_at=now)


def on_concurrency_429(
    state: CapState, *, in_flight: int, named_limit: int | None, now: float
) -> CapState:
    """The provider runs all it allows of ours: the cap becomes the limit it names, else the
    number we had in flight when refused (our other jobs). A named limit above what we had in
    flight means the account is shared, or our count lags: the smaller wins. Never raises the
    cap, never below 1."""
    lower = min(state.cap, in_flight)
    if named_limit is not None and named_limit > 0:
        lower = min(lower, named_limit)
    return replace(state, cap=max(1, lower), phase=Phase.STEADY, changed_at=now, bound_since=None)


def update_cap(state: CapState, *, now: float, binding: bool) -> CapState:
    """Grow the cap while it holds work back: doubling in slow start, else by one after a quiet
    while (so a probe past the account's limit costs one concurrency 429)."""
    if not binding:
        return state if state.bound_since is None else replace(state, bound_since=None)
    since = now if state.bound_since is None else state.bound_since
    state = replace(state, bound_since=since)
    if state.cap >= state.ceiling:
        return state
    if state.phase is Phase.SLOW_START:
        if now - since < CAP_SLOW_START_S:
            return state
        cap = min(state.ceiling, state.cap * 2)
        phase = Phase.STEADY if cap >= state.ceiling else Phase.SLOW_START
        return replace(state, cap=cap, phase=phase, changed_at=now, bound_since=now)
    if now - since < CAP_REGROW_S or now - state.changed_at < CAP_REGROW_S:
        return state
    return replace(state, cap=state.cap + 1, changed_at=now, bound_since=now)
