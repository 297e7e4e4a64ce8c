"""The simulator's own price list: what each simulated provider bills, in that provider's unit.

Written from docs/providers.md, independently of the client's tables (``jobs.pricing`` and the
registry), so a test comparing what the client expects with what the simulator bills can find
a wrong client price. Prices are per image, by model, size and quality.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Unit = Literal["credits", "USD"]
SQUARE = "1024x1024"
LANDSCAPE = "1536x1024"
PORTRAIT = "1024x1536"
STANDARD_SIZES = (SQUARE, LANDSCAPE, PORTRAIT)
BATCH = "openai-batch"
"""The ledger's name for OpenAI's Batch API, billed apart from the synchronous calls."""
BATCH_SHARE = 0.5
"""A Batch API request costs exactly half the synchronous price (docs/providers.md,
"OpenAI's Batch API")."""
PLACEHOLDER_PER_IMAGE: Mapping[Unit, float] = {"USD": 1.0, "credits": 100.0}
"""What an image with no published price costs here (gpt-image-2, a size with no list price):
a round amount no provider charges, so a test that meets it knows the price is unknown."""

Qualities = Mapping[str, float]


@dataclass(frozen=True)
class PriceList:
    """One model's per-image prices at one provider: size → quality → amount."""

    unit: Unit
    by_size: Mapping[str, Qualities]
    auto_as: str = "high"
    """The quality an ``auto`` request is billed as."""
    default_quality: str = "auto"
    """The quality a request that names none gets (the provider's documented default)."""

    def per_image(self, quality: str | None, size: str) -> float | None:
        wanted = quality or self.default_quality
        return self.by_size.get(size, {}).get(self.auto_as if wanted == "auto" else wanted)


def _sizes(square: Qualities, other: Qualities | None = None) -> dict[str, Qualities]:
    """Square at ``square``; both non-square sizes at ``other`` (the same when not given)."""
    return {SQUARE: square, LANDSCAPE: other or square, PORTRAIT: other or square}


def _q(low: float, medium: float, high: float) -> Qualities:
    return {"low": low, "medium": medium, "high": high}


PRICES: Mapping[str, Mapping[str, PriceList]] = {
    # apiframe.ai/docs (the newer of its two tables), per image of gpt-image-1.5, any aspect.
    "apiframe": {"gpt-image-1.5": PriceList("credits", _sizes(_q(4, 9, 24)))},
    # OpenAI list prices in USD per image (docs/providers.md, "OpenAI: models and prices");
    # `auto` quality is billed as high.
    # gpt-image-1-mini's non-square prices: developers.openai.com/api/docs/models/gpt-image-1-mini.
    "openai": {
        "gpt-image-1.5": PriceList("USD", _sizes(_q(0.009, 0.034, 0.133), _q(0.013, 0.05, 0.2))),
        "gpt-image-1": PriceList("USD", _sizes(_q(0.011, 0.042, 0.167), _q(0.016, 0.063, 0.25))),
        "gpt-image-1-mini": PriceList(
            "USD", _sizes(_q(0.005, 0.011, 0.036), _q(0.006, 0.015, 0.052))
        ),
    },
    # The gateways: what the simulator has always billed for gpt-image-1.5, at every size.
    "aimlapi": {
        "openai/gpt-image-1-5": PriceList(
            "credits", _sizes(_q(23.4, 88.4, 345.8)), default_quality="medium"
        )
    },
    "omixa": {"gpt-image-1.5": PriceList("USD", _sizes(_q(0.011, 0.039, 0.156)), auto_as="medium")},
    "oxen": {"gpt-image-1-5": PriceList("USD", _sizes(_q(0.011, 0.042, 0.167)), auto_as="medium")},
}
UNITS: Mapping[str, Unit] = {
    "apiframe": "credits",
    "openai": "USD",
    "aimlapi": "credits",
    "omixa": "USD",
    "oxen": "USD",
    BATCH: "USD",
}


def listed(provider: str, model: str, quality: str | None, size: str) -> float | None:
    """The published per-image price, or None when there is none (the placeholder applies)."""
    if provider == BATCH:
        sync = listed("openai", model, quality, size)
        return None if sync is None else sync * BATCH_SHARE
    prices = PRICES.get(provider, {}).get(model)
    return None if prices is None else prices.per_image(quality, size)


def per_image(provider: str, model: str, quality: str | None, size: str) -> float:
    """What one image costs here: the listed price, else the documented placeholder."""
    found = listed(provider, model, quality, size)
    if found is not None:
        return found
    placeholder = PLACEHOLDER_PER_IMAGE[UNITS[provider]]
    return placeholder * BATCH_SHARE if provider == BATCH else placeholder


def charge(provider: str, model: str, quality: str | None, size: str, n: int) -> float:
    """The bill for ``n`` images of ``size`` (``WIDTHxHEIGHT`` as rendered, never ``auto``)."""
    return round(per_image(provider, model, quality, size) * n, 6)
