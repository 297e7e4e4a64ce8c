"""The four synchronous image APIs (OpenAI, AI/ML API, Omixa, Oxen) as data-driven dialects.

They share one flow (validate, moderate, hold credits, block for the latency, answer) and
differ only in schema, defaults and response shape, which each ``Dialect`` spells out.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.simulator import oxen_models
from jobs.simulator.core import (
    GARBLED_JSON,
    Handler,
    Request,
    Response,
    error_response,
    json_response,
    number,
)
from jobs.simulator.images import ImageCache, parse_size
from jobs.simulator.state import (
    CORRUPT,
    NEVER_FINISH,
    POLICY,
    POLICY_ERROR,
    TRANSIENT_ERROR,
    Job,
    State,
    price,
)
from jobs.simulator.validation import (
    Check,
    Problem,
    any_of,
    boolean,
    integer,
    list_of,
    number_in,
    obj,
    one_of,
    rejected,
    text,
    url,
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
_SIZES = ("1024x1024", "1536x1024", "1024x1536")
OPENAI_MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
FREE_SIZE_MODELS = ("gpt-image-2", "gpt-image-2-2026-04-21")
"""Models that take any ``WIDTHxHEIGHT`` within ``_free_size_problem``'s rules (OpenAPI 2026-08)."""
_FREE_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
_OXEN_SIZES = {
    "auto": "1024x1024",
    "square": "1024x1024",
    "portrait": "1024x1536",
    "landscape": "1536x1024",
}
_BACKGROUND = one_of("transparent", "opaque", "auto")
_FORMAT = one_of("png", "jpeg", "webp")
_MODERATION = one_of("auto", "low")
_COMPRESSION = integer(0, 100)
_IMAGE_PART = obj(
    {"type": one_of("image_url"), "image_url": obj({"url": url}, required=("url",))},
    required=("type", "image_url"),
)


@dataclass(frozen=True)
class Params:
    """A synchronous request after validation, in provider-neutral terms."""

    prompt: str
    n: int
    size: str
    fmt: str
    quality: str | None
    transparent: bool
    inline: bool
    """True: images go back as base64 in the body; False: as CDN URLs."""

    @classmethod
    def of(cls, body: dict[str, Any], *, size: str, inline: bool) -> Params:
        """All four dialects default to PNG and share these field names."""
        return cls(
            prompt=body["prompt"],
            n=int(body.get("n", 1)),
            size=size,
            fmt=body.get("output_format", "png"),
            quality=body.get("quality"),
            transparent=body.get("background") == "transparent",
            inline=inline,
        )


Respond = Callable[[Params, Job, list[str]], dict[str, Any]]


@dataclass(frozen=True)
class Dialect:
    """What one synchronous provider accepts and how it answers."""

    provider: str
    path: str
    schema: Check
    parse: Callable[[dict[str, Any]], Params]
    respond: Respond
    cross_check: Callable[[dict[str, Any]], list[Problem]] = lambda body: []
    models: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """Model objects served at ``GET /api/ai/models/{id}`` (Oxen only)."""
    listed: tuple[str, ...] = ()
    """Model ids listed at ``GET /v1/models`` (OpenAI's free call: a client checks its key
    with it; the same auth as every other route, and never billed)."""


def _free_size_problem(size: str) -> str | None:
    """gpt-image-2: both sides multiples of 16, between 1:3 and 3:1, at most 3840x2160."""
    match = _FREE_SIZE.fullmatch(size)
    if match is None:
        return f"must be auto, one of {', '.join(_SIZES)}, or WIDTHxHEIGHT"
    width, height = int(match[1]), int(match[2])
    long, short = max(width, height), min(width, height)
    if width % 16 or height % 16:
        return "both sides must be multiples of 16"
    if long > 3 * short:
        return "the aspect ratio must be between 1:3 and 3:1"
    if long > 3840 or short > 2160:
        return "must be at most 3840x2160 or 2160x3840"
    return None


def _openai_checks(body: dict[str, Any]) -> list[Problem]:
    problems = []
    size = body.get("size", "auto")
    if size != "auto" and size not in _SIZES:
        reason = (
            _free_size_problem(size)
            if body["model"] in FREE_SIZE_MODELS
            else f"must be one of auto, {', '.join(_SIZES)} for {body['model']}"
        )
        if reason is not None:
            problems.append(Problem("size", reason))
    if body.get("background") == "transparent" and body.get("output_format") == "jpeg":
        problems.append(Problem("background", "transparent requires png or webp output_format"))
    if body.get("stream"):
        problems.append(Problem("stream", "streaming is not supported by the simulator"))
    return problems


def openai_response(params: Params, job: Job, images: list[str]) -> dict[str, Any]:
    """The 200 body of ``/v1/images/generations``; also a Batch API output line's ``body``."""
    quality = params.quality if params.quality not in (None, "auto") else "high"
    square = {"low": 272, "medium": 1056, "high": 4160}[quality or "high"]
    output = square if job.width == job.height else square * 3 // 2
    prompt_tokens = max(1, len(params.prompt) // 4)
    return {
        "created": int(job.created_wall),
        "background": "transparent" if params.transparent else "opaque",
        "output_format": params.fmt,
        "quality": quality,
        "size": f"{job.width}x{job.height}",
        "data": [{"b64_json": image} for image in images],
        "usage": {
            "input_tokens": prompt_tokens,
            "output_tokens": output * params.n,
            "total_tokens": prompt_tokens + output * params.n,
            "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
        },
    }


def _image_items(params: Params, images: list[str]) -> list[dict[str, Any]]:
    return [{"b64_json" if params.inline else "url": image} for image in images]


DIALECTS = (
    Dialect(
        provider="openai",
        path="/v1/images/generations",
        listed=(*OPENAI_MODELS, *FREE_SIZE_MODELS),
        schema=obj(
            {
                "model": one_of(*OPENAI_MODELS, *FREE_SIZE_MODELS),
                "prompt": text(1, 32000),
                "n": integer(1, 10),
                "size": text(1),
                "quality": one_of("auto", "low", "medium", "high"),
                "background": _BACKGROUND,
                "output_format": _FORMAT,
                "output_compression": _COMPRESSION,
                "moderation": _MODERATION,
                "user": text(),
                "stream": boolean,
                "partial_images": integer(0, 3),
                "response_format": rejected("is only supported for dall-e models"),
            },
            required=("model", "prompt"),
        ),
        parse=lambda b: Params.of(b, size=b.get("size", "auto"), inline=True),
        respond=openai_response,
        cross_check=_openai_checks,
    ),
    Dialect(
        provider="aimlapi",
        path="/v1/images/generations",
        schema=obj(
            {
                "model": one_of("openai/gpt-image-1-5"),
                "prompt": text(0, 32000),
                "background": _BACKGROUND,
                "moderation": _MODERATION,
                "n": number_in(1),
                "output_compression": _COMPRESSION,
                "output_format": _FORMAT,
                "quality": one_of("low", "high", "medium"),
                "size": one_of(*_SIZES),
                "response_format": one_of("url", "b64_json"),
            },
            required=("model", "prompt"),
        ),
        parse=lambda b: Params.of(
            b,
            size=b.get("size", "1024x1024"),
            inline=b.get("response_format") == "b64_json",
        ),
        respond=lambda params, job, images: {
            "id": job.id,
            "object": "image",
            "created": int(job.created_wall),
            "model": job.model,
            "data": _image_items(params, images),
            "meta": {"usage": {"credits_used": number(job.cost)}},
        },
    ),
    Dialect(
        provider="omixa",
        path="/api/v1/images/generations",
        schema=obj(
            {
                "model": one_of("gpt-image-1.5"),
                "prompt": text(1),
                "n": integer(1, 10),
                "output_format": _FORMAT,
                "size": one_of("auto", *_SIZES),
                "quality": one_of("auto", "low", "medium", "high"),
                "background": _BACKGROUND,
                "moderation": _MODERATION,
                "input_images": list_of(_IMAGE_PART),
                "input_fidelity": one_of("auto", "low", "high"),
                "mask": any_of(text(1), _IMAGE_PART, reason="must be image data or an image part"),
            },
            required=("model", "prompt"),
        ),
        parse=lambda b: Params.of(b, size=b.get("size", "auto"), inline=True),
        respond=lambda params, job, images: {
            "created": int(job.created_wall),
            "data": [{"b64_json": image, "url": None} for image in images],
            "usage": {"billed_amount": f"{job.cost:.6f}"},
        },
    ),
    Dialect(
        provider="oxen",
        path="/api/ai/images/generate",
        schema=oxen_models.REQUEST_CHECK,
        parse=lambda b: Params.of(
            b,
            size=_OXEN_SIZES[b.get("size", "auto")],
            inline=b.get("response_format") == "b64_json",
        ),
        respond=lambda params, job, images: {
            "model": job.model,
            "created": int(job.created_wall),
            "images": _image_items(params, images),
        },
        models=oxen_models.MODELS,
    ),
)


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
        if POLICY in params.prompt or state.fault("job_failed_policy"):
            message = POLICY_ERROR if provider == "oxen" else MODERATION
            return error_response(provider, "policy", message)
        if state.first_failure(provider, params.prompt) or state.fault("job_failed_transient"):
            time.sleep(latency)
            return error_response(provider, "upstream", TRANSIENT_ERROR)
        if NEVER_FINISH in params.prompt:
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
                corrupt=CORRUPT in params.prompt,
                input=body,
                tiny=state.config.image_mode == "tiny",
            )
            state.add(job)
        return job
