"""The adapter interface every provider implements, and the outcomes it returns.

Async job APIs (APIFrame) answer ``submit`` with ``Submitted`` and are polled; synchronous
OpenAI-style APIs answer ``submit`` with ``Finished``. Field mapping lives in each adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from jobs.manifest.request import ImageRequest


@dataclass(frozen=True)
class Artifact:
    """A finished image: a URL to fetch, or bytes the provider sent inline (base64)."""

    url: str | None = None
    data: bytes | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class Submitted:
    """The provider accepted a job; poll ``job_id`` for the outcome."""

    job_id: str


@dataclass(frozen=True)
class Finished:
    """Images are ready. ``credits`` is what the provider billed, when it says so."""

    artifacts: list[Artifact]
    credits: float | None = None
    job_id: str | None = None
    latency_s: float | None = None
    """How long the job took by the provider's own clock (APIFrame ``completedAt - createdAt``)."""
    expired: bool = False
    """The provider says the job's images have been purged (APIFrame ``expired: true``)."""


@dataclass(frozen=True)
class Pending:
    """Still running; ``progress`` 0-100 when the provider tells."""

    status: str = "QUEUED"
    progress: int | None = None


PollOutcome = Pending | Finished
SubmitOutcome = Submitted | Finished


class Provider(Protocol):
    """What the tasks need from a provider. Errors are raised as ``jobs.errors`` classes."""

    name: str
    idempotent_submit: ClassVar[bool]
    """True when a repeated submit with the same key returns the same job (no second charge)."""
    credit_unit: ClassVar[str]
    max_images_per_request: ClassVar[int]
    """A line asking for more is split into several requests by the pipeline."""
    polled: ClassVar[bool]
    """True for job APIs (submit, then poll); False when the submit answers with the images."""
    webhooks: ClassVar[bool]
    """True when a submit can ask for a signed webhook on completion (APIFrame)."""

    def validate(self, request: ImageRequest) -> list[tuple[str, str]]:
        """Problems with this request for this provider, as (field, reason); empty if fine."""
        ...

    def estimate(self, request: ImageRequest) -> float:
        """Expected cost of the whole line, in ``credit_unit``."""
        ...

    def price_known(self, request: ImageRequest) -> bool:
        """False when no price is published for the line (a new model): ``estimate`` is then
        0, and ``plan`` says the price is unknown rather than guess it."""
        ...

    def submit(
        self, request: ImageRequest, idempotency_key: str, webhook_url: str | None = None
    ) -> SubmitOutcome: ...

    def poll(self, job_id: str) -> PollOutcome:
        """Raises ``JobFailed`` when the job ended without images."""
        ...

    def check_key(self) -> bool:
        """Ask the provider, with a free call, whether it takes the key: ``BatchStop``
        (``auth``) when it refuses it; False when it has no such call or could not be asked."""
        ...

    def close(self) -> None: ...
