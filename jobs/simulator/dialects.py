"""What each synchronous image API (OpenAI, AI/ML API, Omixa, Oxen) accepts and how it answers,
as data: one ``Dialect`` each (its path, request schema, defaults, cross-field checks and
response shape). ``openai_style.SyncSurface`` serves them all with one flow; the Batch API
(``batch_requests``) checks and answers its requests with OpenAI's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.simulator import oxen_models
from jobs.simulator.core import number
from jobs.simulator.state import Job
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
)

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
