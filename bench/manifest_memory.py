"""Does reading a manifest stay bounded in memory as it grows? Prints ratios from one run.

Reads manifests of N and 10·N lines through ``jobs.manifest.parse.read_manifest`` (as ``plan`` and
``submit`` do) and reports peak traced memory and time for each. Only the set of ids seen
(for duplicate detection) should grow with the line count: the ratio of peaks should stay
far below 10, and the time ratio near 10 (linear).

    .venv/bin/python bench/manifest_memory.py [N]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from jobs.manifest.parse import read_manifest
from jobs.manifest.spool import file_chunks


def write_manifest(path: Path, lines: int) -> None:
    with path.open("w") as out:
        for i in range(lines):
            line = {
                "id": f"sku-{i:08d}",
                "prompt": f"studio photo of product {i} " + "x" * 200,
                "size": "1024x1024",
                "output_format": "png",
                "metadata": {"sku": i},
            }
            out.write(json.dumps(line) + "\n")


def measure(path: Path) -> tuple[int, float, int]:
    tracemalloc.start()
    started = time.perf_counter()
    count = sum(1 for _ in read_manifest(file_chunks(str(path))))
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return count, elapsed, peak


def main() -> None:
    small = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for lines in (small, small * 10):
            path = Path(tmp) / f"m{lines}.jsonl"
            write_manifest(path, lines)
            count, elapsed, peak = measure(path)
            size = path.stat().st_size
            results.append((count, elapsed, peak, size))
            print(
                f"{count:>9} lines  {size / 1e6:8.1f} MB file  peak {peak / 1e6:7.2f} MB  "
                f"{elapsed:6.2f} s  ({count / elapsed:,.0f} lines/s)"
            )
    (_, t1, p1, s1), (c2, t2, p2, s2) = results
    print(
        f"file size ratio {s2 / s1:.1f} · peak memory ratio {p2 / p1:.2f} · "
        f"time ratio {t2 / t1:.2f} · peak/file at {c2} lines {p2 / s2:.3f}"
    )


if __name__ == "__main__":
    main()
