"""One request of an OpenAI batch: its fate, decided when the batch is created, and its result.

A body is refused exactly as the synchronous endpoint would refuse it, and a success carries
the body a synchronous call would answer (``openai_style``), so the two surfaces cannot drift.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from typing import Any

from jobs.simulator import prices
from jobs.simulator.batch_timeline import UNFINISHED, Batch, BatchRequest, InputLine
from jobs.simulator.config import BatchConfig
from jobs.simulator.core import ErrorKind, error_response
from jobs.simulator.dialects import DIALECTS, openai_response
from jobs.simulator.images import parse_size, render
from jobs.simulator.openai_style import MODERATION
from jobs.simulator.state import Job, Marker, State
from jobs.simulator.validation import validate

PROVIDER = "openai"
SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
IMAGES = next(d for d in DIALECTS if d.provider == PROVIDER)
"""The synchronous ``/v1/images/generations`` dialect every batch request is judged by."""


def envelope(
    kind: ErrorKind, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body, as a failed request's ``response.body`` carries it."""
    payload: dict[str, Any] = json.loads(
        error_response(PROVIDER, kind, message, code=code, param=param).body
    )
    return payload


def images(body: dict[str, Any]) -> int:
    """Images a body asks for (1 when ``n`` is unusable: the request fails anyway)."""
    n = body.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10 else 1


def draw(state: State, probability: float) -> bool:
    """A fault draw from the simulator's seeded RNG; no draw at all when it cannot happen."""
    with state.lock:
        return probability > 0 and state.rng.random() < probability


def decide(line: InputLine, state: State, config: BatchConfig) -> BatchRequest:
    """The request's outcome and cost; ``end`` holds its duration until it is scheduled."""
    body = line.body
    request = BatchRequest(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=line.custom_id,
        request_id=f"req_{uuid.uuid4().hex}",
        body=body,
        n=images(body),
        start=0.0,
        end=0.0,
    )
    problems = validate(IMAGES.schema, body) or IMAGES.cross_check(body)
    if problems:  # refused at once, as the endpoint would
        first = problems[0]
        request.status_code = 400
        request.error_body = envelope("invalid", first.message, first.code, first.field)
        return request
    params = IMAGES.parse(body)
    if Marker.POLICY in params.prompt:
        request.status_code, request.error_body = 400, envelope("policy", MODERATION)
    elif state.first_failure(prices.BATCH, params.prompt) or draw(state, config.error_5xx):
        request.status_code, request.error_body = 500, envelope("upstream", SERVER_ERROR)
    else:
        width, height = parse_size(params.size)
        size = f"{width}x{height}"
        request.cost = prices.charge(prices.BATCH, body["model"], params.quality, size, params.n)
    if Marker.NEVER_FINISH in params.prompt:
        request.end = math.inf
    else:
        request.end = state.duration(params.prompt, config.request_latency_s, 0.0)
    return request


def success_line(batch: Batch, request: BatchRequest) -> dict[str, Any]:
    """An output-file line, its images drawn now (they are never kept)."""
    params = IMAGES.parse(request.body)
    width, height = parse_size(params.size)
    job = Job(
        id=request.id,
        provider=prices.BATCH,
        model=request.body["model"],
        prompt=params.prompt,
        api_key=batch.api_key,
        width=width,
        height=height,
        fmt=params.fmt,
        n=params.n,
        cost=request.cost,
        base_url="",
        created=request.start,
        created_wall=batch.wall(request.end),
        duration=request.end - request.start,
        transparent=params.transparent,
        corrupt=Marker.CORRUPT in params.prompt,
        tiny=batch.tiny,
    )
    drawn = [base64.b64encode(render(job, k)).decode() for k in range(1, job.n + 1)]
    body = openai_response(params, job, drawn)
    response = {"status_code": 200, "request_id": request.request_id, "body": body}
    return {"id": request.id, "custom_id": request.custom_id, "response": response, "error": None}


def failure_line(batch: Batch, request: BatchRequest, now: float) -> dict[str, Any]:
    """An error-file line: the endpoint's error answer, or why the request never ran."""
    line: dict[str, Any] = {"id": request.id, "custom_id": request.custom_id}
    if batch.finished(request, now):
        response = {
            "status_code": request.status_code,
            "request_id": request.request_id,
            "body": request.error_body,
        }
        return line | {"response": response, "error": None}
    code, message = UNFINISHED[batch.status(now)]
    return line | {"response": None, "error": {"code": code, "message": message}}
