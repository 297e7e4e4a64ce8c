"""Starting a batch (or resuming one): the one ``start_batch`` behind ``run``, ``submit``,
``retry``, the schedule and the tests.

It streams the manifest once to validate it (a rejected line gets its row now and costs Redis
nothing), archives it in the output store as the batch's backlog, reads what earlier runs of
the same batch left (the part files, in bulk) so finished lines are never bought again and
failed ones are retried under new attempt numbers, takes the lines other batches under the
same output already bought (``jobs.output.reuse``), seeds Redis with the batch's record, and
admits the first window. Everything after that is the workers'.

What earlier runs counted (submits, jobs, polls, the seconds they worked) is carried over from
``.state/batch.json``, which every flush rewrites: a crashed or interrupted run's work counts.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jobs.checker import Checker
from jobs.clock import now_iso
from jobs.errors import ConfigError
from jobs.manifest.parse import Line
from jobs.manifest.spool import Spooled, default_batch_id, file_chunks, legacy_batch_id
from jobs.output import layout, parts, results, reuse
from jobs.output.batch_info import write_info
from jobs.pricing import currency
from jobs.registry import REGISTRY
from jobs.routing import PoolRules
from jobs.settings import CoreSettings
from jobs.storage import Store, open_store
from jobs.validate import Plan, counted_lines
from worker.batch import feeder
from worker.batch.estimate import Adapters
from worker.groups import adopt
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


def check_batch_id(batch_id: str) -> str:
    if not BATCH_ID.fullmatch(batch_id) or set(batch_id) == {"."}:
        raise ConfigError(f"--batch-id {batch_id!r}: use 1-100 letters, digits, '-', '_', '.'")
    if batch_id in keys.RESERVED:
        raise ConfigError(f"--batch-id {batch_id!r} is a word imagebatch keeps: choose another")
    return batch_id


def default_batch(store: Store, source: str, sha256: str, provider: str, fresh: bool) -> str:
    """The batch id a run without ``--batch-id`` resumes (``default_batch_id``); a batch an
    earlier version started under the id without the provider is resumed under that id, when
    it was bought from this same provider, rather than bought again."""
    legacy = legacy_batch_id(source, sha256)
    if not fresh:
        info = results.read_json(store, layout.info_key(legacy)) or {}
        if info.get("manifest_sha") == sha256 and info.get("provider") == provider:
            return legacy
    return default_batch_id(source, sha256, provider, fresh=fresh)


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
        if live.get("manifest_sha") != spooled.sha256:
            raise ConfigError(
                f"batch {batch} is running with another manifest: choose another --batch-id"
            )
        if live.get("out") != out:
            raise ConfigError(
                f"batch {batch} writes to {live.get('out')}: pass --out {live.get('out')}"
            )
        _same_provider(batch, live.get("provider"), provider, "is running")
        return _attach(rt, batch, live, owner)
    info = results.read_json(store, layout.info_key(batch))
    if info is not None and info.get("manifest_sha") not in (None, spooled.sha256):
        raise ConfigError(
            f"batch {batch} under {store.uri(batch)} was made from another manifest: "
            "choose another --batch-id"
        )
    if info is not None:
        _same_provider(
            batch, info.get("provider"), provider, f"under {store.uri(batch)} was started"
        )

    pooling = {"keyed": ",".join(settings.keyed()), "provider": provider}
    if max_usd_per_image is not None:
        pooling["max_usd_per_image"] = repr(max_usd_per_image)
    check = feeder.checker(rt, pooling)
    plan = Plan()
    skip = bytearray()
    rejected: dict[int, str] = {}
    wanted = reuse.Wanted()
    for idx, line in counted_lines(file_chunks(spooled.path), check):
        plan.add(line, rt.provider, check)
        if on_line is not None:
            on_line(line)
        if line.request is None:
            assert line.rejection is not None
            rejected[idx] = feeder.manifest_rejection_row(line, line.rejection)
            _set_bit(skip, idx)
        elif not fresh:
            wanted.add(line.request.fingerprint(check.bought_as(line.request)), idx)
    if strict and plan.rejected:
        raise ConfigError(
            f"--strict: {plan.rejected} of {plan.lines} lines rejected; nothing was submitted"
        )
    budget_fields = _budget(rt, plan, budget)

    counts: dict[str, float] = {"rejected": len(rejected), "done": len(rejected)}
    prior: dict[int, int] = {}
    carried = 0
    for part in parts.read_parts(store, batch):
        for idx, text in part.items():
            if idx in rejected or idx >= plan.lines:
                continue
            row = _status_only(text)
            if row["status"] == "succeeded":
                _set_bit(skip, idx)
                carried += 1
                _count_success(rt, counts, row["provider"], float(row.get("credits") or 0))
            elif row["status"] == "failed":
                prior[idx] = max(prior.get(idx, 0), int(row.get("attempts") or 0))
    # Lines in a group's job (an OpenAI batch) when Redis was lost go back into that group.
    adoptions = adopt.find(
        store, batch, lambda idx: _has_bit(skip, idx), lambda idx: prior.get(idx, 0)
    )
    for adoption in adoptions:
        for idx, _ in adoption.members:
            _set_bit(skip, idx)
    reused = 0
    if len(wanted):
        wanted.freeze()
        claims = reuse.find(
            store, wanted, plan.lines, exclude=batch, done=lambda idx: _has_bit(skip, idx)
        )
        del wanted
        for idx, request in reuse.take(
            store, batch, spooled.path, claims, check.bought_as, settings.chunk_lines
        ):
            plan.take_out(request, rt.provider, check)
            _set_bit(skip, idx)
            reused += 1
            counts["done"] += 1
            counts["succeeded"] = counts.get("succeeded", 0) + 1
    retrying = sum(1 for idx in prior if not _has_bit(skip, idx))
    # What earlier runs sent and paid for (submits, jobs, polls, ...) adds up across runs; the
    # rows' counts were recounted from the part files above.
    before = (info or {}).get("counters") or {}
    for name, value in before.items():
        if not _recounted(name) and value:
            counts[name] = float(value)

    if info is None or store.sha256_of(layout.manifest_key(batch)) != spooled.sha256:
        store.put_file(layout.manifest_key(batch), spooled.path, "application/x-ndjson")
    store.put(layout.rejected_key(batch), parts.encode_entries(rejected), "text/plain")
    done = int(counts["done"])
    previous = (info or {}).get("summary") or {}
    idle = done >= plan.lines and not reused and bool(previous)
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
        "admitted": done,
        "window": window_size(rt, plan),
        "chunk_lines": settings.chunk_lines,
        "started_at": (info or {}).get("started_at") or now_iso(),
        "elapsed_before": _worked(info or {}),
        "runs": int((info or {}).get("runs", 0)) + 1,
        "estimate": json.dumps(plan.estimate.by_currency),
        **pooling,
        "owner": owner or "",
        **budget_fields,
    }
    if fresh:
        record["fresh"] = 1
    if idle:
        # Nothing left to do (a retry with nothing to retry): the batch's times stay its work's.
        record["finished_before"] = previous.get("finished_at") or ""
    else:
        record["run_started"] = time.time()
    adopted = sum(len(a.members) for a in adoptions)
    record["admitted"] = done + adopted
    state.seed(batch, record, counts, bytes(skip), prior)
    if adoptions:
        adopt.adopt(
            state,
            batch,
            adoptions,
            counted_lines(file_chunks(spooled.path), check),
            lambda line: check.provider_of(line.request) if line.request else provider,
            lambda idx: prior.get(idx, 0),
        )
    write_info(store, batch, record, counts)
    feeder.feed(rt, batch)
    return Started(
        batch,
        plan,
        carried,
        retrying,
        reused,
        adopted,
        complete=done >= plan.lines,
        owner=owner,
    )


def _worked(info: dict[str, Any]) -> float:
    """Seconds the batch's earlier runs worked: recorded since the record holds them; for a
    batch an earlier version finished, its first start to its finalize."""
    if info.get("elapsed_s") is not None:
        return float(info["elapsed_s"])
    summary = info.get("summary") or {}
    try:
        started = datetime.fromisoformat(summary["started_at"])
        finished = datetime.fromisoformat(summary["finished_at"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return max(0.0, (finished - started).total_seconds())


def _same_provider(batch: str, had: str | None, provider: str, where: str) -> None:
    """A stored line only counts as done for a run that would buy the same thing: resuming a
    batch on another provider would pass one provider's images off as another's."""
    if had and had != provider:
        raise ConfigError(
            f"batch {batch} {where} with --provider {had}, not {provider}: pass "
            f"--provider {had} to resume it, or choose another --batch-id"
        )


def _count_success(rt: Runtime, counts: dict[str, float], provider: str, credits: float) -> None:
    counts["done"] += 1
    counts["succeeded"] = counts.get("succeeded", 0) + 1
    unit = rt.settings.provider_spec(provider).credit_unit
    name = f"credits:{currency(provider, unit)}"
    counts[name] = counts.get(name, 0.0) + credits


def _recounted(counter: str) -> bool:
    """Counters a start recounts from the stored rows (the others add up across runs)."""
    return counter in ("done", "succeeded", "failed", "rejected", "reserved") or (
        counter.startswith("credits:")
    )


def plan_batch(
    settings: CoreSettings,
    spooled: Spooled,
    provider: str,
    *,
    out: str | None = None,
    fresh: bool = False,
    on_line: Callable[[Line], None] | None = None,
    max_usd_per_image: float | None = None,
) -> Plan:
    """What ``start_batch`` would find, spending nothing: every line checked as ``run`` checks
    it (its provider reachable too), and the lines already bought under ``out`` counted as
    reused instead of priced."""
    adapters = Adapters(settings, provider)
    rules = PoolRules(settings.keyed(), settings.usd_rates(), max_usd_per_image)
    check = Checker(adapters.checked, provider, rules)
    plan = Plan()
    wanted = reuse.Wanted()
    for idx, line in counted_lines(file_chunks(spooled.path), check):
        plan.add(line, adapters, check)
        if on_line is not None:
            on_line(line)
        if line.request is not None and not fresh:
            wanted.add(line.request.fingerprint(check.bought_as(line.request)), idx)
    if out is not None and len(wanted):
        wanted.freeze()
        claims = reuse.find(open_store(out, settings), wanted, plan.lines)
        for _, _, request, _ in reuse.claimed(spooled.path, claims):
            plan.take_out(request, adapters, check)
    return plan


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


def _budget(rt: Runtime, plan: Plan, budget: Budget | None) -> dict[str, Any]:
    """The budget's currency; refused when the manifest bills in units that do not add up."""
    if budget is None:
        return {}
    used = {currency(name, part.unit) for name, part in plan.by_provider.items()}
    used |= {currency(name, REGISTRY[name].credit_unit) for name in plan.members}
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


def _has_bit(bits: bytearray, idx: int) -> bool:
    byte = idx // 8
    return byte < len(bits) and bool(bits[byte] & (0x80 >> (idx % 8)))


def _set_bit(bits: bytearray, idx: int) -> None:
    byte = idx // 8
    if byte >= len(bits):
        bits.extend(b"\x00" * (byte + 1 - len(bits)))
    bits[byte] |= 0x80 >> (idx % 8)
