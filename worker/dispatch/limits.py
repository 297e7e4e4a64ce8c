"""Each provider's limits as the fleet's leader keeps them: the in-flight cap and one rate per
request kind (submits, polls), decided about once a second by the pure controllers of
``adaptive`` from what the last second showed (requests sent, 429s counted by ``limit.lua``,
which limits held work back), and written to ``ib:limit:P``, where every pump reads them (the
leader's, and a worker's handoff of a freed slot).

Only the leader writes the rates; a concurrency 429 cuts the cap at once in the task that got
it (``limit.lua``), and the leader's cap controller takes that cut as its own evidence.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace

from jobs.settings import CoreSettings, ProviderConfig
from worker.dispatch import adaptive
from worker.dispatch.adaptive import Interval, Kind, Limits
from worker.redis.scheduling import Binding
from worker.redis.state import State

log = logging.getLogger(__name__)

UPDATE_EVERY_S = 1.0
"""How often a provider's controllers see an interval."""
SPENT = 0.9
"""An interval that sent this share of what its rate allowed found the rate binding."""


@dataclass
class Watch:
    """One provider's controllers in the leader's memory, and what they last saw."""

    limits: Limits
    seen: dict[str, float] = field(default_factory=dict)
    """The cumulative counters of ``ib:limit:P`` at the last update."""
    binding: Binding = field(default_factory=Binding)
    """Which limits held due work back in any pump since the last update."""
    updated: float = 0.0


def start(config: ProviderConfig, now: float) -> Limits:
    return adaptive.start_limits(
        submits_per_second=config.submit_rate,
        polls_per_second=config.poll_rate,
        max_in_flight=config.max_in_flight,
        configured=config.configured,
        now=now,
    )


class Controllers:
    """Every provider's controllers, kept by the leader (a new leader takes over the saved
    state, so a takeover neither forgets a learned limit nor starts a storm)."""

    def __init__(self, state: State, settings: CoreSettings) -> None:
        self.state, self.settings = state, settings
        self.watches: dict[str, Watch] = {}

    def defaults(self, provider: str, now: float) -> tuple[int, float, float]:
        """(cap, submit rate, poll rate) the pumps go by."""
        limits = self.watch(provider, now).limits
        return limits.cap.cap, limits.submits.rate, limits.polls.rate

    def watch(self, provider: str, now: float) -> Watch:
        watch = self.watches.get(provider)
        if watch is None:
            seen = {k: float(v) for k, v in self.state.take_counts(provider).items() if _number(v)}
            watch = Watch(self._load(provider, now), seen=seen, updated=now)
            self.watches[provider] = watch
            self._save(provider, watch)
        return watch

    def until_update(self, provider: str, now: float) -> float:
        """Seconds until the provider's controllers are due an interval."""
        return max(0.0, self.watch(provider, now).updated + UPDATE_EVERY_S - now)

    def observe(self, provider: str, binding: Binding, now: float) -> None:
        watch = self.watch(provider, now)
        watch.binding = Binding(
            watch.binding.submits or binding.submits,
            watch.binding.polls or binding.polls,
            watch.binding.cap or binding.cap,
        )

    def update_if_due(self, provider: str, now: float) -> bool:
        """One interval for the provider's controllers, if one has passed; True if so."""
        watch = self.watch(provider, now)
        if now - watch.updated < UPDATE_EVERY_S:
            return False
        counts = {k: float(v) for k, v in self.state.take_counts(provider).items() if _number(v)}
        limits, elapsed = watch.limits, now - watch.updated
        kinds = (Kind.SUBMIT, Kind.POLL)
        sent_by_kind = {
            kind: counts.get(f"{kind}_sent", 0.0) - watch.seen.get(f"{kind}_sent", 0.0)
            for kind in kinds
        }
        for kind in kinds:
            sent = sent_by_kind[kind]
            others = sum(n for other, n in sent_by_kind.items() if other is not kind)
            throttled = counts.get(f"{kind}_throttled", 0.0)
            throttled -= watch.seen.get(f"{kind}_throttled", 0.0)
            bound = watch.binding.submits if kind is Kind.SUBMIT else watch.binding.polls
            interval = Interval(
                now,
                max(0, int(sent)),
                max(0, int(throttled)),
                binding=bound or _spent(sent, limits.rate(kind).rate, elapsed),
                retry_after=counts.get(f"{kind}_retry_after"),
                others=max(0, int(others)),
            )
            limits = adaptive.update_limits(limits, kind, interval)
        cut = counts.get("cap")
        cap = limits.cap
        if cut is not None and cut < cap.cap:
            # A task's concurrency 429 cut the cap at once: the controller's evidence too.
            cap = adaptive.on_concurrency_429(cap, in_flight=int(cut), named_limit=None, now=now)
        cap = adaptive.update_cap(cap, now=now, binding=watch.binding.cap)
        limits = replace(limits, cap=cap)
        if limits != watch.limits:
            _log_change(provider, watch.limits, limits)
        watch.limits, watch.seen, watch.updated = limits, counts, now
        watch.binding = Binding()
        self._save(provider, watch)
        return True

    def _load(self, provider: str, now: float) -> Limits:
        config = self.settings.provider_config(provider)
        saved = self.state.limits(provider).get("ctl")
        if saved:
            try:
                data = json.loads(saved)
                return Limits(
                    submits=adaptive.RateState.from_dict(
                        data[Kind.SUBMIT], ceiling=config.submit_rate
                    ),
                    polls=adaptive.RateState.from_dict(data[Kind.POLL], ceiling=config.poll_rate),
                    cap=adaptive.CapState.from_dict(data["cap"], ceiling=config.max_in_flight),
                )
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s: saved limits unreadable (%s); starting afresh", provider, exc)
        return start(config, now)

    def _save(self, provider: str, watch: Watch) -> None:
        limits = watch.limits
        self.state.set_limits(
            provider,
            cap=limits.cap.cap,
            submit_rate=limits.submits.rate,
            poll_rate=limits.polls.rate,
            submit_pause=limits.submits.pause_until,
            poll_pause=limits.polls.pause_until,
            ctl=json.dumps(limits.to_dict(), separators=(",", ":")),
        )


def _spent(sent: float, rate: float, elapsed: float) -> bool:
    """Whether an interval used up its kind's budget: the rate held work back even where the
    leader's own pumps did not see it (a worker's handoff pumps most of a busy fleet's work)."""
    return sent >= SPENT * rate * elapsed


def _number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _log_change(provider: str, before: Limits, after: Limits) -> None:
    if (before.cap.cap, before.submits.phase, before.polls.phase) == (
        after.cap.cap,
        after.submits.phase,
        after.polls.phase,
    ) and abs(before.submits.rate - after.submits.rate) < 0.1 * before.submits.rate:
        return
    log.info(
        "%s limits: %d in flight, %.2f submits/s (%s), %.2f polls/s (%s)",
        provider,
        after.cap.cap,
        after.submits.rate,
        after.submits.phase,
        after.polls.rate,
        after.polls.phase,
    )
