"""Running imagebatch as users do (the CLI, worker processes) and the one invariant oracle
every end-to-end and fault test ends with (docs/invariants.md, I1-I4)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from jobs.output.rows import ResultRow
from jobs.pricing import currency
from jobs.registry import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
"""The repository's root: ``examples/``, ``deploy/``, ``jobs/`` are under it."""
SCHEMAS = ROOT / "tests" / "schemas"
CATALOG = ROOT / "examples" / "catalog.jsonl"
CLI = [sys.executable, "-m", "worker"]
FAST = {
    # Short waits so end-to-end runs take seconds; the code paths are the production ones.
    "IMAGEBATCH_POLL_INITIAL_S": "0.2",
    "IMAGEBATCH_POLL_MAX_S": "0.5",
    "IMAGEBATCH_RETRY_BASE_S": "0.05",
    "IMAGEBATCH_RETRY_MAX_S": "0.5",
    "IMAGEBATCH_EMBEDDED_SIMULATOR_LATENCY_S": "0.3",
    "IMAGEBATCH_WORKER_CONCURRENCY": "8",
}


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any IMAGEBATCH_ setting, plus FAST and extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    return {**env, **FAST, **(extra or {})}


def run_cli(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=cli_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_batch(
    manifest: Path | str,
    provider: str,
    out: Path | str,
    batch: str,
    *extra: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """``imagebatch run MANIFEST --provider P --out OUT --batch-id B [extra...]``."""
    args = ["run", str(manifest), "--provider", provider, "--out", str(out), "--batch-id", batch]
    return run_cli(*args, *extra, env=env, cwd=cwd, timeout=timeout)


def start_worker(
    env: Mapping[str, str], name: str, log: Path, concurrency: int = 4, *options: str
) -> subprocess.Popen[bytes]:
    """A real ``imagebatch worker`` process, logging to a file; ``options`` go to Celery."""
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [*CLI, "worker", f"--concurrency={concurrency}", f"--hostname={name}@%h", *options],
            env=cli_env(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def counted_lines(manifest: Path) -> list[int]:
    """Line numbers that must get a row: not blank, not a # comment."""
    numbers = []
    for number, raw in enumerate(manifest.read_bytes().split(b"\n"), start=1):
        text = raw.removeprefix(b"\xef\xbb\xbf").strip()
        if text and not text.startswith(b"#"):
            numbers.append(number)
    return numbers


@dataclass
class Outcome:
    """What a finished batch left behind, read back from its output store."""

    rows: list[ResultRow]
    summary: dict[str, Any]
    objects: dict[str, bytes] = field(default_factory=dict)
    """Image objects: key (relative to OUT/BATCH/images/) → bytes."""
    content_types: dict[str, str] = field(default_factory=dict)


def read_local(out: Path, batch: str) -> Outcome:
    root = out / batch
    rows = [
        ResultRow.model_validate_json(line)
        for line in (root / "results.jsonl").read_text().splitlines()
    ]
    objects = (
        {
            p.relative_to(root / "images").as_posix(): p.read_bytes()
            for p in (root / "images").rglob("*")
            if p.is_file()
        }
        if (root / "images").exists()
        else {}
    )
    types = {
        key: {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}[key.rsplit(".", 1)[1]]
        for key in objects
    }
    return Outcome(rows, json.loads((root / "summary.json").read_text()), objects, types)


def read_s3(client: Any, bucket: str, prefix: str, batch: str) -> Outcome:
    base = f"{prefix}/{batch}" if prefix else batch
    body = client.get_object(Bucket=bucket, Key=f"{base}/results.jsonl")["Body"].read()
    rows = [ResultRow.model_validate_json(line) for line in body.decode().splitlines()]
    summary = json.loads(
        client.get_object(Bucket=bucket, Key=f"{base}/summary.json")["Body"].read()
    )
    objects, types = {}, {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{base}/images/"
    ):
        for item in page.get("Contents", []):
            key = item["Key"].removeprefix(f"{base}/images/")
            got = client.get_object(Bucket=bucket, Key=item["Key"])
            objects[key] = got["Body"].read()
            types[key] = got["ContentType"]
    return Outcome(rows, summary, objects, types)


def check_invariants(
    manifest: Path,
    outcome: Outcome,
    ledger: Mapping[str, Any] | None = None,
    redis_client: redis.Redis[Any] | None = None,
    idempotent: bool = True,
) -> None:
    """I1 no loss, I2 no double spend, I3 no orphans or overwrites, I4 counts add up."""
    rows, summary = outcome.rows, outcome.summary
    batch = summary["batch_id"]
    # I1: exactly one row per counted line, in manifest order; rejected/failed rows say why.
    assert [row.line for row in rows] == counted_lines(manifest)
    for row in rows:
        assert row.status in ("succeeded", "failed", "rejected"), row
        if row.status != "succeeded":
            assert row.error is not None and row.error.message, row
    # I3: every stored image belongs to exactly one row image, with its checksum and size.
    claimed: dict[str, Any] = {}
    for row in rows:
        if row.status == "succeeded":
            assert row.images, row
        for k, image in enumerate(row.images):
            key = f"{row.id}/{k}.{image.uri.rsplit('.', 1)[1]}"
            assert image.uri.endswith(f"images/{key}"), image.uri
            assert key not in claimed, f"{key} claimed twice"
            claimed[key] = image
    orphaned, missing = set(outcome.objects) - set(claimed), set(claimed) - set(outcome.objects)
    assert not orphaned and not missing, (
        f"orphaned image objects {sorted(orphaned)}, missing {sorted(missing)}; rows say "
        f"{[image.uri for image in claimed.values()][:2]}"
    )
    for key, data in outcome.objects.items():
        image = claimed[key]
        assert hashlib.sha256(data).hexdigest() == image.sha256, key
        assert len(data) == image.bytes, key
        assert outcome.content_types[key] == image.content_type, key
    # I4: counts add up.
    statuses = Counter(row.status for row in rows)
    assert summary["total"] == len(rows) == sum(statuses.values())
    for status in ("succeeded", "failed", "rejected"):
        assert summary[status] == statuses[status], status
    by_currency: defaultdict[str, float] = defaultdict(float)
    for row in rows:
        if row.credits and row.provider:
            unit = REGISTRY[row.provider].credit_unit
            by_currency[currency(row.provider, unit)] += row.credits
    assert set(summary["costs"]) == set(by_currency), (summary["costs"], by_currency)
    for name, amount in by_currency.items():
        assert abs(summary["costs"][name] - amount) < 1e-6, name
    if summary["credits"] is not None:  # one currency: the plain total too
        assert abs(summary["credits"] - sum(row.credits for row in rows)) < 1e-6
    if redis_client is not None:
        left = sorted(
            k.decode() if isinstance(k, bytes) else k
            for k in redis_client.scan_iter(match=f"ib:{batch}*")
        )
        assert left == [f"ib:{batch}"], left
    # I2: at most one billed (not refunded) provider job per line.
    if ledger is not None:
        check_no_double_spend(rows, ledger["jobs"], summary, idempotent)


def check_no_double_spend(
    rows: Iterable[ResultRow],
    jobs: list[dict[str, Any]],
    summary: Mapping[str, Any],
    idempotent: bool,
) -> None:
    """No line is bought twice. With idempotency keys: at most one billed (not refunded) job
    per line, beyond the re-buys of expired results the summary owns up to. Without them
    (lines may be split into one-image calls): billed images beyond what the line stored or
    one call brings, only as many as the summary's ambiguous submits can explain."""
    billed_jobs: Counter[str] = Counter()
    billed_images: Counter[str] = Counter()
    largest_job: Counter[str] = Counter()
    for job in jobs:
        if job["credit_cost"] and job["status"] != "FAILED":
            images = job.get("images", 1)
            billed_jobs[job["prompt"]] += 1
            billed_images[job["prompt"]] += images
            largest_job[job["prompt"]] = max(largest_job[job["prompt"]], images)
    stored = {row.prompt: len(row.images) for row in rows if row.prompt is not None}
    if idempotent:
        extra = sum(count - 1 for count in billed_jobs.values() if count > 1)
        allowed = summary.get("rebought_after_expiry", 0)
    else:
        extra = sum(
            max(0, count - max(stored.get(prompt, 0), largest_job[prompt]))
            for prompt, count in billed_images.items()
        )
        allowed = summary.get("ambiguous_submits", 0) * 10
    assert extra <= allowed, {p: c for p, c in billed_jobs.items() if c > 1}
    for row in rows:
        if row.status == "succeeded":
            assert billed_images[row.prompt or ""] >= len(row.images), row.id
