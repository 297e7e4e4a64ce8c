"""OpenAI's own Images API: ``POST /v1/images/generations``, images inline as base64.

OpenAI reports tokens, not money, so the row's cost is the estimate: the list price of the
model at the requested size (``openai_models``; an ``auto`` size at the square price). Every
GPT image model OpenAI's reference lists is accepted, each with its own sizes; a model whose
price is not published (gpt-image-2) is priced 0 and said to be unknown, never guessed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from jobs.manifest.request import ImageRequest
from jobs.providers import openai_models
from jobs.providers.openai_style import SyncImageAPI, image_body
from jobs.text import shown


class OpenAI(SyncImageAPI):
    unsupported: ClassVar[tuple[str, ...]] = ("input_images", "input_fidelity")
    """Reference images go to /v1/images/edits (multipart), which this adapter does not use."""
    key_path: ClassVar[str | None] = "/v1/models"

    def model_problems(self, request: ImageRequest) -> list[tuple[str, str]]:
        if request.model not in openai_models.MODELS:
            models = ", ".join(openai_models.MODELS)
            return [("model", f"model '{shown(request.model)}' is not one of {models}")]
        problem = openai_models.size_problem(request.model, request.size or "auto")
        return [] if problem is None else [("size", problem)]

    def extra_problems(self, request: ImageRequest) -> list[tuple[str, str]]:
        if request.output_compression is not None and (request.output_format or "png") == "png":
            return [("output_compression", "output_compression needs output_format jpeg or webp")]
        return []

    def unit_price(self, request: ImageRequest) -> float | None:
        """USD list price of one image of the synchronous API (None: not published); an
        ``auto`` size is priced as the square it usually is."""
        size = request.size if request.size not in (None, "auto") else openai_models.SQUARE
        return openai_models.price(request.model, request.quality, size)

    def estimate(self, request: ImageRequest) -> float:
        """A non-square image costs more than a square one; the flat table knew no sizes."""
        each = self.unit_price(request)
        return 0.0 if each is None else round(each * request.n, 6)

    def price_known(self, request: ImageRequest) -> bool:
        return self.unit_price(request) is not None

    def body(self, request: ImageRequest) -> dict[str, Any]:
        return {**image_body(request), **request.extra_params(self.modelled)}
