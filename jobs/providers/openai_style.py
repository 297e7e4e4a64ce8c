"""The shared shape of synchronous, OpenAI-style image APIs: one POST returns the images.

Each provider module subclasses ``SyncImageAPI`` with its path, its field mapping and
where it reports cost; the HTTP, the error classification and the reading of ``data[]``
(or Oxen's ``images[]``) as URLs or base64 live here once.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx

from jobs.errors import AmbiguousSubmit, JobFailed, TransientProviderError
from jobs.manifest.request import ImageRequest, overridden
from jobs.providers.adapter import HTTPAdapter
from jobs.providers.base import Artifact, Finished, PollOutcome, SubmitOutcome
from jobs.providers.http import (
    KeyGate,
    key_check,
)
from jobs.registry import REGISTRY
from jobs.settings import ProviderConfig

SIZES = ("1024x1024", "1536x1024", "1024x1536")
BODY_FIELDS: dict[str, str | None] = {
    "model": "model",
    "prompt": "prompt",
    "n": "n",
    "size": "size",
    "quality": "quality",
    "background": "background",
    "output_format": "output_format",
    "output_compression": "output_compression",
    "moderation": "moderation",
    "input_fidelity": "input_fidelity",
    "input_images": "input_images",
    "input_image": "input_images",
    "response_format": None,
    "stream": None,
    "partial_images": None,
}
"""Body keys the OpenAI-style adapters set or rely on, with the manifest field behind each
(None: imagebatch decides it, e.g. how images come back, which it must be able to read)."""


class SyncImageAPI(HTTPAdapter):
    """Base of the synchronous adapters. Submits are not idempotent at these providers."""

    path: ClassVar[str] = "/v1/images/generations"
    unsupported: ClassVar[tuple[str, ...]] = ()
    """Manifest fields this provider has no equivalent for: a line using one is rejected."""
    modelled: ClassVar[dict[str, str | None]] = BODY_FIELDS
    """Body keys ``provider_params`` may not set: they are what a line is priced and read by."""
    key_path: ClassVar[str | None] = None
    """A free ``GET`` that checks the key (OpenAI's ``/v1/models``); None where there is none,
    and the first submit finds a refused key (``KeyGate`` keeps it to one)."""

    def __init__(self, config: ProviderConfig, client: httpx.Client | None = None) -> None:
        super().__init__(config, client)
        self.credit_unit = REGISTRY[config.name].credit_unit  # type: ignore[misc]
        self.gate = KeyGate(self.check_key)

    # -- what subclasses describe -------------------------------------------------------------

    def body(self, request: ImageRequest) -> dict[str, Any]:
        raise NotImplementedError

    def billed(self, body: dict[str, Any]) -> float | None:
        """What the provider says this call cost, if it says."""
        return None

    def extra_problems(self, request: ImageRequest) -> list[tuple[str, str]]:
        return []

    def model_problems(self, request: ImageRequest) -> list[tuple[str, str]]:
        """The models this provider sells here, and the sizes each takes."""
        if request.model != "gpt-image-1.5":
            return [("model", f"{self.name} is set up for gpt-image-1.5 only")]
        return []

    # -- the adapter interface ----------------------------------------------------------------

    def validate(self, request: ImageRequest) -> list[tuple[str, str]]:
        problems = [
            (field, f"{self.name} has no {field} setting")
            for field in self.unsupported
            if getattr(request, field) is not None
        ]
        problems += self.model_problems(request)
        if request.background == "transparent" and request.output_format == "jpeg":
            problems.append(("background", "a transparent background needs png or webp"))
        problems += overridden(request, self.modelled)
        return problems + self.extra_problems(request)

    def estimate(self, request: ImageRequest) -> float:
        return self.prices.cost(request)

    def headers(self) -> dict[str, str]:
        key = self.config.api_key.get_secret_value() if self.config.api_key else ""
        return {"Authorization": f"Bearer {key}"}

    def check_key(self) -> bool:
        """``BatchStop`` when the free ``key_path`` answers 401 (a 403 there may only mean a
        restricted key that cannot list models but can draw: not a refusal); False when the
        provider has no free call for it, or could not be asked."""
        if self.key_path is None:
            return False
        url = f"{self.base_url}{self.key_path}"
        return key_check(self.client, self.name, url, self.headers(), frozenset({401}))

    def price_known(self, request: ImageRequest) -> bool:
        """Whether ``estimate`` is a published price (else it is 0 and ``plan`` says so)."""
        return True

    def submit(
        self, request: ImageRequest, idempotency_key: str, webhook_url: str | None = None
    ) -> SubmitOutcome:
        body = self.post_paid(
            f"{self.base_url}{self.path}",
            json=self.body(request),
            headers=self.headers(),
        )
        artifacts = self.artifacts(body)
        if len(artifacts) != request.n:
            # Billed, but not what was asked for: say so rather than store a short line.
            raise AmbiguousSubmit(
                f"{self.name} returned {len(artifacts)} images for n={request.n}",
                type="malformed_response",
            )
        return Finished(artifacts, credits=self.billed(body), job_id=self.job_id(body))

    def poll(self, job_id: str) -> PollOutcome:
        raise JobFailed(f"{self.name} has no jobs to poll", retryable=True, type="job_lost")

    # -- reading responses --------------------------------------------------------------------

    def items(self, body: dict[str, Any]) -> list[Any]:
        items = body.get("data")
        return items if isinstance(items, list) else []

    def job_id(self, body: dict[str, Any]) -> str | None:
        value = body.get("id")
        return value if isinstance(value, str) else None

    def artifacts(self, body: dict[str, Any]) -> list[Artifact]:
        found: list[Artifact] = []
        for item in self.items(body):
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("b64_json"), str) and item["b64_json"]:
                try:
                    data = base64.b64decode(item["b64_json"], validate=True)
                except (binascii.Error, ValueError):
                    raise TransientProviderError(
                        f"{self.name} sent invalid base64 image data", type="malformed_response"
                    ) from None
                found.append(Artifact(data=data))
            elif isinstance(item.get("url"), str) and item["url"]:
                found.append(Artifact(url=item["url"]))
        return found


IMAGE_FIELDS = (
    "size",
    "quality",
    "background",
    "output_format",
    "output_compression",
    "moderation",
)
"""The manifest fields OpenAI's images API takes under the same names."""


def common_fields(request: ImageRequest, *names: str) -> dict[str, Any]:
    """The named manifest fields that are set, under the same names."""
    return {name: getattr(request, name) for name in names if getattr(request, name) is not None}


def image_body(
    request: ImageRequest, *, model: str | None = None, fields: Sequence[str] = IMAGE_FIELDS
) -> dict[str, Any]:
    """The body OpenAI's images API and its resellers share: the model, the prompt, ``n`` and
    the named fields that are set."""
    return {
        "model": model or request.model,
        "prompt": request.prompt,
        "n": request.n,
        **common_fields(request, *fields),
    }
