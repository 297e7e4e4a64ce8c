"""A batch's budget (``--max-credits N``, ``--max-usd N``) as a start checks it: in which
currency it holds, refused when the manifest bills in units that do not add up (or, in USD,
when a credit's price is unknown). Each line then holds its estimate before its submit
(``reserve.lua``) and gives it back when it moves or ends cheaper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.errors import ConfigError
from jobs.pricing import currency
from jobs.registry import REGISTRY
from jobs.settings import CoreSettings
from jobs.validate import Plan


@dataclass(frozen=True)
class Budget:
    """``--max-credits N`` (the manifest's one billing unit) or ``--max-usd N``."""

    amount: float
    usd: bool = False


def budget_record(settings: CoreSettings, plan: Plan, budget: Budget | None) -> dict[str, Any]:
    """The budget's fields of the batch's record: its amount and currency; refused when the
    manifest bills in units that do not add up."""
    if budget is None:
        return {}
    used = {currency(name, part.unit) for name, part in plan.by_provider.items()}
    used |= {currency(name, REGISTRY[name].credit_unit) for name in plan.members}
    if budget.usd:
        missing = [
            f"IMAGEBATCH_USD_PER_CREDIT_{name.removesuffix(' credits').upper()}"
            for name in sorted(used)
            if name != "USD" and settings.usd_per_credit(name.removesuffix(" credits")) is None
        ]
        if missing:
            raise ConfigError(
                f"--max-usd needs the USD price of a credit: set {', '.join(missing)}"
            )
        return {"budget": budget.amount, "budget_currency": "USD", "budget_unit": "USD"}
    if len(used) > 1:
        raise ConfigError(
            f"--max-credits: this manifest is billed in "
            f"{' and '.join(sorted(used, key=_usd_last))}, which do not add up; use --max-usd "
            "(with IMAGEBATCH_USD_PER_CREDIT_<NAME> set) instead"
        )
    name = next(iter(used), "credits")
    unit = "USD" if name == "USD" else "credits"
    return {"budget": budget.amount, "budget_currency": name, "budget_unit": unit}


def _usd_last(name: str) -> tuple[bool, str]:
    return name == "USD", name
