"""Which providers a line may go to: one (pinned), or a pool (``--provider auto``, ``a,b,c``, a
line's own ``"provider": "auto"``), ranked cheapest first in USD.

A pool's candidates for a line are the members that can serve it: reachable (a key and a base
URL), accepting the line's fields (each adapter's own ``validate``), and, under
``--max-usd-per-image``, priced at most that. They are ranked by USD per image; a provider
whose USD price is unknown (a credit without ``IMAGEBATCH_USD_PER_CREDIT_<NAME>``, a model
without a published price) ranks after every known one; ties keep the order the user listed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from jobs.errors import ConfigError
from jobs.manifest.request import ImageRequest
from jobs.providers.base import Provider
from jobs.registry import REGISTRY
from jobs.text import shown

AUTO = "auto"
"""Every provider with a key (group providers, whose results take hours, only when named)."""

AdapterFor = Callable[[str], Provider]

POOLED = "pool"
"""What a pool line's fingerprint names as its provider: whichever member bought it, a later
batch asking the same of a pool takes it instead of buying it again."""


def is_pool(spec: str) -> bool:
    """``auto`` or a list: the line goes to whichever member can take it."""
    return spec == AUTO or "," in spec


def queue_name(candidates: Sequence[str]) -> str:
    """The READY queue a pool line waits in: its remaining candidates, cheapest first (every one
    of them takes lines from it, the cheapest with a free slot first)."""
    return "@" + ",".join(candidates)


def queue_members(queue: str) -> tuple[str, ...]:
    return tuple(queue.removeprefix("@").split(","))


@dataclass(frozen=True)
class PoolRules:
    """What a pool's choice depends on besides the line: who has a key, what a credit is worth
    in USD, and the most a user will pay per image."""

    keyed: tuple[str, ...] = ()
    usd_rates: Mapping[str, float | None] = field(default_factory=dict)
    max_usd_per_image: float | None = None


def members(spec: str, keyed: Sequence[str]) -> tuple[str, ...] | None:
    """The pool a ``--provider`` or a line's ``provider`` names, in the user's order; None when
    it names one provider (the line is pinned to it).

    Raises:
        ConfigError: a name imagebatch does not know, or ``auto`` with no provider keyed.
    """
    if spec == AUTO:
        found = tuple(
            name
            for name in keyed
            if not REGISTRY[name].builtin_simulator and not REGISTRY[name].group
        )
        if not found:
            raise ConfigError(
                "--provider auto: no provider has a key: set IMAGEBATCH_<NAME>_API_KEY for the "
                "providers to pool"
            )
        return found
    if "," not in spec:
        return None
    names = tuple(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))
    unknown = [name for name in names if name not in REGISTRY]
    if unknown:
        raise ConfigError(
            f"unknown provider {shown(unknown[0])} in --provider {shown(spec)}: use some of "
            f"{', '.join(REGISTRY)}"
        )
    grouped = [name for name in names if REGISTRY[name].group]
    if grouped:
        raise ConfigError(
            f"{grouped[0]} sends lines in groups that finish within hours: it cannot be in a "
            f"pool (--provider {shown(spec)}); run it on its own"
        )
    return names


@dataclass(frozen=True)
class Choice:
    """A line's candidates, best first, and why each other member cannot take it."""

    candidates: tuple[str, ...]
    refused: Mapping[str, str]


def usd_per_image(
    adapter: Provider, request: ImageRequest, usd_per_credit: float | None
) -> float | None:
    """What one image of ``request`` costs at the provider, in USD (None: not known)."""
    estimate: float | None = adapter.estimate(request)
    if estimate is None:
        return None
    rate = 1.0 if adapter.credit_unit == "USD" else usd_per_credit
    return None if rate is None else estimate * rate / max(1, request.n)


def choose(
    pool: Sequence[str],
    request: ImageRequest,
    adapter_for: AdapterFor,
    usd_rates: Mapping[str, float | None],
    max_usd_per_image: float | None = None,
) -> Choice:
    """The pool's members that can take ``request``, cheapest first."""
    ranked: list[tuple[bool, float, int, str]] = []
    refused: dict[str, str] = {}
    for order, name in enumerate(pool):
        try:
            adapter = adapter_for(name)
        except ConfigError as exc:
            refused[name] = exc.message
            continue
        problems = adapter.validate(request)
        if problems:
            refused[name] = problems[0][1]
            continue
        price = usd_per_image(adapter, request, usd_rates.get(name))
        if max_usd_per_image is not None and (price is None or price > max_usd_per_image):
            what = "unknown" if price is None else f"{price:g} USD"
            refused[name] = f"costs {what} an image, over --max-usd-per-image"
            continue
        ranked.append((price is None, price or 0.0, order, name))
    return Choice(tuple(name for *_, name in sorted(ranked)), refused)


def refusal(choice: Choice) -> str:
    """Why no member of the pool can take a line, in one line naming each."""
    return "no provider of the pool can take this line: " + "; ".join(
        f"{name}: {reason}" for name, reason in choice.refused.items()
    )
