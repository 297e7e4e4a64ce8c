"""Collecting a group whose job ended: its output and error files streamed (a line at a time:
a file of base64 images is large) and each answer mapped to its line by ``custom_id``, the
images stored as any line's are; lines the job did not answer get a new attempt.

Safe to run again from the start (after a crash, or a resume after Redis was lost): a line
that already left the group is skipped, and storing the same image again changes nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

from jobs.errors import PermanentProviderError, TransientProviderError
from jobs.output import groups as durable
from jobs.providers.openai_batch import RequestResult
from jobs.providers.openai_batch_objects import BatchInfo
from worker.groups import lines
from worker.groups.base import GroupWork
from worker.lines import store as store_step
from worker.lines.groups import GroupStatus, parse_custom_id
from worker.lines.records import LineRecord, LineStatus, Transition
from worker.redis import keys


class Collector(GroupWork):
    """The collecting steps of a group's work."""

    def collect(self, info: BatchInfo | None) -> None:
        """Map every answer of the ended job to its line, then let the group go."""
        rec, api = self.rec, self.adapter.api
        if info is None:
            info = api.get(rec.job_id)
        if not info.done:  # a COLLECTING group whose job had not ended: poll it
            self.save(0.0, status=GroupStatus.RUNNING)
            return
        if info.status == "failed":
            self.invalid(info)
        else:
            for file_id in (info.output_file_id, info.error_file_id):
                if file_id:
                    for item in api.lines(file_id):
                        self.settle(self.adapter.result(item))
            unanswered = TransientProviderError(
                f"{rec.provider}: the job {rec.job_id} ended {info.status} without an answer "
                "for this line",
                type="batch_incomplete",
            )
            for line in self.waiting_lines():
                self.apply(line, self.again(line, unanswered))
        record = self.durable()
        record.status = "collected"
        durable.write(self.store, record)
        self.save("done")
        counts = info.request_counts
        self.note(
            f"collected job {rec.job_id} ({info.status}: {counts.completed} completed, "
            f"{counts.failed} failed of {counts.total})"
        )

    def again(
        self, line: LineRecord, exc: TransientProviderError, request_id: str | None = None
    ) -> Transition:
        return lines.again(self.settings, self.config, self.meta, self.rec, line, exc, request_id)

    def settle(self, result: RequestResult) -> None:
        """One answer: images stored, a refusal failing the line, or a new attempt."""
        parsed = parse_custom_id(result.custom_id)
        if parsed is None:
            return
        idx, attempt = parsed
        line = self.rt.state.read(self.rec.batch, idx)
        if (
            line is None
            or line.status is not LineStatus.GROUPED
            or line.group != self.rec.id
            or line.attempt != attempt
        ):
            return  # settled already (a collect that runs again), or another attempt's answer
        error = result.error
        if error is None:
            t = lines.images(self.ctx, self.config, self.adapter, self.rec, line, result)
        elif error.retryable:
            t = lines.again(
                self.settings, self.config, self.meta, self.rec, line, error, result.request_id
            )
        else:
            t = lines.refused(self.rec, line, error, result.request_id)
        if self.apply(line, t) and t.status is LineStatus.FETCHED:
            self.store_images(line, t)

    def invalid(self, info: BatchInfo) -> None:
        """The job failed validation and ran nothing: the input lines it names fail with its
        reason; the others go to a later group."""
        order = self.durable().members
        named = {
            order[e.line - 1][0]: e for e in info.errors if e.line and 1 <= e.line <= len(order)
        }
        first = info.errors[0].message if info.errors else "no reason given"
        for line in self.waiting_lines():
            error = named.get(line.idx)
            if error is not None:
                refusal = PermanentProviderError(
                    f"{self.rec.provider} refused this line of the input file: {error.message}",
                    type=error.code or "batch_invalid",
                )
                t = lines.refused(self.rec, line, refusal)
            else:
                failed = TransientProviderError(
                    f"{self.rec.provider}: the job {info.id} failed validation ({first})",
                    type="batch_failed",
                )
                t = self.again(line, failed)
            self.apply(line, t)

    def store_images(self, line: LineRecord, fetched: Transition) -> None:
        """Store the images now, bytes in hand, as the runner does for a finished job."""
        rec = line.evolve(status=fetched.status, settled=line.seq, owner="", **fetched.changes)
        heartbeat = self.rt.heartbeat
        holding = (
            heartbeat.holding(keys.STORE, rec.member) if heartbeat is not None else nullcontext()
        )
        with holding:
            t = store_step.store(replace(self.ctx, payload=fetched.payload), rec)
        self.apply(rec, t)
