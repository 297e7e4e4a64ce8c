"""The APIFrame v2 surface: async image jobs (submit 202, poll, CDN, webhooks), as docs/providers.md
("APIFrame") describes them.

Idempotent replays, credit holds with refunds on FAILED, and the in-flight cap behave as the
spec describes, because the adapter's at-most-once-paid promise is tested against them.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Any

from jobs.simulator.core import (
    GARBLED_JSON,
    Handler,
    Request,
    Response,
    error_response,
    iso_ms,
    json_response,
    number,
)
from jobs.simulator.images import ASPECT_SIZES
from jobs.simulator.state import (
    IDEMPOTENCY_WINDOW_S,
    POLICY_ERROR,
    TRANSIENT_ERROR,
    Job,
    Marker,
    State,
    Webhook,
    price,
)
from jobs.simulator.validation import (
    Check,
    http_url,
    integer,
    list_of,
    nullable,
    obj,
    one_of,
    text,
    url,
    validate,
)
from jobs.simulator.webhooks import EVENTS, Webhooks

PROVIDER = "apiframe"
STATUSES = ("QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_QUALITY = one_of("auto", "low", "medium", "high")
_ASPECT = one_of("1:1", "3:2", "2:3")
_IMAGES = nullable(list_of(url))
_COUNT = integer(1, 10)
MODELS: dict[str, tuple[str, Check]] = {
    "gpt-image-1.5": (
        "gptImageParams",
        obj(
            {
                "quality": _QUALITY,
                "aspect_ratio": _ASPECT,
                "output_format": one_of("webp", "png", "jpeg"),
                "background": one_of("auto", "transparent", "opaque"),
                "input_images": _IMAGES,
                "input_fidelity": one_of("low", "high"),
                "number_of_images": _COUNT,
            }
        ),
    ),
    "gpt-image-2": (
        "gptImage2Params",
        obj(
            {
                "quality": _QUALITY,
                "aspect_ratio": _ASPECT,
                "output_format": one_of("png", "jpeg", "webp"),
                "background": one_of("auto", "opaque"),
                "input_images": _IMAGES,
                "moderation": one_of("auto", "low"),
                "number_of_images": _COUNT,
            }
        ),
    ),
}
_COMMON: dict[str, Check] = {
    "prompt": text(1, 2000),
    "model": one_of(*MODELS),
    "webhookUrl": http_url,
    "webhookEvents": list_of(one_of(*EVENTS), min_items=1),
}


def _schema(model: Any) -> Check:
    fields = dict(_COMMON)
    if isinstance(model, str) and model in MODELS:
        key, params = MODELS[model]
        fields[key] = params
    return obj(fields, required=("prompt", "model"))


class ApiFrame:
    """``/v2/images/generate``, ``/v2/jobs[/{id}]`` and ``/v2/me`` with ``X-API-Key`` auth."""

    provider = PROVIDER

    def __init__(self, state: State, webhooks: Webhooks) -> None:
        self.state = state
        self.webhooks = webhooks

    def route(self, method: str, path: str) -> tuple[str, Handler] | None:
        routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v2/images/generate"): self.generate,
            ("GET", "/v2/jobs"): self.list_jobs,
            ("GET", "/v2/me"): self.me,
        }
        if (method, path) in routes:
            return f"{method} {path}", routes[method, path]
        if method == "GET" and path.startswith("/v2/jobs/"):
            return "GET /v2/jobs/{id}", self.get_job
        return None

    def authenticate(self, req: Request) -> Response | None:
        key = req.headers.get("x-api-key")
        if not key:
            return error_response(PROVIDER, "auth", "API key is required")
        if not key.startswith("afk_"):
            return error_response(PROVIDER, "auth", "Invalid API key")
        if key.startswith("afk_inactive"):
            return error_response(PROVIDER, "forbidden", "API key is inactive")
        return None

    def generate(self, req: Request) -> Response:
        try:
            body = req.json()
        except ValueError:
            return error_response(PROVIDER, "invalid", "Request body must be valid JSON")
        problems = validate(_schema(body.get("model") if isinstance(body, dict) else None), body)
        if problems:
            details = {p.field: [p.message] for p in problems}
            return error_response(
                PROVIDER, "invalid", problems[0].message, extra={"details": details}
            )
        idem_key = req.headers.get("idempotency-key")
        if idem_key is not None and not 1 <= len(idem_key) <= 255:
            return error_response(PROVIDER, "invalid", "Idempotency-Key must be 1-255 characters")
        if self.state.fault("invalid_json"):
            return Response(202, GARBLED_JSON)
        api_key = req.headers["x-api-key"]
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        params: dict[str, Any] = body.get(MODELS[body["model"]][0]) or {}
        now = time.monotonic()
        with self.state.lock:
            seen = self.state.idempotency.get((api_key, idem_key)) if idem_key else None
            if seen and now - seen[2] < IDEMPOTENCY_WINDOW_S:
                if seen[0] != digest:
                    msg = "Idempotency key reused with a different request body"
                    return error_response(PROVIDER, "conflict", msg)
                self.state.replays += 1
                job = self.state.jobs[seen[1]]
                return json_response(202, {"jobId": job.id, "status": job.status(now)})
            limit = self.state.config.for_provider(PROVIDER).max_in_flight
            count, wait = self.state.in_flight(PROVIDER, now)
            if limit is not None and count >= limit:
                self.state.count_429(PROVIDER, "concurrency")
                msg = f"Too many concurrent jobs (limit {limit})"
                return error_response(PROVIDER, "rate_limit", msg, retry_after=wait)
            width, height = ASPECT_SIZES[params.get("aspect_ratio", "1:1")]
            n = params.get("number_of_images", 1)
            cost = price(PROVIDER, body["model"], params.get("quality"), f"{width}x{height}", n)
            available = self.state.shortfall(PROVIDER, cost, n)
            if available is not None:
                extra = {"creditsRequired": number(cost), "creditsAvailable": number(available)}
                return error_response(PROVIDER, "credits", "Insufficient credits", extra=extra)
            job = self._new_job(req, body, params, cost, idem_key, now)
            self.state.add(job)
            if idem_key:
                self.state.idempotency[api_key, idem_key] = (digest, job.id, now)
        self.webhooks.schedule(job)
        if self.state.fault("drop_after_accept"):
            job.dropped = True
            return Response(202, drop=True)
        return json_response(202, {"jobId": job.id, "status": "QUEUED"})

    def _new_job(
        self,
        req: Request,
        body: dict[str, Any],
        params: dict[str, Any],
        cost: float,
        idem_key: str | None,
        now: float,
    ) -> Job:
        prompt: str = body["prompt"]
        failure = None
        if Marker.POLICY in prompt:
            failure = POLICY_ERROR
        elif self.state.first_failure(PROVIDER, prompt):
            failure = TRANSIENT_ERROR
        elif self.state.fault("job_failed_policy"):
            failure = POLICY_ERROR
        elif self.state.fault("job_failed_transient"):
            failure = TRANSIENT_ERROR
        config = self.state.config.for_provider(PROVIDER)
        width, height = ASPECT_SIZES[params.get("aspect_ratio", "1:1")]
        hook = None
        if "webhookUrl" in body:
            hook = Webhook(body["webhookUrl"], tuple(body.get("webhookEvents") or EVENTS))
        return Job(
            id=str(uuid.uuid4()),
            provider=PROVIDER,
            model=body["model"],
            prompt=prompt,
            api_key=req.headers["x-api-key"],
            width=width,
            height=height,
            fmt=params.get("output_format", "webp"),
            n=params.get("number_of_images", 1),
            cost=cost,
            base_url=req.base_url,
            created=now,
            created_wall=time.time(),
            duration=self.state.duration(prompt, config.latency_s, config.latency_jitter_s),
            transparent=params.get("background") == "transparent",
            failure=failure,
            never_finish=Marker.NEVER_FINISH in prompt,
            corrupt=Marker.CORRUPT in prompt,
            idempotency_key=idem_key,
            input=body,
            tiny=config.image_mode == "tiny",
            webhook=hook,
        )

    def get_job(self, req: Request) -> Response:
        job_id = req.path.removeprefix("/v2/jobs/")
        if not _UUID.fullmatch(job_id):
            return error_response(PROVIDER, "invalid", "Invalid job id: must be a UUID")
        job = self._own_job(req, job_id.lower())
        if job is None:
            return error_response(PROVIDER, "not_found", "Job not found")
        if self.state.fault("invalid_json"):
            return Response(200, GARBLED_JSON)
        return json_response(200, self.view(job, time.monotonic()))

    def list_jobs(self, req: Request) -> Response:
        status, cursor = req.query.get("status"), req.query.get("cursor")
        limit = req.query.get("limit", "20")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            return error_response(PROVIDER, "invalid", "limit must be an integer 1-100")
        if status is not None and status not in STATUSES:
            return error_response(PROVIDER, "invalid", f"status must be one of {STATUSES}")
        now = time.monotonic()
        with self.state.lock:
            jobs = [j for j in reversed(self.state.jobs.values()) if self._owned(req, j)]
        models = sorted({j.model for j in jobs})
        jobs = [j for j in jobs if status in (None, j.status(now))]
        jobs = [j for j in jobs if req.query.get("model") in (None, j.model)]
        jobs = [j for j in jobs if req.query.get("search") in (None, j.id)]
        start = next((i + 1 for i, j in enumerate(jobs) if j.id == cursor), 0) if cursor else 0
        page = jobs[start : start + int(limit)]
        more = start + len(page) < len(jobs)
        return json_response(
            200,
            {
                "jobs": [self.view(j, now) for j in page],
                "nextCursor": page[-1].id if more else None,
                "hasMore": more,
                "models": models,
            },
        )

    def me(self, req: Request) -> Response:
        key = req.headers["x-api-key"]
        remaining = self.state.remaining(PROVIDER)
        return json_response(
            200,
            {
                "user": {"id": "usr_simulator", "email": "simulator@localhost", "role": "USER"},
                "team": {
                    "id": "team_simulator",
                    "name": "Simulator",
                    "credits": None if remaining is None else number(remaining),
                    "plan": "simulator",
                    "customerId": None,
                },
                "apiKey": {"id": "key_simulator", "name": "simulator", "prefix": key[:8]},
            },
        )

    def view(self, job: Job, now: float) -> dict[str, Any]:
        """The ``Job`` object of the spec, as of ``now``."""
        status = job.status(now)
        result = job.result(self.state.config.result_shape) if status == "COMPLETED" else None
        done = status in ("COMPLETED", "FAILED")
        return {
            "id": job.id,
            "status": status,
            "model": job.model,
            "progress": job.progress(now),
            "result": result,
            "error": job.failure if status == "FAILED" else None,
            "creditCost": number(job.credit_cost(now)),
            "webhookStatus": job.webhook.status if job.webhook else None,
            "createdAt": iso_ms(job.created_ms),
            "completedAt": iso_ms(job.completed_ms) if done else None,
            "expired": job.expired(now, self.state.config.cdn_ttl_s),
            "input": job.input,
        }

    def _own_job(self, req: Request, job_id: str) -> Job | None:
        with self.state.lock:
            job = self.state.jobs.get(job_id)
        return job if job is not None and self._owned(req, job) else None

    def _owned(self, req: Request, job: Job) -> bool:
        return job.provider == PROVIDER and job.api_key == req.headers.get("x-api-key")
