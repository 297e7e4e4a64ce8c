"""APIFrame v2: asynchronous jobs. ``POST /v2/images/generate`` → job id, ``GET /v2/jobs/:id``.

Submits carry an ``Idempotency-Key``: a POST repeated after a lost connection returns the
original job instead of buying a second one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

import httpx

from jobs.errors import JobFailed, TransientProviderError
from jobs.manifest.request import ImageRequest, overridden
from jobs.providers.adapter import HTTPAdapter
from jobs.providers.base import Artifact, Finished, Pending, PollOutcome, SubmitOutcome, Submitted
from jobs.providers.http import (
    KeyGate,
    check,
    json_object,
    key_check,
    send,
)
from jobs.settings import ProviderConfig
from jobs.text import shown

log = logging.getLogger(__name__)

ASPECT_RATIOS = {"1024x1024": "1:1", "1536x1024": "3:2", "1024x1536": "2:3"}
PARAMS_BLOCK = {"gpt-image-1.5": "gptImageParams", "gpt-image-2": "gptImage2Params"}
MAX_PROMPT = 2000
PENDING = {"QUEUED", "PROCESSING"}
POLICY_WORDS = ("policy", "moderation", "safety", "nsfw", "inappropriate", "blocked")
BODY_FIELDS: dict[str, str | None] = {
    "model": "model",
    "prompt": "prompt",
    "webhookUrl": None,
    "webhookEvents": None,
    "number_of_images": "n",
    "aspect_ratio": "size",
    "quality": "quality",
    "output_format": "output_format",
    "background": "background",
    "input_images": "input_images",
    "input_fidelity": "input_fidelity",
    "moderation": "moderation",
}
"""Keys the adapter sets, top level and in the params block, with the manifest field behind
each (None: imagebatch decides it). ``provider_params`` may not set them: they are priced."""


class APIFrame(HTTPAdapter):
    """The APIFrame adapter (also used, with the simulator's URL, for ``--provider simulator``)."""

    idempotent_submit: ClassVar[bool] = True
    credit_unit: ClassVar[str] = "credits"
    polled: ClassVar[bool] = True
    webhooks: ClassVar[bool] = True
    modelled: ClassVar[dict[str, str | None]] = BODY_FIELDS

    def __init__(self, config: ProviderConfig, client: httpx.Client | None = None) -> None:
        super().__init__(config, client)
        self.gate = KeyGate()

    def check_key(self) -> bool:
        """``GET /v2/me`` (free): ``BatchStop`` when APIFrame refuses the key (401, or 403
        for an inactive one); False when it could not be asked."""
        url = f"{self.base_url}/v2/me"
        return key_check(self.client, self.name, url, self.headers(), frozenset({401, 403}))

    def validate(self, request: ImageRequest) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if len(request.prompt) > MAX_PROMPT:
            problems.append(("prompt", f"APIFrame accepts prompts up to {MAX_PROMPT} characters"))
        if request.model not in PARAMS_BLOCK:
            models = ", ".join(PARAMS_BLOCK)
            problems.append(("model", f"model '{shown(request.model)}' is not one of {models}"))
        if request.size not in (None, "auto", *ASPECT_RATIOS):
            sizes = ", ".join(("auto", *ASPECT_RATIOS))
            problems.append(("size", f"APIFrame takes the sizes {sizes}"))
        if request.input_fidelity == "auto":
            problems.append(("input_fidelity", "APIFrame accepts input_fidelity low or high"))
        if request.output_compression is not None:
            problems.append(("output_compression", "APIFrame has no output_compression"))
        if request.model == "gpt-image-1.5" and request.moderation is not None:
            problems.append(("moderation", "gpt-image-1.5 on APIFrame has no moderation setting"))
        if request.model == "gpt-image-2":
            if request.background == "transparent":
                problems.append(("background", "gpt-image-2 has no transparent background"))
            if request.input_fidelity is not None:
                problems.append(("input_fidelity", "gpt-image-2 has no input_fidelity"))
        return problems + overridden(request, self.modelled)

    def estimate(self, request: ImageRequest) -> float:
        return self.prices.cost(request)

    def price_known(self, request: ImageRequest) -> bool:
        return True

    def body(self, request: ImageRequest, webhook_url: str | None = None) -> dict[str, Any]:
        """The request in APIFrame's terms: common fields move into the model's params block."""
        params: dict[str, Any] = {"number_of_images": request.n}
        if request.size and request.size != "auto":
            params["aspect_ratio"] = ASPECT_RATIOS[request.size]
        for field in ("quality", "output_format", "background", "input_fidelity", "moderation"):
            value = getattr(request, field)
            if value is not None:
                params[field] = value
        if request.input_images:
            params["input_images"] = list(request.input_images)
        params.update(request.extra_params(self.modelled))
        block = PARAMS_BLOCK.get(request.model, "gptImageParams")
        body: dict[str, Any] = {"model": request.model, "prompt": request.prompt, block: params}
        if webhook_url:
            body |= {"webhookUrl": webhook_url, "webhookEvents": ["completed", "failed"]}
        return body

    def headers(self, **extra: str) -> dict[str, str]:
        key = self.config.api_key.get_secret_value() if self.config.api_key else ""
        return {"X-API-Key": key, **extra}

    def submit(
        self, request: ImageRequest, idempotency_key: str, webhook_url: str | None = None
    ) -> SubmitOutcome:
        body = self.post_paid(
            f"{self.base_url}/v2/images/generate",
            json=self.body(request, webhook_url),
            headers=self.headers(**{"Idempotency-Key": idempotency_key}),
        )
        job_id = body.get("jobId")
        if not isinstance(job_id, str) or not job_id:
            raise TransientProviderError(f"{self.name} accepted the job but sent no jobId")
        return Submitted(job_id)

    def poll(self, job_id: str) -> PollOutcome:
        response = send(
            self.client, "GET", f"{self.base_url}/v2/jobs/{job_id}", headers=self.headers()
        )
        if response.status_code == 404:
            raise JobFailed(
                f"{self.name} does not know job {job_id}", retryable=True, type="job_lost"
            )
        check(response, self.name)
        return job_outcome(json_object(response, self.name), job_id, self.name)


def job_outcome(job: Mapping[str, Any], job_id: str, provider: str) -> PollOutcome:
    """What a Job object (a poll's answer, or a webhook delivery: the same fields) says of the
    job: ``Finished``, ``Pending``, or ``JobFailed`` raised. The one place APIFrame's outcome
    is read."""
    status = str(job.get("status", ""))
    if status == "COMPLETED":
        urls = result_urls(job.get("result"))
        if not urls:
            raise TransientProviderError(
                f"{provider} job completed with no image URL", type="malformed_response"
            )
        cost = job.get("creditCost")
        credits = float(cost) if isinstance(cost, int | float) else None
        return Finished(
            [Artifact(url=url) for url in urls],
            credits=credits,
            job_id=job_id,
            latency_s=seconds_between(job.get("createdAt"), job.get("completedAt")),
            expired=job.get("expired") is True,
        )
    if status == "FAILED":
        reason = str(job.get("error") or "job failed")
        if any(word in reason.lower() for word in POLICY_WORDS):
            raise JobFailed(reason, retryable=False, type="content_policy")
        raise JobFailed(reason, retryable=True, type="job_failed")
    if status == "CANCELLED":
        raise JobFailed("the job was cancelled at the provider", retryable=False, type="cancelled")
    if status not in PENDING:
        log.warning("%s job %s has unknown status %r; still waiting", provider, job_id, status)
    progress = job.get("progress")
    return Pending(status, progress if isinstance(progress, int) else None)


def seconds_between(start: object, end: object) -> float | None:
    """``completedAt - createdAt`` of a job, by the provider's clock, if both are readable."""
    if not isinstance(start, str) or not isinstance(end, str):
        return None
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (b - a).total_seconds())


def result_urls(result: object) -> list[str]:
    """Both documented shapes: a URL string, or ``{"images": [url | {"url": ...}, ...]}``."""
    if isinstance(result, str):
        return [result]
    if isinstance(result, dict):
        images = result.get("images")
        if isinstance(images, str):
            return [images]
        if isinstance(images, list):
            urls = [
                item if isinstance(item, str) else item.get("url")
                for item in images
                if isinstance(item, str | dict)
            ]
            return [url for url in urls if isinstance(url, str) and url]
        url = result.get("url")
        return [url] if isinstance(url, str) else []
    return []
