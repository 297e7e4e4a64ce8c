"""Starting a batch (or resuming one): the one ``start_batch`` behind ``run``, ``submit``,
``retry``, the schedule and the tests.

It streams the manifest once to validate it (a rejected line gets its row now and costs Redis
nothing), archives it in the output store as the batch's backlog, reads what earlier runs of
the same batch left (the part files, in bulk) so finished lines are never bought again and
failed ones are retried under new attempt numbers, takes the lines other batches under the
same output already bought (``jobs.output.reuse``), seeds Redis with the batch's record, and
admits the first window. Everything after that is the workers'.

What earlier runs counted (submits, jobs, polls, the seconds they worked) is carried over from
``.state/batch.json``, which every flush rewrites: a crashed or interrupted run's work counts
(``worker.batch.resume`` reads what they left).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs.checker import Checker
from jobs.clock import now_iso
from jobs.errors import ConfigError
from jobs.manifest.parse import Line
from jobs.manifest.spool import Spooled, file_chunks
from jobs.output import groups as durable
from jobs.output import layout, parts, results, reuse
from jobs.output.batch_info import write_info
from jobs.storage import Store
from jobs.validate import Plan, counted_lines
from worker.batch import feeder, identity, resume
from worker.batch.budget import Budget, budget_record
from worker.batch.resume import Skip
from worker.groups import adopt
from worker.lines.records import BatchStatus
from worker.runtime import Runtime


@dataclass
class Started:
    batch: str
    plan: Plan
    carried: int = 0
    """Lines an earlier run finished; they are not bought again."""
    retrying: int = 0
    """Lines an earlier run failed; they get new attempts."""
    reused: int = 0
    """Lines taken from other batches under the same output instead of bought."""
    adopted: int = 0
    """Lines an earlier run sent in a group whose job is found again, not bought again."""
    attached: bool = False
    """The batch was already running in Redis: nothing was re-seeded."""
    complete: bool = False
    """Every line already has a row: only finalize is left."""
    owner: str | None = None
    """The token of the run that owns the batch now, when it is the caller's: only that run's
    Ctrl-C interrupts it (a run that attached to a batch another process runs only follows)."""


def start_batch(
    rt: Runtime,
    spooled: Spooled,
    *,
    batch: str,
    out: str,
    provider: str,
    source: str = "",
    strict: bool = False,
    budget: Budget | None = None,
    fresh: bool = False,
    on_line: Callable[[Line], None] | None = None,
    max_usd_per_image: float | None = None,
    owner: str | None = None,
) -> Started:
    """Validate, archive, resume from what earlier runs stored, take what other batches under
    ``out`` already bought (unless ``fresh``), seed Redis, admit a window. ``owner``: the token
    of the ``run`` that starts (or resumes) the batch and may interrupt it; None for a batch a
    fleet runs on its own (``submit``, ``retry`` without a terminal)."""
    state, settings = rt.state, rt.settings
    store = rt.store(out)
    live = state.batch(batch)
    if live and live.get("status") not in (None, BatchStatus.FINISHED):
        identity.same_live_batch(batch, live, spooled, out, provider)
        return _attach(rt, batch, live, owner)
    info = results.read_json(store, layout.info_key(batch))
    identity.same_stored_batch(batch, store, info, spooled, provider)

    pooling = {"keyed": ",".join(settings.keyed()), "provider": provider}
    if max_usd_per_image is not None:
        pooling["max_usd_per_image"] = repr(max_usd_per_image)
    check = feeder.checker(rt, pooling)
    plan, skip = Plan(), Skip()
    rejected: dict[int, str] = {}
    wanted = _validate(rt, spooled, check, plan, skip, rejected, fresh=fresh, on_line=on_line)
    if strict and plan.rejected:
        raise ConfigError(
            f"--strict: {plan.rejected} of {plan.lines} lines rejected; nothing was submitted"
        )
    budget_fields = budget_record(rt.settings, plan, budget)

    earlier = resume.read_earlier(settings, store, batch, rejected, plan.lines, skip)
    counts = earlier.counts
    adoptions = _groups_found(store, batch, skip, earlier)
    claims = _claims(store, batch, wanted, plan.lines, skip)
    del wanted  # the fingerprints (8 bytes a line) are not needed past the claims
    reused = _take(rt, store, batch, spooled, claims, plan, check, skip, counts)
    retrying = sum(1 for idx in earlier.prior if not skip.has(idx))
    resume.carry_counters(info or {}, counts)

    if info is None or store.sha256_of(layout.manifest_key(batch)) != spooled.sha256:
        store.put_file(layout.manifest_key(batch), spooled.path, "application/x-ndjson")
    store.put(layout.rejected_key(batch), parts.encode_entries(rejected), "text/plain")
    done = int(counts["done"])
    adopted = sum(len(a.members) for a in adoptions)
    record = _record(rt, store, spooled, plan, info, batch=batch, out=out, source=source)
    record.update(pooling, admitted=done + adopted, owner=owner or "", **budget_fields)
    _times(record, info, fresh=fresh, idle=done >= plan.lines and not reused)
    state.seed(batch, record, counts, bytes(skip.bits), earlier.prior)
    if adoptions:
        adopt.adopt(
            state,
            batch,
            adoptions,
            counted_lines(file_chunks(spooled.path), check),
            check,
            earlier.attempts,
        )
    write_info(store, batch, record, counts)
    feeder.feed(rt, batch)
    return Started(
        batch,
        plan,
        earlier.carried,
        retrying,
        reused,
        adopted,
        complete=done >= plan.lines,
        owner=owner,
    )


def _validate(
    rt: Runtime,
    spooled: Spooled,
    check: Checker,
    plan: Plan,
    skip: Skip,
    rejected: dict[int, str],
    *,
    fresh: bool,
    on_line: Callable[[Line], None] | None,
) -> reuse.Wanted:
    """Stream the manifest once: every line counted and priced into ``plan``, a rejected one
    given its row now (``rejected``, ``skip``); returns the fingerprints of the valid lines, to
    look for under the output (none when ``fresh``)."""
    wanted = reuse.Wanted()
    for idx, line in counted_lines(file_chunks(spooled.path), check):
        plan.add(line, rt.provider, check)
        if on_line is not None:
            on_line(line)
        if line.request is None:
            assert line.rejection is not None
            rejected[idx] = feeder.manifest_rejection_row(line, line.rejection)
            skip.set(idx)
        elif not fresh:
            wanted.add(line.request.fingerprint(check.bought_as(line.request)), idx)
    return wanted


def _groups_found(
    store: Store, batch: str, skip: Skip, earlier: resume.Earlier
) -> list[durable.Adoption]:
    """Lines in a group's job (an OpenAI batch) when Redis was lost go back into that group
    (``worker.groups.adopt``): they have no row, but they are not bought again."""
    adoptions = adopt.find(store, batch, skip.has, earlier.attempts)
    for adoption in adoptions:
        for idx, _ in adoption.members:
            skip.set(idx)
    return adoptions


def _claims(
    store: Store, batch: str, wanted: reuse.Wanted, lines: int, skip: Skip
) -> reuse.Claims | None:
    """A stored line of another batch under the output for each wanted line without a row
    (None: nothing wanted, ``--fresh``)."""
    if not len(wanted):
        return None
    wanted.freeze()
    return reuse.find(store, wanted, lines, exclude=batch, done=skip.has)


def _take(
    rt: Runtime,
    store: Store,
    batch: str,
    spooled: Spooled,
    claims: reuse.Claims | None,
    plan: Plan,
    check: Checker,
    skip: Skip,
    counts: dict[str, float],
) -> int:
    """Copy the claimed lines' images and rows into the batch: each is done, succeeded and
    priced at nothing; returns how many."""
    if claims is None:
        return 0
    reused = 0
    for idx, request in reuse.take(
        store, batch, spooled.path, claims, check.bought_as, rt.settings.chunk_lines
    ):
        plan.take_out(request, rt.provider, check)
        skip.set(idx)
        reused += 1
        counts["done"] += 1
        counts["succeeded"] = counts.get("succeeded", 0) + 1
    return reused


def _record(
    rt: Runtime,
    store: Store,
    spooled: Spooled,
    plan: Plan,
    info: dict[str, Any] | None,
    *,
    batch: str,
    out: str,
    source: str,
) -> dict[str, Any]:
    """The batch's record in Redis (``ib:batch:B``) as a start writes it, the cursor at the
    manifest's first line; earlier runs' start, time worked and run count carried over. The
    caller adds the pool (the batch's ``provider`` with it), how many lines are ``admitted``
    already, the owner, the budget and the times."""
    return {
        "batch_id": batch,
        "status": BatchStatus.RUNNING,
        "out": out,
        "out_uri": store.uri(batch),
        "source": source,
        "manifest_sha": spooled.sha256,
        "total": plan.lines,
        "cursor_idx": 0,
        "cursor_offset": 0,
        "cursor_line": 0,
        "window": window_size(rt, plan),
        "chunk_lines": rt.settings.chunk_lines,
        "started_at": (info or {}).get("started_at") or now_iso(),
        "elapsed_before": resume.worked(info or {}),
        "runs": int((info or {}).get("runs", 0)) + 1,
        "estimate": json.dumps(plan.estimate.by_currency),
    }


def _times(record: dict[str, Any], info: dict[str, Any] | None, *, fresh: bool, idle: bool) -> None:
    """``fresh``, and when this run started; a run with nothing left to do (a retry with
    nothing to retry) keeps the batch's times its work's: its finish stays the last one's."""
    if fresh:
        record["fresh"] = 1
    previous = (info or {}).get("summary") or {}
    if idle and bool(previous):
        record["finished_before"] = previous.get("finished_at") or ""
    else:
        record["run_started"] = time.time()


def _attach(rt: Runtime, batch: str, live: dict[str, str], owner: str | None) -> Started:
    """The batch is still in Redis: an interrupted one resumes in place (its held lines and
    in-flight jobs are all still there), owned by the caller; a running one is only followed.

    A hold decided by a step that read the batch as interrupted can land after this release:
    ``transitions.apply`` looks at the status again after such a hold and releases the line."""
    resumed = None
    if live.get("status") == BatchStatus.INTERRUPTED:
        rt.state.set_batch(batch, status=BatchStatus.RUNNING, owner=owner or "")
        rt.state.release_held(batch, time.time())
        rt.state.groups.due_now(batch, time.time())
        rt.state.wake("batch")
        resumed = owner
    total = int(live.get("total", 0))
    return Started(batch, Plan(lines=total, valid=total), attached=True, owner=resumed)


def window_size(rt: Runtime, plan: Plan) -> int:
    """``IMAGEBATCH_WINDOW``, else a few times the in-flight caps of the providers in use."""
    if rt.settings.window:
        return rt.settings.window
    settings = rt.settings
    single = [name for name in plan.providers if not settings.provider_spec(name).group]
    caps = sum(settings.provider_config(name).max_in_flight for name in single)
    # A group provider's lines wait in open groups, its cap (no factor: a group is sent whole).
    grouped = sum(
        settings.provider_config(name).max_in_flight
        for name in plan.by_provider
        if name not in single
    )
    return max(16, math.ceil(settings.window_factor * max(1, caps))) + grouped
