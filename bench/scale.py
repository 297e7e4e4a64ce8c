"""A million lines: how fast ``submit`` takes them, how little Redis and memory that costs, and
how fast a resume (Redis wiped, the same command again) and finalize read what was stored.

    .venv/bin/python bench/scale.py [LINES]        (default 1,000,000; about 10 minutes)

Prints, from one run: enqueue lines/s and the CLI's peak RSS; the Redis memory the batch
holds; the resume's and finalize's rows/s over part files written as if the batch had run
(one succeeded row per line, with its image record).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet import CLI, env_for, manifest, redis_server
from jobs.output import layout, parts
from jobs.storage import LocalStore
from worker.redis import keys

BATCH = "million"


def submit(env: dict[str, str], source: Path) -> tuple[float, float, str]:
    """``imagebatch submit``: wall seconds, peak RSS in MB, its output."""
    log = source.with_suffix(".log")
    with log.open("wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            [*CLI, "submit", str(source), "--provider", "apiframe", "--batch-id", BATCH],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(text[-2000:])
    return wall, usage.ru_maxrss / 1024, text


def batch_bytes(client: object) -> int:
    """Memory of every key the batch holds in Redis (``MEMORY USAGE``)."""
    total = 0
    for key in client.scan_iter(match=f"ib:{BATCH}*", count=1000):  # type: ignore[attr-defined]
        total += int(client.memory_usage(key, samples=0) or 0)  # type: ignore[attr-defined]
    return total


def write_parts(out: Path, lines: int, chunk: int) -> None:
    """Part files as a finished run leaves them: one succeeded row per line."""
    store = LocalStore(str(out))
    for first in range(0, lines, chunk):
        rows = {}
        for idx in range(first, min(lines, first + chunk)):
            row = {
                "line": idx + 1,
                "id": f"item-{idx:06d}",
                "status": "succeeded",
                "prompt": f"Studio photo of catalog item {idx} on a grey background",
                "model": "gpt-image-1.5",
                "provider": "apiframe",
                "job_id": f"00000000-0000-4000-8000-{idx:012d}",
                "attempts": 1,
                "credits": 4.0,
                "images": [
                    {
                        "uri": f"{out}/{BATCH}/images/item-{idx:06d}/0.png",
                        "sha256": "0" * 64,
                        "bytes": 1234,
                        "content_type": "image/png",
                        "width": 1024,
                        "height": 1024,
                    }
                ],
                "error": None,
                "metadata": None,
                "submitted_at": "2026-12-01T00:00:00Z",
                "completed_at": "2026-12-01T00:00:05Z",
            }
            rows[idx] = json.dumps(row, separators=(",", ":"))
        store.put(layout.part_key(BATCH, first // chunk), parts.encode_entries(rows), "text/plain")


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with redis_server() as server, tempfile.TemporaryDirectory(prefix="imagebatch-scale-") as tmp:
        root = Path(tmp)
        source = manifest(root / "million.jsonl", lines)
        out = root / "out"
        env = env_for(server.url, "http://127.0.0.1:9", out)
        size = source.stat().st_size

        before = int(server.client.info("memory")["used_memory"])
        wall, rss, _ = submit(env, source)
        held = batch_bytes(server.client)
        used = int(server.client.info("memory")["used_memory"]) - before
        print(
            f"enqueue   {lines:,} lines ({size / 1e6:.0f} MB) in {wall:.1f}s: "
            f"{lines / wall:,.0f} lines/s · CLI peak RSS {rss:.0f} MB · "
            f"Redis: the batch's keys {held / 1e6:.2f} MB ({held / lines:.1f} bytes/line), "
            f"used_memory +{used / 1e6:.2f} MB",
            flush=True,
        )

        write_parts(out, lines, chunk=1000)
        server.client.flushall()
        wall, rss, _ = submit(env, source)
        done = int(float(server.client.hget(keys.counters(BATCH), "done") or 0))
        print(
            f"resume    {lines:,} rows from {lines // 1000:,} part files in {wall:.1f}s: "
            f"{lines / wall:,.0f} rows/s (validation included) · peak RSS {rss:.0f} MB · "
            f"{done:,} lines counted done",
            flush=True,
        )

        from jobs.settings import Settings
        from worker import runtime
        from worker.batch import finish
        from worker.celery.app import configure

        # Per-provider fields are generated from the registry: mypy does not know them.
        apiframe: dict[str, Any] = {"apiframe_api_key": "afk_bench"}
        settings = Settings(broker_url=server.url, out=str(out), **apiframe)
        configure(settings, server.url)
        rt = runtime.configure(settings)
        started = time.monotonic()
        summary = finish.finalize(rt, BATCH)
        took = time.monotonic() - started
        assert summary is not None and summary["succeeded"] == lines, summary
        print(
            f"finalize  {lines:,} rows into results.jsonl in {took:.1f}s: "
            f"{lines / took:,.0f} rows/s (with failed.jsonl, summary and report.html)",
            flush=True,
        )
        runtime.reset()


if __name__ == "__main__":
    main()
