"""OpenAI's Batch API as the provider ``openai-batch``: the requests, models and images of
``openai``, sent in groups (one JSONL input file and one OpenAI batch per group), finished
within 24 hours at half the price.

The adapter holds what is pure about it: each request's body (the synchronous one, so the two
providers cannot drift), what a line costs, and what one line of a batch's output or error
file means for its manifest line. The runtime (``worker.groups``) uploads, creates, polls and
collects through ``api`` (``OpenAIBatchAPI``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from jobs.errors import BatchStop, PermanentProviderError, ProviderError, TransientProviderError
from jobs.manifest.request import ImageRequest
from jobs.providers.base import PollOutcome, SubmitOutcome
from jobs.providers.http import check
from jobs.providers.openai import OpenAI
from jobs.providers.openai_batch_api import OpenAIBatchAPI
from jobs.registry import BATCH_SHARE
from jobs.settings import ProviderConfig

UNFINISHED = {
    "batch_expired": "the OpenAI batch expired (24 h) before this request ran",
    "batch_cancelled": "the OpenAI batch was cancelled before this request ran",
}
"""Error-file codes of requests a batch never ran: nothing was billed for them."""


@dataclass(frozen=True)
class RequestResult:
    """What one line of a batch's output or error file says about its request."""

    custom_id: str
    request_id: str | None
    """The request's id in the batch (``batch_req_…``): the row's job id."""
    body: dict[str, Any] | None
    """The Images API's answer (``data[]`` of base64 images, ``size``, ``quality``)."""
    error: ProviderError | None
    """Why the request has no images: ``retryable`` when a later request may have them."""


class OpenAIBatch(OpenAI):
    """``openai-batch``: validated and priced as ``openai`` (half of it), sent in groups."""

    polled: ClassVar[bool] = True
    group: ClassVar[bool] = True
    """Lines go to the provider in groups (``worker.groups``), never one by one."""

    def __init__(self, config: ProviderConfig, client: httpx.Client | None = None) -> None:
        super().__init__(config, client)
        self.api = OpenAIBatchAPI(config, self.client)

    def unit_price(self, request: ImageRequest) -> float | None:
        each = super().unit_price(request)
        return None if each is None else each * BATCH_SHARE

    def cost(self, request: ImageRequest, body: dict[str, Any], images: int) -> float:
        """What the line cost: half the list price of what was drawn (the answer's own
        ``size`` and ``quality``: an ``auto`` request is billed as what it became); 0 for
        a model whose price is not published."""
        drawn: dict[str, Any] = {}
        for name in ("size", "quality"):
            if isinstance(body.get(name), str):
                drawn[name] = body[name]
        each = self.unit_price(request.model_copy(update=drawn))
        return 0.0 if each is None else round(each * images, 6)

    def submit(
        self, request: ImageRequest, idempotency_key: str, webhook_url: str | None = None
    ) -> SubmitOutcome:
        raise PermanentProviderError(f"{self.name} takes lines in groups, not one by one")

    def poll(self, job_id: str) -> PollOutcome:
        raise PermanentProviderError(f"{self.name} has no jobs of one line to poll")

    def result(self, item: dict[str, Any]) -> RequestResult:
        """One output- or error-file line, classified as the synchronous endpoint's answer
        would be: a 400 (content refused, or a field) fails its line; a 429 or 5xx, and a
        request the batch never ran (expired, cancelled), may get its images later."""
        custom_id = str(item.get("custom_id") or "")
        request_id = item.get("id") if isinstance(item.get("id"), str) else None
        response = item.get("response")
        error = item.get("error")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            status, body = response["status_code"], response.get("body")
            if status == 200 and isinstance(body, dict):
                return RequestResult(custom_id, request_id, body, None)
            return RequestResult(custom_id, request_id, None, self._refusal(status, body))
        code = str(error.get("code") or "") if isinstance(error, dict) else ""
        message = str(error.get("message") or "") if isinstance(error, dict) else ""
        reason = UNFINISHED.get(code) or f"the OpenAI batch did not run this request ({code})"
        failure = TransientProviderError(
            f"{self.name}: {reason}" + (f": {message}" if message else ""),
            type=code or "batch_error",
        )
        return RequestResult(custom_id, request_id, None, failure)

    def _refusal(self, status: int, body: Any) -> ProviderError:
        """The error the synchronous endpoint would raise for this answer (``http.check``)."""
        try:
            check(httpx.Response(status, json=body if body is not None else {}), self.name)
        except BatchStop as exc:  # one request's 401/402: that request, not every later one
            return PermanentProviderError(exc.message, type=exc.type, status=status)
        except ProviderError as exc:
            return exc
        return TransientProviderError(
            f"{self.name} answered {status} without images", type="malformed_response"
        )

    def close(self) -> None:
        self.api.close()
