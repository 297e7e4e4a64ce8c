"""Oxen.ai: ``POST /api/ai/images/generate``, answers with ``images[]`` (not ``data[]``).

Oxen names sizes (square, landscape, portrait) and has no quality or background setting;
its docs show one image per call, so the pipeline splits ``n``. No cost is reported.
"""

from __future__ import annotations

from typing import Any, ClassVar

from jobs.providers.openai_style import SyncImageAPI, common_fields
from jobs.request import ImageRequest

MODEL_IDS = {"gpt-image-1.5": "gpt-image-1-5"}
SIZES = {"auto": "auto", "1024x1024": "square", "1536x1024": "landscape", "1024x1536": "portrait"}


class Oxen(SyncImageAPI):
    path: ClassVar[str] = "/api/ai/images/generate"
    max_images_per_request: ClassVar[int] = 1
    unsupported: ClassVar[tuple[str, ...]] = (
        "quality",
        "background",
        "moderation",
        "input_fidelity",
        "output_compression",
    )

    def body(self, request: ImageRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL_IDS.get(request.model, request.model),
            "prompt": request.prompt,
            "response_format": "url",
            **common_fields(request, "output_format"),
        }
        if request.size is not None:
            body["size"] = SIZES[request.size]
        if request.input_images:
            body["input_image"] = list(request.input_images)
        return {**body, **(request.provider_params or {})}

    def items(self, body: dict[str, Any]) -> list[Any]:
        items = body.get("images")
        return items if isinstance(items, list) else []
