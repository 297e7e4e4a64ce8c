"""What one image costs at each provider, in the unit that provider bills in.

APIFrame's table is from its gpt-image-1.5 page (credits per image by quality). The others
are list prices at the time of writing; they are used for ``plan`` estimates, for the budget
guard, and for rows of providers that report no cost (OpenAI, Oxen).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.request import ImageRequest


@dataclass
class PriceTable:
    """Per-image price by quality, for estimates and for providers that report no cost."""

    per_image: dict[str, float] = field(default_factory=dict)
    default_quality: str = "auto"

    def cost(self, request: ImageRequest) -> float:
        quality = request.quality or self.default_quality
        return round(self.per_image.get(quality, max(self.per_image.values())) * request.n, 6)


CREDIT_UNITS = {
    "apiframe": "credits",
    "simulator": "credits",
    "openai": "USD",
    "aimlapi": "credits",
    "omixa": "USD",
    "oxen": "USD",
}

PRICES: dict[str, PriceTable] = {
    "apiframe": PriceTable({"low": 4, "medium": 9, "auto": 24, "high": 24}, default_quality="auto"),
    "simulator": PriceTable(
        {"low": 4, "medium": 9, "auto": 24, "high": 24}, default_quality="auto"
    ),
    "openai": PriceTable(
        {"low": 0.009, "medium": 0.034, "high": 0.133, "auto": 0.133}, default_quality="auto"
    ),
    # AI/ML API bills in its own credits; its docs default quality to medium.
    "aimlapi": PriceTable({"low": 23.4, "medium": 88.4, "high": 345.8}, default_quality="medium"),
    "omixa": PriceTable(
        {"low": 0.011, "medium": 0.039, "high": 0.156, "auto": 0.039}, default_quality="auto"
    ),
    # Oxen has no quality setting for gpt-image-1.5: one price per image.
    "oxen": PriceTable({"auto": 0.04}, default_quality="auto"),
}
