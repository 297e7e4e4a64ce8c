"""A line's state, typed: its status, the one table that says what each status means, the
record kept in Redis while the line is in the window, and the transition a step returns.

    READY ─submit─▶ SUBMITTING ─accepted─▶ SUBMITTED ─poll: done─▶ FETCHED ─store─▶ SUCCEEDED
      ▲                 │  (sync provider: images in the answer) ─────────▲     │
      └── 429, transient, FAILED job, expired image (new attempt) ◀─────────┴─────┘
    any step ──permanent error, deadline, budget, cancel──▶ FAILED          (REJECTED: at submit)

A group provider's line (OpenAI's Batch API) goes READY ─grouped─▶ GROUPED ─its group's job
ended─▶ FETCHED, FAILED, or READY again (a new attempt in a later group): it waits on its
group (``worker.lines.groups``), not in a slot of its own.

Where a line waits follows from its status alone (``TABLE``), and so does whether it holds one
of its provider's slots: a slot is taken when the scheduler moves a line into ``flight`` and
given back when a transition moves it out, in ``apply.lua`` and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from functools import cached_property
from typing import Any

from jobs.manifest.request import ImageRequest
from jobs.output.rows import ResultRow


class LineStatus(StrEnum):
    """Where a line is in its life; stored in its Redis record."""

    READY = "ready"
    """Admitted to the window; waits for a provider slot and a request token."""
    SUBMITTING = "submitting"
    """Holds a slot; the paid POST is being sent (its idempotency key is fixed by the attempt)."""
    SUBMITTED = "submitted"
    """The provider accepted a job; it is polled (or its webhook awaited) until it ends."""
    FETCHED = "fetched"
    """The images exist at the provider; they are being downloaded, checked and stored."""
    GROUPED = "grouped"
    """In one of its group provider's groups (``group``): sent with the group as one job,
    it waits for that job's end. Holds no slot: the group is polled, not the line."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"


class Step(StrEnum):
    """The work a non-terminal status needs next."""

    SUBMIT = "submit"
    POLL = "poll"
    STORE = "store"
    GROUP = "group"
    """Done by the line's group (``worker.groups``), never dispatched for the line alone."""


class Home(StrEnum):
    """The shared sorted set a line waits in (the scheduler reads them by due time)."""

    READY = "ready"
    FLIGHT = "flight"
    """Holding a provider slot: ``ZCARD`` is the provider's in-flight count."""
    STORE = "store"
    GROUP = "group"
    """In its group's members (``ib:B:gm:G``), in no shared sorted set."""
    NONE = "none"


class BatchStatus(StrEnum):
    """Where a batch is; stored in its Redis record and in ``.state/batch.json``."""

    RUNNING = "running"
    STOPPING = "stopping"
    """A 402 or 401/403: no later submit can succeed; the rest of the lines fail with the reason."""
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    """``run`` got Ctrl-C/SIGTERM: no new submits, paid jobs land, the same command resumes."""
    FINISHED = "finished"


@dataclass(frozen=True)
class StatusInfo:
    step: Step | None
    home: Home

    @property
    def holds_slot(self) -> bool:
        return self.home is Home.FLIGHT

    @property
    def terminal(self) -> bool:
        return self.step is None


TABLE: dict[LineStatus, StatusInfo] = {
    LineStatus.READY: StatusInfo(Step.SUBMIT, Home.READY),
    LineStatus.SUBMITTING: StatusInfo(Step.SUBMIT, Home.FLIGHT),
    LineStatus.SUBMITTED: StatusInfo(Step.POLL, Home.FLIGHT),
    LineStatus.FETCHED: StatusInfo(Step.STORE, Home.STORE),
    LineStatus.GROUPED: StatusInfo(Step.GROUP, Home.GROUP),
    LineStatus.SUCCEEDED: StatusInfo(None, Home.NONE),
    LineStatus.FAILED: StatusInfo(None, Home.NONE),
    LineStatus.REJECTED: StatusInfo(None, Home.NONE),
}
TERMINAL = frozenset(status for status, info in TABLE.items() if info.terminal)
ACTIVE = frozenset(TABLE) - TERMINAL


def first_seq(now: float) -> int:
    """A line's seq when it is admitted: the time in ms, not 1, so that a task left over from an
    earlier run of the same batch id (its seq counted up from an earlier time) never matches a
    line of this run and applies what it did to another run's store."""
    return int(now * 1000)


def admitted_by(seq: int) -> float:
    """The latest time a line whose seq is ``seq`` can have been admitted (``first_seq``'s
    inverse; every dispatch since adds a millisecond at most)."""
    return seq / 1000


@dataclass(frozen=True)
class LineRecord:
    """One line in the window, as its Redis hash holds it (``from_hash``/``to_hash``)."""

    batch: str
    idx: int
    line: int
    """The manifest's physical line number (1-based), for rows and messages."""
    id: str
    provider: str
    request_json: str
    status: LineStatus = LineStatus.READY
    seq: int = 1
    """Bumped by every dispatch: a message with an older seq is a stale copy."""
    settled: int = 1
    """The seq of the last transition; ``seq - settled`` dispatches started without finishing."""
    owner: str = ""
    """``seq:token`` of the task running a submit or store (a second copy keeps out)."""
    attempt: int = 1
    first_attempt: int = 1
    job_id: str = ""
    accepted_at: float = 0.0
    submitted_at: str = ""
    deadline: float = 0.0
    tries: int = 0
    """Transient failures of the current step (429s never count)."""
    ambiguous: int = 0
    """1 when the last submit's connection broke after sending: it may have been billed."""
    polls: int = 0
    credits: float = 0.0
    reserved: float = 0.0
    expected_s: float = 0.0
    """The latency this job is expected to take (learned); its first poll is planned from it."""
    misses: int = 0
    """Downloads of a finished job's image that answered 404 (CDN lag) since the last success."""
    progress: int = 0
    """The job's progress (0-100) at the last poll that saw it running, if the provider tells."""
    progress_t: float = 0.0
    """Seconds from the job's acceptance to that poll: two such samples predict its end."""
    poll_at: float = 0.0
    """When the next poll is due (epoch s), as the last poll planned it: a poll handed out
    ahead of it (``policy.POLL_LEAD_S``) waits until then."""
    fetched_at: float = 0.0
    """When the images were found ready: the storage deadline counts from here."""
    artifacts: tuple[dict[str, str], ...] = ()
    """Where the images are: ``{"url": …}`` at the provider or ``{"blob": key}`` in Redis."""
    images: tuple[dict[str, Any], ...] = ()
    """Images already stored (lines bought in parts keep what they have)."""
    pool: tuple[str, ...] = ()
    """A pool line's candidates, cheapest first (empty: the line is pinned to ``provider``)."""
    queue: str = ""
    """Where a pool line waits while READY (``jobs.routing.queue_name``: the candidates it may
    still go to); ``provider`` is the one that took it last."""
    route: tuple[dict[str, str], ...] = ()
    """The providers a pool line left, each ``{provider, outcome, reason}``."""
    group: str = ""
    """The group the line was sent in, while it is GROUPED (a group provider's line)."""

    @cached_property
    def request(self) -> ImageRequest:
        return ImageRequest.model_validate_json(self.request_json)

    @property
    def info(self) -> StatusInfo:
        return TABLE[self.status]

    @property
    def member(self) -> str:
        return f"{self.batch} {self.idx}"

    @property
    def ready_queue(self) -> str:
        """The READY queue the line waits in: a pool's, or its own provider's."""
        return self.queue or self.provider

    @property
    def starts(self) -> int:
        return self.seq - self.settled

    @classmethod
    def from_hash(cls, batch: str, idx: int, data: dict[str, str]) -> LineRecord:
        values: dict[str, Any] = {"batch": batch, "idx": idx}
        for f in fields(cls):
            if f.name in ("batch", "idx") or (raw := data.get(_FIELD.get(f.name, f.name))) is None:
                continue
            values[f.name] = _decode(f.name, raw)
        return cls(**values)

    def to_hash(self) -> dict[str, str]:
        return {
            _FIELD.get(f.name, f.name): _encode(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("batch", "idx")
        }

    def evolve(self, **changes: Any) -> LineRecord:
        return replace(self, **changes)


_FIELD = {"request_json": "request"}
_INTS = {"line", "seq", "settled", "attempt", "first_attempt", "tries", "polls", "misses"}
_INTS |= {"progress"}
_INTS |= {"ambiguous"}
_FLOATS = {"accepted_at", "deadline", "credits", "reserved", "expected_s", "fetched_at"}
_FLOATS |= {"progress_t", "poll_at"}
_JSON = {"artifacts", "images", "pool", "route"}


def _decode(name: str, raw: str) -> Any:
    if name in _INTS:
        return int(raw)
    if name in _FLOATS:
        return float(raw)
    if name in _JSON:
        return tuple(json.loads(raw)) if raw else ()
    if name == "status":
        return LineStatus(raw)
    return raw


def _encode(value: Any) -> str:
    if isinstance(value, tuple):
        return json.dumps(list(value), separators=(",", ":"))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def encode_changes(changes: dict[str, Any]) -> dict[str, str]:
    """Record fields in their Redis form (``to_hash`` for just the fields that change)."""
    return {_FIELD.get(name, name): _encode(value) for name, value in changes.items()}


@dataclass(frozen=True)
class LimitEvent:
    """A 429: what a step learned about its provider's real limits."""

    kind: str
    """``concurrency`` (too many jobs at once) or ``rate`` (too many requests)."""
    request: Step
    """The kind of request refused (a submit or a poll): each has its own budget."""
    retry_after: float | None
    named_limit: int | None = None
    """The concurrency limit the provider's message names, if it does."""


@dataclass(frozen=True)
class Transition:
    """What a step decided: the line's new status and fields, when its next step is due, and,
    for a terminal status, the row that ends it."""

    status: LineStatus
    changes: dict[str, Any] = field(default_factory=dict)
    due_in: float = 0.0
    row: ResultRow | None = None
    counts: dict[str, float] = field(default_factory=dict)
    """Batch counters to add to (``submit_requests``, ``jobs_accepted``…)."""
    limit: LimitEvent | None = None
    latency_s: float | None = None
    """A finished job's latency, for the provider's learned expectation."""
    queue_share: float | None = None
    """What the finished job says of its provider's progress reports (``policy.queue_share``),
    learned beside its latency."""
    stop: tuple[str, str] | None = None
    """``(reason, message)`` when no later submit of the batch can succeed (402, 401/403)."""
    leave: tuple[str, str] | None = None
    """``(provider, why)``: a 402 or 401/403 takes the provider out of the batch's pool."""
    answered: bool | None = None
    """A submit's verdict on its provider for the shared breaker: True it answered (even no),
    False it failed (5xx, timeout, refused connection); None: no verdict (a 429, no submit)."""
    outcome: str = ""
    """A word for logs and metrics: accepted, pending, completed, retry, failed…"""
    detail: str = ""
    """Why, for people: the provider's message, the wait before the next try…"""
    payload: tuple[Any, ...] = ()
    """Inline images received by this step (``jobs.providers.base.Artifact``), handed to the
    store that follows in the same task; never written anywhere."""

    def __post_init__(self) -> None:
        if TABLE[self.status].terminal != (self.row is not None):
            raise ValueError(f"a {self.status} transition needs a row exactly when terminal")
