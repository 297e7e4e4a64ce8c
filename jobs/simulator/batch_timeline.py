"""One OpenAI batch as a pure function of time: its status, counts, timestamps and results.

Each request's start, end and outcome are fixed when the batch is created, and a cancel only
records its moment, so a poll needs no background thread: it reads the clock (as APIFrame jobs
do). Also here: the whole-file checks that fail a batch before any request runs (§2.6).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_REQUESTS = 50_000
MAX_ERRORS = 100
"""Validation errors listed on a failed batch; a garbage file does not make a huge object."""
ACTIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
CANCELLABLE = frozenset({"validating", "in_progress", "finalizing"})
UNFINISHED = {
    "cancelled": (
        "batch_cancelled",
        "This request was not executed because the batch was cancelled.",
    ),
    "expired": (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
}
"""The ``error`` of a request a cancelled or expired batch never ran (its error-file line)."""


@dataclass(frozen=True)
class InputLine:
    """A line of the input file that passed the whole-file checks."""

    line: int
    custom_id: str
    body: dict[str, Any]


@dataclass
class BatchRequest:
    """One request of a batch, with its fate decided at creation."""

    id: str
    custom_id: str
    request_id: str
    body: dict[str, Any]
    n: int
    start: float
    end: float
    """Monotonic seconds; ``inf`` for a request that never finishes."""
    status_code: int = 200
    error_body: dict[str, Any] | None = None
    """The endpoint's error envelope when ``status_code`` is not 200."""
    cost: float = 0.0
    billed: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code == 200


@dataclass
class Batch:
    """A batch and its whole future; ``requests`` are in the order they finish."""

    id: str
    api_key: str
    endpoint: str
    input_file_id: str
    metadata: dict[str, str] | None
    model: str | None
    created: float
    created_wall: float
    validating_s: float
    finalizing_s: float
    cancelling_s: float
    window_s: float
    output_file_id: str
    error_file_id: str
    tiny: bool = False
    requests: list[BatchRequest] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    """Whole-file validation errors: when any, the batch fails and runs nothing."""
    cancel_at: float | None = None
    settled: bool = False
    """Every finished request is billed and no more will finish."""

    @property
    def validated(self) -> float:
        return self.created + self.validating_s

    @property
    def expires(self) -> float:
        return self.created + self.window_s

    @property
    def run_end(self) -> float:
        return max((r.end for r in self.requests), default=self.validated)

    def ending(self) -> tuple[str, float]:
        """The terminal status this batch reaches and when (``inf``: not yet decided)."""
        if self.cancel_at is not None:
            return "cancelled", self.cancel_at + self.cancelling_s
        if self.errors:
            return "failed", self.validated
        if self.run_end > self.expires:
            return "expired", self.expires
        return "completed", self.run_end + self.finalizing_s

    def status(self, now: float) -> str:
        final, at = self.ending()
        if now >= at:
            return final
        if self.cancel_at is not None:
            return "cancelling"
        if now < self.validated:
            return "validating"
        return "finalizing" if now >= self.run_end else "in_progress"

    def finished(self, request: BatchRequest, now: float) -> bool:
        """Whether ``request`` has its answer by ``now`` (a cancel or expiry can forestall it)."""
        if self.cancel_at is not None:
            ran = request.start < self.cancel_at
            return ran and request.end <= min(now, self.cancel_at + self.cancelling_s)
        return request.end <= min(now, self.expires)

    def results(self, now: float) -> tuple[list[BatchRequest], list[BatchRequest]]:
        """The output file's requests and the error file's, once the batch has ended."""
        if self.status(now) not in TERMINAL:
            return [], []
        done = [r for r in self.requests if self.finished(r, now)]
        left = [r for r in self.requests if not self.finished(r, now)]
        return [r for r in done if r.ok], [r for r in done if not r.ok] + left

    def counts(self, now: float) -> dict[str, int]:
        """``request_counts``; a request a cancel or expiry stopped counts as failed."""
        status = self.status(now)
        if status in ("failed", "validating"):
            return {"total": 0, "completed": 0, "failed": 0}
        done = [r for r in self.requests if self.finished(r, now)]
        completed = sum(r.ok for r in done)
        failed = len(self.requests) - completed if status in TERMINAL else len(done) - completed
        return {"total": len(self.requests), "completed": completed, "failed": failed}

    def wall(self, moment: float) -> int:
        """A monotonic moment as the Unix seconds the API shows."""
        return int(self.created_wall + (moment - self.created))

    def timestamps(self, now: float) -> dict[str, int | None]:
        status = self.status(now)
        final, at = self.ending()
        ran = not self.errors and (self.cancel_at is None or self.cancel_at > self.validated)
        cancel = self.cancel_at
        return {
            "created_at": self.wall(self.created),
            "in_progress_at": self.wall(self.validated) if ran and now >= self.validated else None,
            "expires_at": self.wall(self.expires),
            "finalizing_at": (
                self.wall(self.run_end) if final == "completed" and now >= self.run_end else None
            ),
            "completed_at": self.wall(at) if status == "completed" else None,
            "failed_at": self.wall(at) if status == "failed" else None,
            "expired_at": self.wall(at) if status == "expired" else None,
            "cancelling_at": self.wall(cancel) if cancel is not None else None,
            "cancelled_at": self.wall(at) if status == "cancelled" else None,
        }

    def request_status(self, request: BatchRequest, now: float) -> str:
        """For the ledger: ``pending``, ``running``, ``succeeded``, ``failed``, or the batch's
        ``cancelled`` or ``expired`` for a request it never ran."""
        if self.finished(request, now):
            return "succeeded" if request.ok else "failed"
        status = self.status(now)
        if status in UNFINISHED:
            return status
        return "running" if request.start <= now else "pending"

    def unfinished_images(self, now: float) -> int:
        """Images still queued or running: what counts against the enqueued limit."""
        if self.status(now) in TERMINAL:
            return 0
        return sum(r.n for r in self.requests if not self.finished(r, now))


def schedule(
    durations: Sequence[float], order: Sequence[int], start: float, concurrency: int
) -> list[tuple[float, float]]:
    """``(start, end)`` of each request when they run in ``order``, ``concurrency`` at a time."""
    slots = [start] * concurrency
    times: list[tuple[float, float]] = [(math.inf, math.inf)] * len(durations)
    for index in order:
        begins = heapq.heappop(slots)
        times[index] = (begins, begins + durations[index])
        heapq.heappush(slots, times[index][1])
    return times


def _error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def check_input(data: bytes, endpoint: str) -> tuple[list[InputLine], list[dict[str, Any]]]:
    """The input file's lines, or the errors that fail the whole batch.

    The codes are OpenAI's (``invalid_json_line``, ``duplicate_custom_id``, ``url_mismatch``,
    ``model_mismatch``, ``empty_file``, ``too_many_tasks``); ``invalid_request`` for a line
    without a custom_id, method or body is the simulator's own. A body the endpoint would
    refuse does not fail the batch: that request fails alone, when it runs.
    """
    raw = data.split(b"\n")
    if raw and not raw[-1].strip():
        raw.pop()
    if not raw:
        return [], [_error("empty_file", "The batch input file is empty.", None)]
    if len(raw) > MAX_REQUESTS:
        message = f"The batch input file has more than {MAX_REQUESTS:,} requests."
        return [], [_error("too_many_tasks", message, None)]
    lines: list[InputLine] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    for number, text in enumerate(raw, start=1):
        problem = _line_problem(text, endpoint, seen, model)
        if isinstance(problem, dict):
            errors.append(problem | {"line": number})
            continue
        custom_id, body = problem
        seen.add(custom_id)
        if model is None and isinstance(body.get("model"), str):
            model = body["model"]
        lines.append(InputLine(number, custom_id, body))
    return lines, errors[:MAX_ERRORS]


def _line_problem(
    text: bytes, endpoint: str, seen: set[str], model: str | None
) -> tuple[str, dict[str, Any]] | dict[str, Any]:
    """``(custom_id, body)`` of a good line, or the error (without its line number)."""
    try:
        item = json.loads(text)
    except ValueError:
        item = None
    if not isinstance(item, dict):
        return _error("invalid_json_line", "This line is not parseable as valid JSON.", None)
    custom_id, body = item.get("custom_id"), item.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        return _error(
            "invalid_request", "Each request needs a string custom_id.", None, "custom_id"
        )
    if custom_id in seen:
        message = (
            "The custom_id for this request is a duplicate of another request; custom_id"
            " must be unique for each request in a batch."
        )
        return _error("duplicate_custom_id", message, None, "custom_id")
    if item.get("method") != "POST":
        return _error("invalid_request", "The method of a request must be POST.", None, "method")
    if item.get("url") != endpoint:
        message = f"The url of this request does not match the batch's endpoint {endpoint}."
        return _error("url_mismatch", message, None, "url")
    if not isinstance(body, dict):
        return _error("invalid_request", "The body of a request must be an object.", None, "body")
    if model is not None and isinstance(body.get("model"), str) and body["model"] != model:
        message = f"The model of this request differs from the batch's model {model}."
        return _error("model_mismatch", message, None, "body.model")
    return custom_id, body
