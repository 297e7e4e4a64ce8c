"""What a plan will cost, as people read it: each provider's own unit, and USD where a credit's
price is known (and the setting that would make it known, where not)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from jobs.pricing import in_usd
from jobs.registry import REGISTRY
from jobs.validate import Plan


def usd_setting(provider: str) -> str:
    return f"IMAGEBATCH_USD_PER_CREDIT_{provider.replace('-', '_').upper()}"


def money_line(plan: Plan, rates: Mapping[str, float | None]) -> str:
    """``900 apiframe credits + 1.2 USD ≈ 10.2 USD``; without the total where a credit's price is
    not set (``provider_lines`` says which setting would give it)."""
    described = plan.estimate.describe()
    usd = plan.estimate.in_usd(rates)
    if usd is None or set(plan.estimate.by_currency) <= {"USD"}:
        return described
    return f"{described} ≈ {usd:g} USD"


def provider_lines(plan: Plan, rates: Mapping[str, float | None]) -> Iterator[str]:
    """One line per provider (lines, images, cost in its unit and USD); for a pool, what its
    lines could cost if each went to its dearest member."""
    for name, part in sorted(plan.by_provider.items()):
        usd = in_usd(part.credits, part.unit, rates.get(name))
        own = f"{part.credits:g} {part.unit}"
        cost = (
            own
            if part.unit == "USD"
            else f"{own} ≈ {usd:g} USD"
            if usd is not None
            else f"{own} (USD unknown: set {usd_setting(name)})"
        )
        yield f"  {name}: {part.lines} lines · {part.images} images · {cost}"
    if plan.pooled:
        unknown = [
            name
            for name in sorted(plan.members)
            if in_usd(1.0, REGISTRY[name].credit_unit, rates.get(name)) is None
        ]
        worst = plan.pool_worst_usd
        most = (
            f"up to {worst:g} USD if each went to its dearest member"
            if worst is not None
            else "USD unknown for "
            + ", ".join(f"{name} (set {usd_setting(name)})" for name in unknown)
        )
        yield (
            f"  pool ({', '.join(sorted(plan.members))}): {plan.pooled} lines, priced at their "
            f"cheapest member; {most}"
        )
