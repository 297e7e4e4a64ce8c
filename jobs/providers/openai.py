"""OpenAI's own Images API: ``POST /v1/images/generations``, images inline as base64.

OpenAI reports tokens, not money, so the row's cost is the estimate: the list price of the
model at the requested size (``openai_models``), or the flat table price for an ``auto`` size.
"""

from __future__ import annotations

from typing import Any, ClassVar

from jobs.manifest.request import ImageRequest
from jobs.providers import openai_models
from jobs.providers.openai_style import SyncImageAPI, common_fields


class OpenAI(SyncImageAPI):
    unsupported: ClassVar[tuple[str, ...]] = ("input_images", "input_fidelity")
    """Reference images go to /v1/images/edits (multipart), which this adapter does not use."""
    key_path: ClassVar[str | None] = "/v1/models"

    def extra_problems(self, request: ImageRequest) -> list[tuple[str, str]]:
        if request.output_compression is not None and (request.output_format or "png") == "png":
            return [("output_compression", "output_compression needs output_format jpeg or webp")]
        return []

    def estimate(self, request: ImageRequest) -> float:
        """A non-square image costs more than a square one; the flat table knew no sizes."""
        each = openai_models.price(request.model, request.quality, request.size)
        return self.prices.cost(request) if each is None else round(each * request.n, 6)

    def body(self, request: ImageRequest) -> dict[str, Any]:
        return {
            "model": request.model,
            "prompt": request.prompt,
            "n": request.n,
            **common_fields(
                request,
                "size",
                "quality",
                "background",
                "output_format",
                "output_compression",
                "moderation",
            ),
            **request.extra_params(self.modelled),
        }
