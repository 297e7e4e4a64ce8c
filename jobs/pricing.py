"""What one image costs, in the unit its provider bills in, and how units convert.

The price tables themselves live in each provider's registry entry
(``jobs.registry``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


class Priced(Protocol):
    """What a price depends on: a request's quality and how many images it asks for."""

    @property
    def quality(self) -> str | None: ...

    @property
    def n(self) -> int: ...


@dataclass(frozen=True)
class PriceTable:
    """Per-image price by quality, for estimates and for providers that report no cost."""

    per_image: Mapping[str, float] = field(default_factory=dict)
    default_quality: str = "auto"

    def cost(self, request: Priced) -> float:
        return self.price(request.quality, request.n)

    def price(self, quality: str | None, n: int) -> float:
        each = self.per_image.get(quality or self.default_quality, max(self.per_image.values()))
        return round(each * n, 6)


def currency(provider: str, unit: str) -> str:
    """The currency an amount is counted in: USD is USD anywhere; credits belong to the
    provider that sells them (an APIFrame credit is not an AI/ML API credit)."""
    return "USD" if unit == "USD" else f"{provider} credits"


def in_usd(amount: float, unit: str, usd_per_credit: float | None) -> float | None:
    """``amount`` of a provider's ``unit`` in USD; None when a credit's price is not known."""
    if unit == "USD":
        return round(amount, 6)
    return None if usd_per_credit is None else round(amount * usd_per_credit, 6)


@dataclass(frozen=True)
class Money:
    """Amounts by currency (see ``currency``); different currencies are never added."""

    by_currency: Mapping[str, float] = field(default_factory=dict)

    def plus(self, currency_: str, amount: float) -> Money:
        merged = dict(self.by_currency)
        merged[currency_] = round(merged.get(currency_, 0.0) + amount, 6)
        return Money(merged)

    def describe(self) -> str:
        """``552 credits`` for one currency; ``24 apiframe credits + 0.009 USD`` for several."""
        if not self.by_currency:
            return "0 credits"
        if len(self.by_currency) == 1:
            ((name, amount),) = self.by_currency.items()
            return f"{amount:g} {'USD' if name == 'USD' else 'credits'}"
        ordered = sorted(self.by_currency.items(), key=lambda item: (item[0] == "USD", item[0]))
        return " + ".join(f"{amount:g} {name}" for name, amount in ordered)

    def in_usd(self, usd_per_credit: Mapping[str, float | None]) -> float | None:
        """The total in USD, or None when some provider's credits have no known price in USD.

        ``usd_per_credit`` maps a provider name to the USD value of one of its credits."""
        total = 0.0
        for name, amount in self.by_currency.items():
            rate = 1.0 if name == "USD" else usd_per_credit.get(name.removesuffix(" credits"))
            if rate is None:
                return None
            total += amount * rate
        return round(total, 6)


@dataclass
class ProviderTotal:
    """One provider's share of a batch: lines, images, and what they cost (or are estimated to
    cost) in its own unit."""

    lines: int = 0
    images: int = 0
    credits: float = 0.0
    unit: str = "credits"


def money_of(by_provider: Mapping[str, ProviderTotal]) -> Money:
    """Each provider's credits in its own currency: never adds one provider's credits to
    another's, or to dollars."""
    amounts: dict[str, float] = {}
    for name, part in by_provider.items():
        if part.credits:
            key = currency(name, part.unit)
            amounts[key] = round(amounts.get(key, 0.0) + part.credits, 6)
    return Money(amounts)
