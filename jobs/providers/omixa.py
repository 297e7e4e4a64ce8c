"""Omixa: a resale gateway, ``POST /api/v1/images/generations``, base64 images, and the
money actually charged in ``usage.billed_amount`` (a decimal string, in USD)."""

from __future__ import annotations

from typing import Any, ClassVar

from jobs.manifest.request import ImageRequest
from jobs.providers.openai_style import IMAGE_FIELDS, SyncImageAPI, image_body


class Omixa(SyncImageAPI):
    path: ClassVar[str] = "/api/v1/images/generations"
    unsupported: ClassVar[tuple[str, ...]] = ("output_compression",)

    def extra_problems(self, request: ImageRequest) -> list[tuple[str, str]]:
        if any(not url.startswith("data:image/") for url in request.input_images or []):
            return [("input_images", "Omixa takes reference images as inline data: URLs")]
        return []

    def body(self, request: ImageRequest) -> dict[str, Any]:
        fields = [name for name in IMAGE_FIELDS if name != "output_compression"]
        body = image_body(request, fields=[*fields, "input_fidelity"])
        if request.input_images:
            body["input_images"] = [
                {"type": "image_url", "image_url": {"url": url}} for url in request.input_images
            ]
        return {**body, **request.extra_params(self.modelled)}

    def billed(self, body: dict[str, Any]) -> float | None:
        usage = body.get("usage")
        amount = usage.get("billed_amount") if isinstance(usage, dict) else None
        try:
            return float(amount) if amount is not None else None
        except (TypeError, ValueError):
            return None
