"""Starting a batch (or resuming one): the one ``start_batch`` behind ``run``, ``submit``,
``retry``, the schedule and the tests.

It streams the manifest once to validate it (a rejected line gets its row now and costs Redis
nothing), archives it in the output store as the batch's backlog, reads what earlier runs of
the same batch left (the part files, in bulk) so finished lines are never bought again and
failed ones are retried under new attempt numbers, seeds Redis with the batch's record, and
admits the first window. Everything after that is the workers'.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs.clock import now_iso
from jobs.errors import ConfigError
from jobs.manifest.parse import Line
from jobs.manifest.spool import Spooled, file_chunks
from jobs.output import layout, parts, results
from jobs.output.batch_info import write_info
from jobs.pricing import currency
from jobs.validate import Checker, Plan, counted_lines
from worker.batch import feeder
from worker.lines.records import BatchStatus
from worker.redis import keys
from worker.runtime import Runtime

BATCH_ID = re.compile(r"[A-Za-z0-9_.-]{1,100}")


@dataclass(frozen=True)
class Budget:
    """``--max-credits N`` (the manifest's one billing unit) or ``--max-usd N``."""

    amount: float
    usd: bool = False


@dataclass
class Started:
    batch: str
    plan: Plan
    carried: int = 0
    """Lines an earlier run finished; they are not bought again."""
    retrying: int = 0
    """Lines an earlier run failed; they get new attempts."""
    attached: bool = False
    """The batch was already running in Redis: nothing was re-seeded."""
    complete: bool = False
    """Every line already has a row: only finalize is left."""
    owner: str | None = None
    """The token of the run that owns the batch now, when it is the caller's: only that run's
    Ctrl-C interrupts it (a run that attached to a batch another process runs only follows)."""


def check_batch_id(batch_id: str) -> str:
    if not BATCH_ID.fullmatch(batch_id) or set(batch_id) == {"."}:
        raise ConfigError(f"--batch-id {batch_id!r}: use 1-100 letters, digits, '-', '_', '.'")
    if batch_id in keys.RESERVED:
        raise ConfigError(f"--batch-id {batch_id!r} is a word imagebatch keeps: choose another")
    return batch_id


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
    on_line: Callable[[Line], None] | None = None,
    owner: str | None = None,
) -> Started:
    """Validate, archive, resume from what earlier runs stored, seed Redis, admit a window.
    ``owner``: the token of the ``run`` that starts (or resumes) the batch and may interrupt
    it; None for a batch a fleet runs on its own (``submit``, ``retry`` without a terminal)."""
    state, settings = rt.state, rt.settings
    store = rt.store(out)
    live = state.batch(batch)
    if live and live.get("status") not in (None, BatchStatus.FINISHED):
        if live.get("manifest_sha") != spooled.sha256:
            raise ConfigError(
                f"batch {batch} is running with another manifest: choose another --batch-id"
            )
        if live.get("out") != out:
            raise ConfigError(
                f"batch {batch} writes to {live.get('out')}: pass --out {live.get('out')}"
            )
        return _attach(rt, batch, live, owner)
    info = results.read_json(store, layout.info_key(batch))
    if info is not None and info.get("manifest_sha") not in (None, spooled.sha256):
        raise ConfigError(
            f"batch {batch} under {store.uri(batch)} was made from another manifest: "
            "choose another --batch-id"
        )

    check = Checker(rt.provider, provider)
    plan = Plan()
    skip = bytearray()
    rejected: dict[int, str] = {}
    for idx, line in counted_lines(file_chunks(spooled.path), check):
        plan.add(line, rt.provider, check)
        if on_line is not None:
            on_line(line)
        if line.request is None:
            assert line.rejection is not None
            rejected[idx] = feeder.manifest_rejection_row(line, line.rejection)
            _set_bit(skip, idx)
    if strict and plan.rejected:
        raise ConfigError(
            f"--strict: {plan.rejected} of {plan.lines} lines rejected; nothing was submitted"
        )
    budget_fields = _budget(rt, plan, budget)

    counts: dict[str, float] = {"rejected": len(rejected), "done": len(rejected)}
    prior: dict[int, int] = {}
    carried = retrying = 0
    for part in parts.read_parts(store, batch):
        for idx, text in part.items():
            if idx in rejected or idx >= plan.lines:
                continue
            row = _status_only(text)
            if row["status"] == "succeeded":
                _set_bit(skip, idx)
                carried += 1
                counts["done"] += 1
                counts["succeeded"] = counts.get("succeeded", 0) + 1
                unit = settings.provider_spec(row["provider"]).credit_unit
                name = f"credits:{currency(row['provider'], unit)}"
                counts[name] = counts.get(name, 0.0) + float(row.get("credits") or 0)
            elif row["status"] == "failed":
                prior[idx] = max(prior.get(idx, 0), int(row.get("attempts") or 0))
                retrying += 1
    # A retry of a finished batch adds to what its earlier runs spent and sent; a resume
    # after a crash counts afresh (the crashed run's counters died with it).
    previous = ((info or {}).get("summary") or {}) if info else {}
    for name in ("submit_requests", "jobs_accepted", "ambiguous_submits", "rebought_after_expiry"):
        if previous.get(name):
            counts[name] = float(previous[name])

    if info is None or store.sha256_of(layout.manifest_key(batch)) != spooled.sha256:
        store.put_file(layout.manifest_key(batch), spooled.path, "application/x-ndjson")
    store.put(layout.rejected_key(batch), parts.encode_entries(rejected), "text/plain")
    started_at = (info or {}).get("started_at") or now_iso()
    record: dict[str, Any] = {
        "batch_id": batch,
        "status": BatchStatus.RUNNING,
        "out": out,
        "out_uri": store.uri(batch),
        "provider": provider,
        "source": source,
        "manifest_sha": spooled.sha256,
        "total": plan.lines,
        "cursor_idx": 0,
        "cursor_offset": 0,
        "cursor_line": 0,
        "admitted": len(rejected) + carried,
        "window": window_size(rt, plan),
        "chunk_lines": settings.chunk_lines,
        "started_at": started_at,
        "runs": int((info or {}).get("runs", 0)) + 1,
        "estimate": json.dumps(plan.estimate.by_currency),
        "owner": owner or "",
        **budget_fields,
    }
    state.seed(batch, record, counts, bytes(skip), prior)
    write_info(store, batch, record, counts)
    feeder.feed(rt, batch)
    done = int(counts["done"])
    return Started(batch, plan, carried, retrying, complete=done >= plan.lines, owner=owner)


def _attach(rt: Runtime, batch: str, live: dict[str, str], owner: str | None) -> Started:
    """The batch is still in Redis: an interrupted one resumes in place (its held lines and
    in-flight jobs are all still there), owned by the caller; a running one is only followed.

    A hold decided by a step that read the batch as interrupted can land after this release:
    ``transitions.apply`` looks at the status again after such a hold and releases the line."""
    resumed = None
    if live.get("status") == BatchStatus.INTERRUPTED:
        rt.state.set_batch(batch, status=BatchStatus.RUNNING, owner=owner or "")
        rt.state.release_held(batch, time.time())
        rt.state.wake("batch")
        resumed = owner
    total = int(live.get("total", 0))
    return Started(batch, Plan(lines=total, valid=total), attached=True, owner=resumed)


def window_size(rt: Runtime, plan: Plan) -> int:
    """``IMAGEBATCH_WINDOW``, else a few times the in-flight caps of the providers in use."""
    if rt.settings.window:
        return rt.settings.window
    caps = sum(rt.settings.provider_config(name).max_in_flight for name in plan.by_provider)
    return max(16, math.ceil(rt.settings.window_factor * max(1, caps)))


def _budget(rt: Runtime, plan: Plan, budget: Budget | None) -> dict[str, Any]:
    """The budget's currency; refused when the manifest bills in units that do not add up."""
    if budget is None:
        return {}
    used = {currency(name, part.unit) for name, part in plan.by_provider.items()}
    if budget.usd:
        missing = [
            f"IMAGEBATCH_USD_PER_CREDIT_{name.removesuffix(' credits').upper()}"
            for name in sorted(used)
            if name != "USD" and rt.settings.usd_per_credit(name.removesuffix(" credits")) is None
        ]
        if missing:
            raise ConfigError(
                f"--max-usd needs the USD price of a credit: set {', '.join(missing)}"
            )
        return {"budget": budget.amount, "budget_currency": "USD", "budget_unit": "USD"}
    if len(used) > 1:
        raise ConfigError(
            f"--max-credits: this manifest is billed in "
            f"{' and '.join(sorted(used, key=_usd_last))}, which do not add up; use --max-usd "
            "(with IMAGEBATCH_USD_PER_CREDIT_<NAME> set) instead"
        )
    name = next(iter(used), "credits")
    unit = "USD" if name == "USD" else "credits"
    return {"budget": budget.amount, "budget_currency": name, "budget_unit": unit}


def _status_only(text: str) -> dict[str, Any]:
    """What a resume needs of a stored row; a succeeded row (most of them, in a big resume)
    is recognised without parsing it all. The fields read come before any text a user or a
    provider wrote into the row (and such text has its quotes escaped)."""
    if text.partition('"status":"')[2].startswith('succeeded"'):
        provider = text.partition('"provider":"')[2].partition('"')[0]
        credits = text.partition('"credits":')[2].partition(",")[0]
        return {"status": "succeeded", "provider": provider, "credits": float(credits or 0)}
    row: dict[str, Any] = json.loads(text)
    return row


def _usd_last(name: str) -> tuple[bool, str]:
    return name == "USD", name


def _set_bit(bits: bytearray, idx: int) -> None:
    byte = idx // 8
    if byte >= len(bits):
        bits.extend(b"\x00" * (byte + 1 - len(bits)))
    bits[byte] |= 0x80 >> (idx % 8)
