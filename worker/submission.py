"""Turn a manifest into a batch: validate, record every line, queue the work.

Enqueueing streams the manifest (bounded memory) and is safe to repeat with the same batch
id: lines already finished are left alone, lines in flight keep their job ids, and lines
whose images are already stored (the durable records in the output store) are carried over
without a new submit, even when Redis was wiped in between.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from jobs import manifest, results
from jobs.errors import ConfigError, ManifestError
from jobs.manifest import Line
from jobs.pricing import CREDIT_UNITS
from jobs.providers.base import Provider
from jobs.request import ImageRequest, ResultRow
from jobs.storage import Store
from worker.pipeline import STEP_FOR_STATUS, Next, Send, now_iso
from worker.runtime import Runtime
from worker.state import TERMINAL

CHUNK = 1024 * 1024


@dataclass
class Plan:
    """What validating a manifest found, before anything is spent."""

    lines: int = 0
    valid: int = 0
    images: int = 0
    estimate: float = 0.0
    rejections: list[ManifestError] = field(default_factory=list)


@dataclass
class Enqueued:
    plan: Plan
    queued: int = 0
    carried_over: int = 0
    resumed: int = 0
    complete: bool = False
    """Every line was already finished: nothing will trigger finalize but the caller."""


def file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def spool(chunks: Iterable[bytes]) -> str:
    """Copy the manifest to a local temp file: read twice under --strict, archived after."""
    with tempfile.NamedTemporaryFile("wb", prefix="imagebatch-manifest-", delete=False) as out:
        for chunk in chunks:
            out.write(chunk)
        return out.name


AdapterFor = Callable[[str], Provider]


class Checker:
    """Validates each line against its own provider (or the batch default)."""

    def __init__(self, adapter_for: AdapterFor, default_provider: str) -> None:
        self.adapter_for = adapter_for
        self.default = default_provider

    def provider_of(self, request: ImageRequest) -> str:
        return request.provider or self.default

    def __call__(self, request: ImageRequest) -> list[tuple[str, str]]:
        name = self.provider_of(request)
        try:
            adapter = self.adapter_for(name)
        except ConfigError as exc:
            return [("provider", exc.message)]
        return adapter.validate(request)


def priced(
    adapter_for: AdapterFor, path: str, default_provider: str
) -> Iterator[tuple[Line, float]]:
    """Every counted line with its estimated cost (0 for rejected lines)."""
    check = Checker(adapter_for, default_provider)
    for line in manifest.read_manifest(file_chunks(path), check):
        if line.request is None:
            yield line, 0.0
        else:
            yield line, adapter_for(check.provider_of(line.request)).estimate(line.request)


def tally(
    adapter_for: AdapterFor,
    path: str,
    default_provider: str,
    on_line: Callable[[Line], None] | None = None,
) -> Plan:
    """Validate and price the whole manifest without touching Redis or any provider."""
    result = Plan()
    for line, cost in priced(adapter_for, path, default_provider):
        result.lines += 1
        if on_line is not None:
            on_line(line)
        if line.rejection is not None:
            result.rejections.append(line.rejection)
            continue
        assert line.request is not None
        result.valid += 1
        result.images += line.request.n
        result.estimate += cost
    return result


def enqueue(
    rt: Runtime,
    send: Send,
    path: str,
    *,
    batch: str,
    out: str,
    default_provider: str,
    max_credits: float | None = None,
    on_line: Callable[[Line], None] | None = None,
) -> Enqueued:
    """Record and queue every line of the (spooled) manifest; returns what was done."""
    state = rt.state
    store = rt.store(out)
    meta = state.meta(batch)
    if meta.get("summary"):
        state.reset_run(batch)
    elif meta.get("out") and meta["out"] != out:
        raise ConfigError(
            f"batch {batch} writes to {meta['out']}, not {out}: pass --out "
            f"{meta['out']} or choose another --batch-id"
        )
    fresh = not meta.get("started_at") or bool(meta.get("summary"))
    state.set_meta(
        batch,
        batch_id=batch,
        out=out,
        provider=default_provider,
        status="running",
        credit_unit=CREDIT_UNITS.get(default_provider, "credits"),
        max_credits="" if max_credits is None else max_credits,
        **({"started_at": now_iso()} if fresh else {}),
    )
    state.activate(batch)
    records = results.read_records(store, batch)
    report = Enqueued(Plan())
    check = Checker(rt.provider, default_provider)
    idx = 0
    for line in manifest.read_manifest(file_chunks(path), check):
        report.plan.lines += 1
        if on_line is not None:
            on_line(line)
        if line.rejection is not None:
            report.plan.rejections.append(line.rejection)
            _reject(rt, batch, idx, line)
        else:
            assert line.request is not None
            provider = check.provider_of(line.request)
            report.plan.valid += 1
            report.plan.images += line.request.n
            report.plan.estimate += rt.provider(provider).estimate(line.request)
            _queue(rt, send, store, batch, idx, line, line.request, provider, records, report)
        idx += 1
    state.set_meta(batch, estimate=report.plan.estimate)
    store.put_file(results.manifest_key(batch), path, "application/x-ndjson")
    report.complete = state.seal(batch, idx) == idx
    return report


def _reject(rt: Runtime, batch: str, idx: int, line: Line) -> None:
    assert line.rejection is not None
    existing = rt.state.item(batch, idx)
    if existing.get("status") in TERMINAL:
        return
    fields = manifest.rejected_row_fields(line)
    row = ResultRow.model_validate(
        {
            "line": line.number,
            "id": line.id,
            "status": "rejected",
            "error": line.rejection.as_row_error(),
            **fields,
        }
    )
    rt.state.add_item(batch, idx, {"status": "new", "line": line.number, "id": line.id or ""})
    rt.state.finish(batch, idx, "rejected", row.model_dump_json(), 0.0)


def _queue(
    rt: Runtime,
    send: Send,
    store: Store,
    batch: str,
    idx: int,
    line: Line,
    request: ImageRequest,
    provider: str,
    records: dict[str, ResultRow],
    report: Enqueued,
) -> None:
    state = rt.state
    line_id = request.line_id
    existing = state.item(batch, idx)
    if existing:
        if existing.get("id") != line_id:
            raise ConfigError(
                f"batch {batch} already holds another manifest (line "
                f"{line.number} was {existing.get('id')!r}); use a new --batch-id"
            )
        if existing.get("status") in TERMINAL:
            return
        seq = state.next_seq(batch, idx)
        state.schedule(batch, idx, 0)
        send(batch, idx, Next(STEP_FOR_STATUS[existing["status"]], 0, seq))
        report.resumed += 1
        return
    record = records.get(line_id)
    fields = {
        "status": "pending",
        "line": line.number,
        "id": line_id,
        "provider": provider,
        "request": request.model_dump_json(),
        "seq": 0,
        "attempt": 1,
        "first_attempt": 1,
    }
    if record is not None and results.images_intact(store, batch, record):
        state.add_item(batch, idx, {**fields, "status": "new"})
        row = record.model_copy(update={"line": line.number, "metadata": request.metadata})
        state.finish(batch, idx, "succeeded", row.model_dump_json(), row.credits)
        report.carried_over += 1
        return
    if record is not None:
        # Numbering continues past the earlier run's attempts, so new jobs get new keys.
        fields["attempt"] = fields["first_attempt"] = record.attempts + 1
    state.add_item(batch, idx, fields)
    # Due only after a visibility timeout: a long backlog in the submit queue is normal, a
    # first submit that was lost with its worker or broker is not.
    state.schedule(batch, idx, rt.settings.visibility_timeout_s)
    send(batch, idx, Next("submit", 0, 0))
    report.queued += 1
