"""The four synchronous image APIs (OpenAI, AI/ML API, Omixa, Oxen), served by one flow.

They share it (validate, moderate, hold credits, block for the latency, answer) and differ
only in schema, defaults and response shape, which each ``Dialect`` of ``dialects`` spells out.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from jobs.simulator.core import (
    GARBLED_JSON,
    Handler,
    Request,
    Response,
    error_response,
    json_response,
)
from jobs.simulator.dialects import Dialect, Params
from jobs.simulator.images import ImageCache, parse_size
from jobs.simulator.state import (
    POLICY_ERROR,
    TRANSIENT_ERROR,
    Job,
    Marker,
    State,
    price,
)
from jobs.simulator.validation import (
    Problem,
    validate,
)

NEVER_FINISH_WAIT_S = 3600.0
_MODELS_PATH = "/api/ai/models/"
_LIST_PATH = "/v1/models"
MODERATION = (
    "Your request was rejected by the safety system. If you believe this is an error,"
    " contact support and include the request ID."
)
NO_CREDITS = {
    "openai": "You exceeded your current quota, please check your plan and billing details.",
    "aimlapi": "Insufficient credits. Top up your balance to continue.",
    "omixa": "Insufficient wallet balance.",
    "oxen": "Insufficient credits",
}


def _invalid_message(provider: str, problem: Problem, body: Any) -> str:
    if provider == "oxen" and problem.field == "prompt":
        return "Prompt cannot be empty"
    if provider == "oxen" and problem.field == "model" and problem.kind == "invalid":
        return f"Model '{body.get('model')}' not found"
    return problem.message


class SyncSurface:
    """One synchronous provider under ``/{provider}``, with ``Authorization: Bearer`` auth."""

    def __init__(self, dialect: Dialect, state: State, cache: ImageCache) -> None:
        self.dialect = dialect
        self.provider = dialect.provider
        self.state = state
        self.cache = cache

    def route(self, method: str, path: str) -> tuple[str, Handler] | None:
        if method == "POST" and path == self.dialect.path:
            return f"POST /{self.provider}{path}", self.generate
        if method == "GET" and self.dialect.models and path.startswith(_MODELS_PATH):
            return f"GET /{self.provider}{_MODELS_PATH}{{id}}", self.model
        if method == "GET" and self.dialect.listed and path == _LIST_PATH:
            return f"GET /{self.provider}{_LIST_PATH}", self.model_list
        return None

    def authenticate(self, req: Request) -> Response | None:
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            msg = "Missing API key: send it as 'Authorization: Bearer <key>'."
            return error_response(self.provider, "auth", msg)
        if token.startswith("invalid"):
            return error_response(self.provider, "auth", "Incorrect API key provided.")
        return None

    def model_list(self, req: Request) -> Response:
        """OpenAI's ``GET /v1/models``: the models this surface draws with."""
        data = [
            {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
            for name in self.dialect.listed
        ]
        return json_response(200, {"object": "list", "data": data})

    def model(self, req: Request) -> Response:
        """The model object with its request schema; Oxen's 404 for an unknown id."""
        model_id = req.path.removeprefix(f"/{self.provider}{_MODELS_PATH}")
        found = self.dialect.models.get(model_id)
        if found is None:
            return error_response(self.provider, "not_found", f"Model '{model_id}' not found")
        return json_response(200, found)

    def generate(self, req: Request) -> Response:
        provider, state = self.provider, self.state
        try:
            body = req.json()
        except ValueError:
            return error_response(provider, "invalid", "The request body is not valid JSON.")
        problems = validate(self.dialect.schema, body) or self.dialect.cross_check(body)
        if problems:
            first = problems[0]
            message = _invalid_message(provider, first, body)
            return error_response(provider, "invalid", message, code=first.code, param=first.field)
        params = self.dialect.parse(body)
        if state.fault("invalid_json"):
            return Response(200, GARBLED_JSON)
        config = state.config.for_provider(provider)
        latency = state.duration(params.prompt, config.sync_latency_s, config.sync_latency_jitter_s)
        if Marker.POLICY in params.prompt or state.fault("job_failed_policy"):
            message = POLICY_ERROR if provider == "oxen" else MODERATION
            return error_response(provider, "policy", message)
        if state.first_failure(provider, params.prompt) or state.fault("job_failed_transient"):
            time.sleep(latency)
            return error_response(provider, "upstream", TRANSIENT_ERROR)
        if Marker.NEVER_FINISH in params.prompt:
            state.stopping.wait(NEVER_FINISH_WAIT_S)
            return error_response(provider, "timeout", "Upstream request timed out")
        job = self._accept(req, body, params, latency)
        if isinstance(job, Response):
            return job
        time.sleep(latency)
        if state.fault("drop_after_accept"):
            job.dropped = True
            return Response(200, drop=True)
        images = (
            [base64.b64encode(self.cache.image(job, k)).decode() for k in range(1, job.n + 1)]
            if params.inline
            else job.image_urls()
        )
        return json_response(200, self.dialect.respond(params, job, images))

    def _accept(
        self, req: Request, body: dict[str, Any], params: Params, latency: float
    ) -> Job | Response:
        """Check the in-flight cap and the balance, then hold the charge and record the job."""
        provider, state = self.provider, self.state
        now = time.monotonic()
        with state.lock:
            limit = state.config.for_provider(provider).max_in_flight
            count, wait = state.in_flight(provider, now)
            if limit is not None and count >= limit:
                state.count_429(provider, "concurrency")
                msg = f"Too many concurrent requests (limit {limit})"
                return error_response(provider, "rate_limit", msg, retry_after=wait)
            width, height = parse_size(params.size)
            cost = price(provider, body["model"], params.quality, f"{width}x{height}", params.n)
            if state.shortfall(provider, cost, params.n) is not None:
                return error_response(provider, "credits", NO_CREDITS[provider])
            job = Job(
                id=str(uuid.uuid4()),
                provider=provider,
                model=body["model"],
                prompt=params.prompt,
                api_key=req.headers.get("authorization", "").partition(" ")[2],
                width=width,
                height=height,
                fmt=params.fmt,
                n=params.n,
                cost=cost,
                base_url=req.base_url,
                created=now,
                created_wall=time.time(),
                duration=latency,
                transparent=params.transparent,
                corrupt=Marker.CORRUPT in params.prompt,
                input=body,
                tiny=state.config.image_mode == "tiny",
            )
            state.add(job)
        return job
