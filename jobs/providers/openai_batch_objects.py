"""The objects of OpenAI's Batch API as imagebatch reads and writes them: a batch's status and
request counts, why a batch failed validation, the Batch object (``BatchInfo``) and one line
of an input file (``input_line``). The client that sends and reads them is
``openai_batch_api``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

IMAGES_ENDPOINT = "/v1/images/generations"


class BatchStatus(StrEnum):
    """Where a batch is; OpenAI may add statuses, so ``BatchInfo.status`` stays a plain string."""

    VALIDATING = "validating"  # the input file is being checked; nothing runs yet
    FAILED = "failed"  # the file was refused as a whole (``errors``); nothing ran, nothing billed
    IN_PROGRESS = "in_progress"  # requests are running
    FINALIZING = "finalizing"  # every request is done; the result files are being written
    COMPLETED = "completed"  # results are in the output and error files
    EXPIRED = "expired"  # the window passed: finished work returned and billed, the rest not run
    CANCELLING = "cancelling"  # cancel asked; requests already running may still finish
    CANCELLED = "cancelled"  # finished work returned and billed, the rest in the error file


TERMINAL = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


@dataclass(frozen=True)
class RequestCounts:
    """How many requests the batch holds, and how many ended well or badly so far."""

    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class BatchError:
    """Why a batch failed validation: ``line`` (1-based) of the input file, when one is to blame."""

    code: str | None
    message: str
    param: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class BatchInfo:
    """What a runtime needs of a Batch object."""

    id: str
    status: str
    """A ``BatchStatus`` value (or a newer status, treated as not finished)."""
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    request_counts: RequestCounts
    errors: tuple[BatchError, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    created_at: int = 0
    """Unix seconds, as OpenAI reports it."""
    endpoint: str = IMAGES_ENDPOINT
    model: str | None = None

    @property
    def done(self) -> bool:
        """No further change will come: the result files (if any) are final."""
        return self.status in TERMINAL

    @classmethod
    def from_api(cls, body: Mapping[str, Any]) -> BatchInfo:
        """Read a Batch object; ``ValueError`` when it lacks what every batch has."""
        batch_id, status = body.get("id"), body.get("status")
        if not isinstance(batch_id, str) or not isinstance(status, str):
            raise ValueError("a batch object needs a string id and status")
        counts = body.get("request_counts") or {}
        errors = (body.get("errors") or {}).get("data") or []
        metadata = body.get("metadata") or {}
        return cls(
            id=batch_id,
            status=status,
            input_file_id=str(body.get("input_file_id") or ""),
            output_file_id=body.get("output_file_id") or None,
            error_file_id=body.get("error_file_id") or None,
            request_counts=RequestCounts(
                *(int(counts.get(k) or 0) for k in ("total", "completed", "failed"))
            ),
            errors=tuple(
                BatchError(
                    e.get("code"), str(e.get("message") or ""), e.get("param"), e.get("line")
                )
                for e in errors
                if isinstance(e, dict)
            ),
            metadata={str(k): str(v) for k, v in metadata.items()},
            created_at=int(body.get("created_at") or 0),
            endpoint=str(body.get("endpoint") or IMAGES_ENDPOINT),
            model=body.get("model"),
        )


def input_line(custom_id: str, body: Mapping[str, Any], endpoint: str = IMAGES_ENDPOINT) -> bytes:
    """One line of a batch input file: the synchronous request ``body`` under ``custom_id``."""
    item = {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": dict(body)}
    return json.dumps(item, separators=(",", ":")).encode() + b"\n"
