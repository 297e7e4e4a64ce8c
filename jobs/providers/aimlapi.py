"""AI/ML API: OpenAI-shaped ``POST /v1/images/generations`` with its own model ids.

Its schema for gpt-image-1.5 allows only ``n: 1``, so a line with ``n: 3`` becomes three
requests (the pipeline splits it) and still ends with three images. Cost is reported as
``meta.usage.credits_used``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from jobs.manifest.request import ImageRequest
from jobs.providers.openai_style import SyncImageAPI, image_body

MODEL_IDS = {"gpt-image-1.5": "openai/gpt-image-1-5"}


class AIMLAPI(SyncImageAPI):
    max_images_per_request: ClassVar[int] = 1
    unsupported: ClassVar[tuple[str, ...]] = ("input_images", "input_fidelity")

    def extra_problems(self, request: ImageRequest) -> list[tuple[str, str]]:
        problems = []
        if request.quality == "auto":
            problems.append(("quality", "AI/ML API accepts quality low, medium or high"))
        if request.size == "auto":
            problems.append(("size", "AI/ML API accepts size 1024x1024, 1024x1536 or 1536x1024"))
        return problems

    def body(self, request: ImageRequest) -> dict[str, Any]:
        return {
            **image_body(request, model=MODEL_IDS.get(request.model, request.model)),
            "response_format": "url",
            **request.extra_params(self.modelled),
        }

    def billed(self, body: dict[str, Any]) -> float | None:
        meta = body.get("meta")
        usage = meta.get("usage") if isinstance(meta, dict) else None
        used = usage.get("credits_used") if isinstance(usage, dict) else None
        return float(used) if isinstance(used, int | float) else None
