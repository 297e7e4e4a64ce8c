"""OpenAI's Batch API under ``/openai`` (``docs/providers.md``, "OpenAI's Batch API"): half-price
image batches; the files it reads and writes are ``openai_files``'.

Upload a JSONL file, create a batch from it, poll it, read its output and error files. A batch
moves ``validating → in_progress → finalizing → completed`` by the clock (``batch_timeline``),
can fail validation, expire or be cancelled, and bills each request that succeeds once, at
half the synchronous price, when it finishes: the ledger proves no request was bought twice.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from jobs.simulator import prices
from jobs.simulator.batch_requests import decide, draw, images
from jobs.simulator.batch_timeline import (
    CANCELLABLE,
    TERMINAL,
    Batch,
    InputLine,
    check_input,
    schedule,
)
from jobs.simulator.config import BatchConfig
from jobs.simulator.core import (
    Handler,
    Request,
    Response,
    Surface,
    error_response,
    json_response,
    number,
)
from jobs.simulator.openai_files import PROVIDER, Files, StoredFile, api_key, invalid, no_such
from jobs.simulator.state import State
from jobs.simulator.validation import Check, Problem, integer, obj, one_of, text, validate

RUNS = "/v1/images/generations"
"""The one endpoint the simulator's batches run (OpenAI's also lists edits, chat and more)."""
ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)


def _metadata(path: str, value: Any) -> list[Problem]:
    """Up to 16 string pairs; keys up to 64 characters, values up to 512."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [Problem(path, "must be an object of strings")]
    if len(value) > 16:
        return [Problem(path, "must have at most 16 keys")]
    for key, item in value.items():
        if len(key) > 64:
            return [Problem(f"{path}.{key}", "keys must be at most 64 characters")]
        if not isinstance(item, str) or len(item) > 512:
            return [Problem(f"{path}.{key}", "must be a string of at most 512 characters")]
    return []


_CREATE: Check = obj(
    {
        "input_file_id": text(1),
        "endpoint": one_of(*ENDPOINTS),
        "completion_window": one_of("24h"),
        "metadata": _metadata,
        "output_expires_after": obj(
            {"anchor": one_of("created_at"), "seconds": integer(3600, 2_592_000)},
            required=("anchor", "seconds"),
        ),
    },
    required=("input_file_id", "endpoint", "completion_window"),
)


class Batches(Files):
    """``/v1/files`` and ``/v1/batches`` of one simulated OpenAI account per API key."""

    provider = PROVIDER

    def __init__(self, state: State) -> None:
        self.state = state
        self.reset()

    def reset(self) -> None:
        with self.state.lock:
            self.files: dict[str, StoredFile] = {}
            self.batches: dict[str, Batch] = {}
            self.results: dict[str, tuple[str, str]] = {}
            """Output and error file id → (batch id, ``output`` or ``error``)."""
            self.creates = 0
            """``POST /v1/batches`` answered so far (``BatchConfig.create_drops``)."""

    def route(self, method: str, path: str) -> tuple[str, Handler] | None:
        parts = path.strip("/").split("/")
        label = f"{method} /{PROVIDER}{path}"
        match method, parts:
            case "POST", ["v1", "files"]:
                return label, self.upload
            case "GET", ["v1", "files", file_id]:
                return f"GET /{PROVIDER}/v1/files/{{id}}", lambda r: self.file(r, file_id)
            case "GET", ["v1", "files", file_id, "content"]:
                label = f"GET /{PROVIDER}/v1/files/{{id}}/content"
                return label, lambda r: self.content(r, file_id)
            case "POST", ["v1", "batches"]:
                return label, self.create
            case "GET", ["v1", "batches"]:
                return label, self.list_batches
            case "GET", ["v1", "batches", batch_id]:
                return f"GET /{PROVIDER}/v1/batches/{{id}}", lambda r: self.get(r, batch_id)
            case "POST", ["v1", "batches", batch_id, "cancel"]:
                label = f"POST /{PROVIDER}/v1/batches/{{id}}/cancel"
                return label, lambda r: self.cancel(r, batch_id)
        return None

    # -- batches ----------------------------------------------------------------------------

    def create(self, req: Request) -> Response:
        try:
            body = req.json()
        except ValueError:
            return invalid("The request body is not valid JSON.")
        problems = validate(_CREATE, body)
        if problems:
            first = problems[0]
            return invalid(first.message, first.field, first.code)
        if body["endpoint"] != RUNS:
            return invalid(f"The simulator runs batches of {RUNS} only.", "endpoint")
        key, now = api_key(req), time.monotonic()
        with self.state.lock:
            source = self.files.get(body["input_file_id"])
        if source is None or source.api_key != key:
            message = f"No such File object: {body['input_file_id']}"
            return error_response(PROVIDER, "not_found", message, param="input_file_id")
        if source.data is None:
            message = "The input file must be uploaded with purpose 'batch'."
            return invalid(message, "input_file_id")
        lines, errors = check_input(source.data, RUNS)
        with self.state.lock:
            batch = self._new_batch(key, body, errors, now)
            if not errors:
                self._run(batch, lines)
            self.batches[batch.id] = batch
            self.results[batch.output_file_id] = (batch.id, "output")
            self.results[batch.error_file_id] = (batch.id, "error")
        if self._dropped() or draw(self.state, self.state.config.batch.create_drop):
            return Response(200, drop=True)
        return json_response(200, self.view(batch, now))

    def _dropped(self) -> bool:
        """Whether this create is one of the first ``create_drops``, whose answer is lost."""
        with self.state.lock:
            self.creates += 1
            return self.creates <= self.state.config.batch.create_drops

    def _new_batch(
        self, key: str, body: dict[str, Any], errors: list[dict[str, Any]], now: float
    ) -> Batch:
        config: BatchConfig = self.state.config.batch
        return Batch(
            id=f"batch_{uuid.uuid4().hex}",
            api_key=key,
            endpoint=body["endpoint"],
            input_file_id=body["input_file_id"],
            metadata=body.get("metadata"),
            model=None,
            created=now,
            created_wall=time.time(),
            validating_s=config.validating_s,
            finalizing_s=config.finalizing_s,
            cancelling_s=config.cancelling_s,
            window_s=config.window_s,
            output_file_id=f"file-{uuid.uuid4().hex[:24]}",
            error_file_id=f"file-{uuid.uuid4().hex[:24]}",
            tiny=self.state.config.image_mode == "tiny",
            errors=errors,
        )

    def _run(self, batch: Batch, lines: list[InputLine]) -> None:
        """Decide each request's outcome and its place in time (call with the lock held)."""
        config: BatchConfig = self.state.config.batch
        models = (line.body.get("model") for line in lines)
        batch.model = next((m for m in models if isinstance(m, str)), None)
        limit = config.enqueued_limit
        wanted = sum(images(line.body) for line in lines)
        mine = (b for b in self.batches.values() if b.api_key == batch.api_key)
        queued = sum(b.unfinished_images(batch.created) for b in mine)
        if limit is not None and queued + wanted > limit:
            message = (
                f"Enqueued token limit reached for {batch.model} in organization org-simulator."
                f" Limit: {limit:,} enqueued images. Please try again once some in_progress"
                " batches have been completed."
            )
            error = {"code": "token_limit_exceeded", "message": message}
            batch.errors = [error | {"param": None, "line": None}]
            return
        requests = [decide(line, self.state, config) for line in lines]
        order = list(range(len(requests)))
        self.state.rng.shuffle(order)
        if len(order) > 1 and order == sorted(order):
            order[0], order[1] = order[1], order[0]  # results never come back in input order
        durations = [r.end for r in requests]
        times = schedule(durations, order, batch.validated, config.concurrency)
        for request, (start, end) in zip(requests, times, strict=True):
            request.start, request.end = start, end
        rank = {index: position for position, index in enumerate(order)}
        finishing = sorted(range(len(requests)), key=lambda i: (requests[i].end, rank[i]))
        batch.requests = [requests[i] for i in finishing]

    def _own_batch(self, req: Request, batch_id: str) -> Batch | None:
        with self.state.lock:
            batch = self.batches.get(batch_id)
        return batch if batch is not None and batch.api_key == api_key(req) else None

    def get(self, req: Request, batch_id: str) -> Response:
        batch = self._own_batch(req, batch_id)
        if batch is None:
            return no_such("Batch", batch_id)
        self.settle()
        return json_response(200, self.view(batch, time.monotonic()))

    def list_batches(self, req: Request) -> Response:
        """Newest first; ``after`` is the last id of the previous page."""
        limit, after = req.query.get("limit", "20"), req.query.get("after")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            return invalid("limit must be an integer between 1 and 100.", "limit")
        self.settle()
        now, key = time.monotonic(), api_key(req)
        with self.state.lock:
            mine = [b for b in reversed(self.batches.values()) if b.api_key == key]
        ids = [b.id for b in mine]
        start = ids.index(after) + 1 if after in ids else len(ids) if after else 0
        page = mine[start : start + int(limit)]
        return json_response(
            200,
            {
                "object": "list",
                "data": [self.view(b, now) for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": start + len(page) < len(mine),
            },
        )

    def cancel(self, req: Request, batch_id: str) -> Response:
        batch = self._own_batch(req, batch_id)
        if batch is None:
            return no_such("Batch", batch_id)
        now = time.monotonic()
        with self.state.lock:
            status = batch.status(now)
            if status in CANCELLABLE:
                batch.cancel_at = now
            elif status != "cancelling":
                message = f"Cannot cancel a batch with status '{status}'."
                return error_response(PROVIDER, "conflict", message)
        return json_response(200, self.view(batch, now))

    def view(self, batch: Batch, now: float) -> dict[str, Any]:
        """The Batch object as of ``now``."""
        with self.state.lock:
            status = batch.status(now)
            ok, failed = batch.results(now)
            counts = batch.counts(now)
            stamps = batch.timestamps(now)
        errors = {"object": "list", "data": batch.errors} if status == "failed" else None
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": errors,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": batch.output_file_id if ok else None,
            "error_file_id": batch.error_file_id if failed else None,
            **stamps,
            "request_counts": counts,
            "metadata": batch.metadata,
            "model": batch.model,
        }

    # -- billing and the ledger -------------------------------------------------------------

    def settle(self, now: float | None = None) -> None:
        """Bill every request that has succeeded since the last look, exactly once."""
        now = time.monotonic() if now is None else now
        with self.state.lock:
            for batch in self.batches.values():
                if batch.settled:
                    continue
                for request in batch.requests:
                    if request.ok and not request.billed and batch.finished(request, now):
                        request.billed = True
                        self.state.charged[prices.BATCH] += request.cost
                batch.settled = batch.status(now) in TERMINAL

    def ledger(self) -> dict[str, Any]:
        """``openai_batches`` and ``openai_batch_requests`` for ``GET /_sim/ledger``, billed up
        to the same moment their statuses describe."""
        now = time.monotonic()
        with self.state.lock:
            self.settle(now)
            batches = list(self.batches.values())
            return {
                "openai_batches": [
                    {
                        "id": b.id,
                        "status": b.status(now),
                        "metadata": b.metadata,
                        "request_counts": b.counts(now),
                        "created": b.wall(b.created),
                    }
                    for b in batches
                ],
                "openai_batch_requests": [
                    {
                        "custom_id": r.custom_id,
                        "batch": b.id,
                        "status": b.request_status(r, now),
                        "billed": number(round(r.cost, 6)) if r.billed else 0,
                    }
                    for b in batches
                    for r in b.requests
                ],
            }


class Combined:
    """The ``/openai`` prefix: the Images API, and beside it the Files and Batch APIs."""

    def __init__(self, images: Surface, batches: Batches) -> None:
        self.provider = images.provider
        self.images = images
        self.batches = batches
        self.generate: Handler = images.generate
        """The paid submit is the Images API's own (the server knows it by identity)."""

    def route(self, method: str, path: str) -> tuple[str, Handler] | None:
        return self.images.route(method, path) or self.batches.route(method, path)

    def authenticate(self, req: Request) -> Response | None:
        return self.images.authenticate(req)
