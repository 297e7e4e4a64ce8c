"""OpenAI's GPT image models: the sizes each accepts and its list price per image.

Pure rules from docs/providers.md, "OpenAI: models and prices" (no HTTP), so a line can be
refused or priced before any money is spent; the simulator keeps its own copy of these rules,
as an independent oracle must.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

SQUARE = "1024x1024"
STANDARD_SIZES = (SQUARE, "1536x1024", "1024x1536")
"""Sizes every GPT image model takes (plus ``auto``, where the model picks the size)."""
QUALITIES = ("low", "medium", "high")
FLEXIBLE_MULTIPLE = 16
FLEXIBLE_MAX_RATIO = 3
FLEXIBLE_LONG_MAX = 3840
FLEXIBLE_SHORT_MAX = 2160
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")

Prices = Mapping[str, float]


@dataclass(frozen=True)
class ImageModel:
    """One model: whether it takes free sizes, and its USD list prices (None: not known)."""

    name: str
    flexible_sizes: bool = False
    """Any ``WIDTHxHEIGHT`` within the gpt-image-2 rules, besides the standard sizes."""
    square: Prices | None = None
    """USD per 1024x1024 image by quality."""
    other: Prices | None = None
    """USD per 1536x1024 or 1024x1536 image by quality."""


def _q(low: float, medium: float, high: float) -> Prices:
    return {"low": low, "medium": medium, "high": high}


MODELS: Mapping[str, ImageModel] = {
    m.name: m
    for m in (
        ImageModel("gpt-image-1.5", square=_q(0.009, 0.034, 0.133), other=_q(0.013, 0.05, 0.2)),
        ImageModel("gpt-image-1", square=_q(0.011, 0.042, 0.167), other=_q(0.016, 0.063, 0.25)),
        # Non-square: OpenAI's model page (developers.openai.com/api/docs/models/gpt-image-1-mini).
        ImageModel(
            "gpt-image-1-mini", square=_q(0.005, 0.011, 0.036), other=_q(0.006, 0.015, 0.052)
        ),
        # gpt-image-2's prices were not verified (docs/providers.md): unknown, not guessed.
        ImageModel("gpt-image-2", flexible_sizes=True),
        ImageModel("gpt-image-2-2026-04-21", flexible_sizes=True),
    )
}


def size_problem(model: str, size: str) -> str | None:
    """Why ``model`` refuses ``size``, in words a manifest author can act on; None if it fits."""
    spec = MODELS.get(model)
    if spec is None:
        return f"unknown OpenAI image model {model!r}; one of {', '.join(MODELS)}"
    if size == "auto" or size in STANDARD_SIZES:
        return None
    standard = f"auto, {', '.join(STANDARD_SIZES)}"
    if not spec.flexible_sizes:
        return f"{model} takes the sizes {standard}, not {size!r}"
    match = _SIZE.fullmatch(size)
    if match is None:
        return f"size must be {standard} or WIDTHxHEIGHT (e.g. 2048x1152), not {size!r}"
    width, height = int(match[1]), int(match[2])
    long, short = max(width, height), min(width, height)
    if short == 0 or width % FLEXIBLE_MULTIPLE or height % FLEXIBLE_MULTIPLE:
        return f"{size}: both sides must be positive multiples of {FLEXIBLE_MULTIPLE}"
    if long > FLEXIBLE_MAX_RATIO * short:
        return f"{size}: the aspect ratio must be between 1:3 and 3:1"
    if long > FLEXIBLE_LONG_MAX or short > FLEXIBLE_SHORT_MAX:
        return f"{size}: at most {FLEXIBLE_LONG_MAX}x{FLEXIBLE_SHORT_MAX} in either orientation"
    return None


def price(model: str, quality: str | None, size: str | None) -> float | None:
    """USD list price of one image of the synchronous API; None when it is not known.

    ``auto`` (or no) quality is billed as high. An ``auto`` (or no) size is None too: the
    model picks the size, and so the price, only when it draws (see ``max_price``).
    """
    spec = MODELS.get(model)
    wanted = "high" if quality in (None, "auto") else quality
    if spec is None or size is None or size_problem(model, size) is not None:
        return None
    prices = spec.square if size == SQUARE else spec.other if size in STANDARD_SIZES else None
    return None if prices is None else prices.get(wanted)


def max_price(model: str, quality: str | None) -> float | None:
    """The most one image can cost at any standard size: a budget bound for ``auto`` sizes."""
    found = [price(model, quality, size) for size in STANDARD_SIZES]
    known = [p for p in found if p is not None]
    return max(known) if len(known) == len(found) else None
