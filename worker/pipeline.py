"""One line's way through submit → poll → store, as steps that are safe to run twice.

Every step reads the line's state under a lease and does only what is still missing. Each
scheduled step carries the line's ``seq``: a message with an older ``seq`` is a stale or
duplicate copy and is dropped, so a redelivered task can never start a second chain of
polls. The provider's job id (and the attempt's idempotency key) is written to Redis before
anything is done with it; a crash between POST and save is healed by the same key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jobs import download, results
from jobs.errors import (
    AmbiguousSubmit,
    BatchStop,
    DownloadError,
    ImagebatchError,
    ImageExpired,
    JobFailed,
    ProviderError,
    StorageError,
    TransientProviderError,
)
from jobs.providers.base import Artifact, Finished, Pending
from jobs.request import ImageRef, ImageRequest, ResultRow
from worker.faults import crash_point
from worker.runtime import Runtime
from worker.state import TERMINAL

log = logging.getLogger(__name__)

STEP_FOR_STATUS = {
    "pending": "submit",
    "submitting": "submit",
    "submitted": "poll",
    "fetched": "store",
}


@dataclass(frozen=True)
class Next:
    """Run ``step`` for the line after ``countdown`` seconds, as message number ``seq``."""

    step: str
    countdown: float
    seq: int


Send = Callable[[str, int, Next], None]
"""How the pipeline hands the next step to the queue: (batch, idx, next)."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def idempotency_key(batch: str, line_id: str, attempt: int, part: int = 0) -> str:
    """Same line, attempt and part → same key: a repeated POST returns the job already bought."""
    name = f"imagebatch:{batch}:{line_id}:{attempt}" + (f":{part}" if part else "")
    return hashlib.sha256(name.encode()).hexdigest()


@dataclass
class Line:
    """What a step knows about its line: the batch record, the line record and its request."""

    batch: str
    idx: int
    item: dict[str, str]
    meta: dict[str, str]
    request: ImageRequest

    @property
    def provider_name(self) -> str:
        return self.item["provider"]

    @property
    def slot(self) -> str:
        return f"{self.batch}:{self.idx}"

    def int_field(self, name: str, default: int = 0) -> int:
        value = self.item.get(name)
        return int(value) if value else default

    def float_field(self, name: str, default: float = 0.0) -> float:
        value = self.item.get(name)
        return float(value) if value else default


class Pipeline:
    """The step logic; ``worker.tasks`` is the thin Celery glue around ``run``."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.state = runtime.state
        self.settings = runtime.settings
        self.woken: list[tuple[str, int, int]] = []

    # -- the entry point ---------------------------------------------------------------------

    def run(self, batch: str, idx: int, seq: int, send: Send) -> bool:
        """Do the line's missing step. Returns True when the batch's last line just finished."""
        item = self.state.item(batch, idx)
        if not item or item.get("status") in TERMINAL or int(item.get("seq", 0)) != seq:
            return False
        if not self.state.lease(batch, idx, self.settings.step_lease_s):
            # Another copy of this message is at work (or died holding the lease): look again
            # shortly; once the line moves on, this copy's seq is stale and it is dropped.
            wait = min(self.state.lease_left(batch, idx), 2.0) + 0.1
            send(batch, idx, Next(STEP_FOR_STATUS[item["status"]], wait, seq))
            return False
        try:
            item = self.state.item(batch, idx)
            if not item or item.get("status") in TERMINAL or int(item.get("seq", 0)) != seq:
                return False
            self.state.schedule(batch, idx, self.settings.step_lease_s)
            request = ImageRequest.model_validate_json(item["request"])
            outcome = self._step(Line(batch, idx, item, self.state.meta(batch), request))
            if outcome is None or isinstance(outcome, bool):
                return bool(outcome)
            step, countdown = outcome
            next_ = Next(step, countdown, self.state.next_seq(batch, idx))
            if step == "park":
                # No slot: wait in line without a message; a freed slot wakes the line, and
                # the sweeper does if that wake-up is ever missed.
                self.state.park(item["provider"], batch, idx, next_.seq)
                self.state.schedule(batch, idx, self.settings.poll_max_s * 3)
            else:
                self.state.schedule(batch, idx, countdown)
        finally:
            self.state.release(batch, idx)
            self._wake(send)
        # Queued after the lease is released, so the next step never finds it taken. Should
        # this process die right here, the sweeper re-sends the step once it is overdue.
        if next_.step != "park":
            send(batch, idx, next_)
        return False

    def free_slot(self, line: Line) -> None:
        woken = self.state.free_slot(line.provider_name, line.slot)
        if woken is not None:
            self.woken.append(woken)

    def wake_next(self, provider: str) -> None:
        woken = self.state.unpark(provider)
        if woken is not None:
            self.woken.append(woken)

    def _wake(self, send: Send) -> None:
        for batch, idx, seq in self.woken:
            send(batch, idx, Next("submit", 0.0, seq))
        self.woken.clear()

    def _step(self, line: Line) -> tuple[str, float] | bool | None:
        starts = self.state.count_start(line.batch, line.idx)
        if starts > self.settings.max_deliveries:
            return self.fail(
                line,
                ImagebatchError(
                    f"the line's {STEP_FOR_STATUS[line.item['status']]} step was started "
                    f"{starts - 1} times without finishing (its worker kept dying)",
                    type="poison",
                ),
            )
        status = line.item["status"]
        if status in ("pending", "submitting"):
            return self.submit(line)
        if status == "submitted":
            return self.poll(line)
        return self.store(line)

    # -- submit ------------------------------------------------------------------------------

    def submit(self, line: Line) -> tuple[str, float] | bool | None:
        batch, idx, meta = line.batch, line.idx, line.meta
        if meta.get("status") == "cancelled" or meta.get("stop_reason"):
            # Lines parked behind this one would otherwise wait for a slot that, with no
            # new submits, may never free: each line that stops wakes the next.
            self.wake_next(line.provider_name)
            if meta.get("status") == "cancelled":
                return self.fail(line, ImagebatchError("the batch was cancelled", type="cancelled"))
            message = meta.get("stop_message", "batch stopped")
            return self.fail(line, ImagebatchError(message, type=meta["stop_reason"]))
        if line.float_field("deadline") and time.time() > line.float_field("deadline"):
            return self.fail(line, ImagebatchError("the line's deadline passed", type="timeout"))
        provider = self.rt.provider(line.provider_name)
        if not line.item.get("reserved"):
            estimate = provider.estimate(line.request)
            limit = float(meta["max_credits"]) if meta.get("max_credits") else None
            if not self.state.reserve(batch, estimate, limit):
                return self.fail(
                    line,
                    ImagebatchError(
                        f"--max-credits {limit:g} would be exceeded by this line's "
                        f"estimated {estimate:g}",
                        type="budget",
                    ),
                )
            self.state.update(batch, idx, reserved=estimate)
        config = self.settings.provider_config(line.provider_name)
        wait = self.state.take_token(
            line.provider_name, config.requests_per_second, max(1.0, config.requests_per_second)
        )
        if wait > 0:
            return "submit", wait
        if not self.state.take_slot(
            line.provider_name, line.slot, config.max_in_flight, self.settings.line_deadline_s
        ):
            return "park", 0.0
        attempt = line.int_field("attempt", 1)
        if line.item["status"] == "submitting" and not provider.idempotent_submit:
            # The last try of this attempt may have been billed; trying again may buy twice.
            self.state.bump(batch, "ambiguous_submits")
        # A line asking for more images than one request may carry is bought in parts; the
        # parts already received are saved, so a retry buys only the missing ones.
        collected: list[dict[str, Any]] = json.loads(line.item.get("artifacts") or "[]")
        request = line.request
        if collected or request.n > provider.max_images_per_request:
            wanted = min(provider.max_images_per_request, request.n - len(collected))
            request = request.model_copy(update={"n": wanted})
        key = idempotency_key(batch, line.item["id"], attempt, part=len(collected))
        fields: dict[str, Any] = {"status": "submitting"}
        if not line.item.get("submitted_at"):
            fields["submitted_at"] = now_iso()
            fields["deadline"] = time.time() + self.settings.line_deadline_s
        self.state.update(batch, idx, **fields)
        self.state.bump(batch, "submit_requests")
        try:
            outcome = provider.submit(request, key)
            self.state.bump(batch, "jobs_accepted")
            crash_point(self.settings, "after_submit")
        except AmbiguousSubmit as exc:
            return self.transient(line, exc, "submit")
        except TransientProviderError as exc:
            self.state.update(batch, idx, status="pending")
            self.free_slot(line)
            return self.transient(line, exc, "submit")
        except ProviderError as exc:
            self.free_slot(line)
            return self.fail(line, exc)
        if isinstance(outcome, Finished):
            self.free_slot(line)
            return self.fetched(line, outcome, collected)
        self.state.update(batch, idx, status="submitted", job_id=outcome.job_id, polls=0, tries=0)
        return "poll", self.settings.poll_initial_s

    def transient(
        self, line: Line, exc: TransientProviderError | DownloadError | StorageError, step: str
    ) -> tuple[str, float] | bool | None:
        """Retry later with backoff (or Retry-After); give up on a line after too many tries."""
        tries = int(self.state.r.hincrby(self.state.item_key(line.batch, line.idx), "tries", 1))
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None and getattr(exc, "status", None) == 429:
            self.state.pause(line.provider_name, retry_after)
        polling = step == "poll" and time.time() < line.float_field("deadline", float("inf"))
        if tries > self.settings.http_retries and not polling:
            self.free_slot(line)
            return self.fail(line, exc)
        delay = retry_after if retry_after is not None else self.backoff(tries)
        log.info("line %s: %s; retrying %s in %.1fs", line.item["id"], exc.message, step, delay)
        return step, delay

    def backoff(self, tries: int) -> float:
        cap = min(self.settings.retry_max_s, self.settings.retry_base_s * 2 ** (tries - 1))
        return random.uniform(0, cap) if cap > 0 else 0.0

    # -- poll --------------------------------------------------------------------------------

    def poll(self, line: Line) -> tuple[str, float] | bool | None:
        if time.time() > line.float_field("deadline", float("inf")):
            self.free_slot(line)
            return self.fail(
                line,
                ImagebatchError(
                    f"job {line.item.get('job_id')} did not finish before the line's deadline",
                    type="timeout",
                ),
            )
        config = self.settings.provider_config(line.provider_name)
        wait = self.state.take_token(
            line.provider_name, config.requests_per_second, max(1.0, config.requests_per_second)
        )
        if wait > 0:
            return "poll", wait
        provider = self.rt.provider(line.provider_name)
        crash_point(self.settings, "during_poll")
        try:
            outcome = provider.poll(line.item["job_id"])
        except TransientProviderError as exc:
            return self.transient(line, exc, "poll")
        except JobFailed as exc:
            self.free_slot(line)
            return self.regenerate(line, exc)
        except ProviderError as exc:
            self.free_slot(line)
            return self.fail(line, exc)
        if isinstance(outcome, Pending):
            polls = line.int_field("polls") + 1
            self.state.update(
                line.batch, line.idx, polls=polls, tries=0, progress=outcome.progress or 0
            )
            delay = self.settings.poll_initial_s * 1.5 ** min(polls, 20)
            return "poll", min(self.settings.poll_max_s, delay)
        self.free_slot(line)
        return self.fetched(line, outcome)

    def regenerate(self, line: Line, exc: ImagebatchError) -> tuple[str, float] | bool | None:
        """A job that ended without usable images: buy a new one if attempts remain."""
        attempt = line.int_field("attempt", 1)
        tried = attempt - line.int_field("first_attempt", 1) + 1
        if not exc.retryable or tried >= self.settings.max_attempts:
            return self.fail(line, exc)
        if exc.type == "image_expired":
            # The expired job was paid for; buying it again is spend the summary owns up to.
            self.state.bump(line.batch, "rebought_after_expiry")
        log.info("line %s: %s; new job (attempt %d)", line.item["id"], exc.message, attempt + 1)
        self.state.update(
            line.batch,
            line.idx,
            status="pending",
            attempt=attempt + 1,
            job_id="",
            artifacts="",
            tries=0,
            polls=0,
        )
        return "submit", self.backoff(tried)

    def fetched(
        self, line: Line, outcome: Finished, collected: list[dict[str, Any]] | None = None
    ) -> tuple[str, float]:
        """Record where the images are (inline bytes go to Redis until stored) and the cost."""
        provider = self.rt.provider(line.provider_name)
        artifacts = list(collected or [])
        credits = outcome.credits
        if credits is None:
            part = line.request.model_copy(update={"n": len(outcome.artifacts)})
            credits = provider.estimate(part)
        ttl = int(self.settings.line_deadline_s) + 3600
        for artifact in outcome.artifacts:
            if artifact.data is not None:
                k = len(artifacts)
                artifacts.append(
                    {"blob": self.state.put_blob(line.batch, line.idx, k, artifact.data, ttl)}
                )
            else:
                artifacts.append({"url": artifact.url})
        complete = len(artifacts) >= line.request.n
        self.state.update(
            line.batch,
            line.idx,
            status="fetched" if complete else "pending",
            artifacts=artifacts,
            tries=0,
            credits=line.float_field("credits") + credits,
            job_id=outcome.job_id or line.item.get("job_id", ""),
        )
        return ("store", 0.0) if complete else ("submit", 0.0)

    # -- store -------------------------------------------------------------------------------

    def store(self, line: Line) -> tuple[str, float] | bool | None:
        """Download and verify every image first, then upload: a failed download uploads none."""
        batch, line_id = line.batch, line.item["id"]
        store = self.rt.store(line.meta["out"])
        fetched: list[download.Fetched] = []
        try:
            for spec in json.loads(line.item["artifacts"]):
                data = self.state.get_blob(spec["blob"]) if "blob" in spec else None
                if "blob" in spec and data is None:
                    raise ImageExpired("the inline image was lost before it was stored")
                fetched.append(
                    download.fetch(
                        self.rt.downloads,
                        Artifact(url=spec.get("url"), data=data),
                        max_bytes=self.settings.download_max_bytes,
                        expected_format=line.request.output_format,
                        trusted_hosts=self.rt.trusted_hosts(line.provider_name),
                    )
                )
        except ImageExpired as exc:
            return self.regenerate(line, JobFailed(exc.message, retryable=True, type=exc.type))
        except DownloadError as exc:
            if not exc.retryable:
                return self.fail(line, exc)
            return self.transient(line, exc, "store")
        images: list[ImageRef] = []
        crash_point(self.settings, "before_upload")
        try:
            for k, image in enumerate(fetched):
                key = results.image_key(batch, line_id, k, image.extension)
                store.put_new(key, image.data, image.content_type, image.sha256)
                crash_point(self.settings, "mid_upload")
                images.append(
                    ImageRef(
                        uri=store.uri(key),
                        sha256=image.sha256,
                        bytes=len(image.data),
                        content_type=image.content_type,
                        width=image.width,
                        height=image.height,
                    )
                )
        except StorageError as exc:
            if not exc.retryable:
                return self.fail(line, exc)
            return self.transient(line, exc, "store")
        row = self.row(line, "succeeded", images=images)
        return self.finish(line, row)

    # -- the end of a line -------------------------------------------------------------------

    def row(
        self,
        line: Line,
        status: str,
        *,
        images: list[ImageRef] | None = None,
        error: ImagebatchError | None = None,
    ) -> ResultRow:
        request = line.request
        return ResultRow.model_validate(
            {
                "line": int(line.item["line"]),
                "id": line.item["id"],
                "status": status,
                "prompt": request.prompt,
                "model": request.model,
                "provider": line.provider_name,
                "job_id": line.item.get("job_id") or None,
                "attempts": line.int_field("attempt", 1) if line.item.get("submitted_at") else 0,
                "credits": round(line.float_field("credits"), 6),
                "images": images or [],
                "error": error.as_row_error() if error is not None else None,
                "metadata": request.metadata,
                "submitted_at": line.item.get("submitted_at") or None,
                "completed_at": now_iso(),
            }
        )

    def fail(self, line: Line, exc: ImagebatchError) -> bool:
        log.warning("line %s failed: %s (%s)", line.item["id"], exc.message, exc.type)
        if isinstance(exc, BatchStop):
            self.state.set_meta(line.batch, stop_reason=exc.type, stop_message=exc.message)
        if line.item.get("reserved") and not line.float_field("credits"):
            self.state.unreserve(line.batch, float(line.item["reserved"]))
        return self.finish(line, self.row(line, "failed", error=exc))

    def finish(self, line: Line, row: ResultRow) -> bool:
        """Durable record first, then the atomic Redis transition; True if it was the last."""
        store = self.rt.store(line.meta["out"])
        text = row.model_dump_json()
        store.put(
            results.record_key(line.batch, line.item["id"]), text.encode(), "application/json"
        )
        done, total = self.state.finish(line.batch, line.idx, row.status, text, row.credits)
        for spec in json.loads(line.item.get("artifacts") or "[]"):
            if "blob" in spec:
                self.state.r.delete(spec["blob"])
        return done >= 0 and done == total
