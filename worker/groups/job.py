"""One step of a group's life per dispatch, chosen by its status (``GroupStatus``): send
(write the input file, upload it, save the group durably), create its provider job (or find
the one a lost answer made), poll it minutes apart, and collect it (``collect``).

The order is what keeps a group from being bought twice: the group is saved in the output
store with the metadata its create will carry *before* the create, the job's id right after,
and a group found ``CREATING`` (a lost answer, a crash, a resume) lists the provider's jobs
for that metadata before it ever creates again.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from jobs import policy
from jobs.errors import (
    AmbiguousSubmit,
    BatchStop,
    ImagebatchError,
    ProviderError,
    StorageError,
    TransientProviderError,
)
from jobs.output import groups as durable
from jobs.providers.openai_batch_objects import BatchInfo, input_line
from worker.groups import lines
from worker.groups.base import Outcome, StaleGroup
from worker.groups.collect import Collector
from worker.lines.endings import fail, stopped_error
from worker.lines.groups import GroupStatus, custom_id
from worker.lines.records import BatchStatus, LineRecord
from worker.lines.steps import _in_budget_unit
from worker.redis import keys
from worker.runtime import Runtime

HELD_S = 3600.0
"""An interrupted batch's group that was not created yet waits this long (or for a resume)."""
CANCEL_POLL_S = 2.0
"""A job asked to cancel is looked at this often: cancelling takes minutes at most."""


def run(rt: Runtime, batch: str, group: str, seq: int) -> Outcome:
    """The group's next step, if this dispatch (``seq``) is still its latest."""
    owner = f"{seq}:{os.urandom(6).hex()}"
    rec = rt.state.groups.begin(batch, group, seq, owner)
    meta = rt.batch_meta(batch)
    if rec is None or not meta:
        return Outcome("stale")
    job = GroupJob(rt, meta, rec)
    try:
        with job.leased():
            job.step()
    except StaleGroup:
        job.done.outcome = "stale"
    return job.done


class GroupJob(Collector):
    """One dispatch of a group: the step its status needs."""

    @contextmanager
    def leased(self) -> Iterator[None]:
        """The group stays this task's while it runs (uploads and downloads take minutes)."""
        heartbeat = self.rt.heartbeat
        holding = (
            heartbeat.holding(keys.groups(self.rec.provider), self.rec.member)
            if heartbeat is not None
            else nullcontext()
        )
        with holding:
            yield

    def step(self) -> None:
        try:
            match self.rec.status:
                case GroupStatus.FORMED:
                    self.send()
                case GroupStatus.CREATING:
                    self.find_or_create()
                case GroupStatus.WAITING:
                    self.create_again()
                case GroupStatus.RUNNING:
                    self.poll()
                case GroupStatus.COLLECTING:
                    self.collect(None)
        except (TransientProviderError, StorageError) as exc:
            # The provider or the output store did not answer: the same step again later.
            wait = policy.backoff(2, self.settings.retry_base_s, self.settings.retry_max_s)
            self.save(time.time() + max(wait, 0.05))
            self.note(f"retry ({exc.type}): {exc.message}", logging.WARNING)
        except ProviderError as exc:
            # Reading a job we made was refused (a key revoked, another account's base URL):
            # its lines are paid for or may be, so they wait for the account to be fixed
            # (the same command then collects them), never to be bought again.
            self.count("group_refusals")
            self.save(time.time() + self.config.poll_s)
            self.note(f"refused ({exc.type}): {exc.message}; looking again later", logging.WARNING)

    def held_back(self) -> bool:
        """A cancelled, stopped or interrupted batch buys no new job: the group's lines fail
        (cancelled, stopped) or wait for the resume (interrupted)."""
        if lines.stopped(self.meta):
            self.end_all(stopped_error(self.meta))
            return True
        if self.status is BatchStatus.INTERRUPTED:
            self.save(time.time() + HELD_S)
            self.note("held: the batch was interrupted")
            return True
        return False

    # -- FORMED: the input file ---------------------------------------------------------------

    def send(self) -> None:
        if self.held_back():
            return
        with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as handle:
            path = handle.name
            members = [self.write_line(handle, line) for line in self.waiting_lines()]
        try:
            sent = [m for m in members if m is not None]
            if not sent:
                self.save("done")
                self.note("empty: no line left to send")
                return
            name = f"imagebatch-{self.rec.batch}-{self.rec.id}.jsonl"
            file_id = self.adapter.api.upload(name, Path(path))
        finally:
            os.unlink(path)
        tries = self.rec.tries + 1
        record = durable.GroupFile(
            self.rec.id,
            self.rec.batch,
            self.rec.provider,
            self.rec.model,
            sent,
            self.rec.formed_at,
            input_file_id=file_id,
            metadata=self.rec.evolve(tries=tries).metadata(),
            creates=[durable.Create(tries)],
            status="creating",
        )
        # Saved before the create, with the metadata the create carries: whatever happens
        # next, a resume finds the job rather than buying the lines again.
        durable.write(self.store, record)
        self.save("keep", status=GroupStatus.CREATING, input_file_id=file_id, tries=tries)
        self.create(record)

    def write_line(self, handle: Any, line: LineRecord) -> tuple[int, int] | None:
        """The line's request into the input file, once its budget hold is granted."""
        budget = self.meta.get("budget")
        if budget and not line.reserved:
            estimate = _in_budget_unit(self.ctx, line, self.adapter.estimate(line.request))
            if estimate is None or not self.ctx.reserve(estimate, float(budget)):
                unit = self.meta.get("budget_unit", "credits")
                over = ImagebatchError(
                    f"the budget of {float(budget):g} {unit} would be exceeded by this "
                    f"line's estimated {self.adapter.estimate(line.request):g}",
                    type="budget",
                )
                self.apply(line, fail(line.evolve(group=""), over))
                return None
            self.rt.state.groups.set_line_fields(line, reserved=repr(estimate))
        body = self.adapter.body(line.request)
        handle.write(input_line(custom_id(line.idx, line.attempt, line.id), body))
        return line.idx, line.attempt

    # -- CREATING, WAITING: the job -----------------------------------------------------------

    def find_or_create(self) -> None:
        """A create may be out whose answer was never saved: look for its job first."""
        found = self.adapter.api.find(self.rec.metadata(), created_after=self.rec.formed_at - 60)
        if found is not None:
            self.count("group_jobs_found")
            self.started(found, "found again by its metadata")
            return
        if self.held_back():
            return
        self.create(self.durable())

    def create_again(self) -> None:
        """The job was refused for the enqueued limit (nothing ran): a new create, a new try."""
        if self.held_back():
            return
        record = self.durable()
        tries = self.rec.tries + 1
        record.creates.append(durable.Create(tries))
        record.metadata = self.rec.evolve(tries=tries).metadata()
        record.status = "creating"
        durable.write(self.store, record)
        self.save("keep", status=GroupStatus.CREATING, tries=tries)
        self.create(record)

    def create(self, record: durable.GroupFile) -> None:
        self.count("group_creates")
        try:
            info = self.adapter.api.create(self.rec.input_file_id, metadata=self.rec.metadata())
        except AmbiguousSubmit as exc:
            # The job may exist: the next look lists jobs by metadata before any create.
            wait = max(1.0, policy.backoff(2, self.settings.retry_base_s, 10.0))
            self.save(time.time() + wait)
            self.note(f"create unanswered ({exc.message}): looking for its job next")
            return
        except BatchStop as exc:
            self.end_all(exc, stop=(exc.type, exc.message))
            return
        except TransientProviderError:
            raise
        except ProviderError as exc:
            self.end_all(exc)
            return
        self.started(info, "created", record)

    def started(self, info: BatchInfo, how: str, record: durable.GroupFile | None = None) -> None:
        """The job exists: its id goes to the output store and Redis before anything else."""
        record = record or self.durable()
        if not record.creates or record.creates[-1].attempt != self.rec.tries:
            record.creates.append(durable.Create(self.rec.tries))
        record.creates[-1].job_id, record.creates[-1].status = info.id, info.status
        record.status = "running"
        durable.write(self.store, record)
        now = time.time()
        self.save(
            now + self.config.poll_s,
            status=GroupStatus.RUNNING,
            job_id=info.id,
            created_at=float(info.created_at or now),
            job_status=info.status,
        )
        self.note(f"{how}: job {info.id} ({info.status})")

    # -- RUNNING: polls minutes apart ---------------------------------------------------------

    def poll(self) -> None:
        api = self.adapter.api
        if lines.stopped(self.meta) and not self.rec.cancel:
            try:
                api.cancel(self.rec.job_id)
                self.note(f"cancel asked of job {self.rec.job_id}")
            except TransientProviderError:
                raise
            except ProviderError as exc:  # it ended meanwhile (a 409): collect it as it is
                self.note(f"job {self.rec.job_id} not cancelled: {exc.message}")
            self.save("keep", cancel=1)
        info = api.get(self.rec.job_id)
        self.count("polls")
        counts = info.request_counts
        seen = {
            "job_status": info.status,
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
        }
        if not info.done:
            wait = CANCEL_POLL_S if self.rec.cancel else self.config.poll_s
            self.save(time.time() + min(wait, self.config.poll_s), **seen)
            self.done.outcome = f"pending ({info.status})"
            return
        record = self.durable()
        if record.creates:
            record.creates[-1].status = info.status
        record.status = info.status
        record.counts = {k: v for k, v in seen.items() if isinstance(v, int)}
        refusal = next((e for e in info.errors if e.code == durable.REFUSED), None)
        if info.status == "failed" and refusal is not None:
            record.creates[-1].refused = durable.REFUSED
            record.status = "waiting"
            durable.write(self.store, record)
            self.count("group_jobs_refused")
            self.save(time.time() + self.config.poll_s, status=GroupStatus.WAITING, **seen)
            self.note(f"job {info.id} refused for the enqueued limit: created again later")
            return
        durable.write(self.store, record)
        self.save("keep", status=GroupStatus.COLLECTING, **seen)
        self.collect(info)
