"""Re-running a big manifest with one line changed: what it buys and how long it takes.

    .venv/bin/python bench/reuse.py [LINES]        (default 10,000; the first run takes minutes)

Runs ``imagebatch run MANIFEST --provider simulator`` the way a user does (the embedded default:
private Redis and in-process worker; a local ``--out``) against the built-in simulator, started
apart with ``imagebatch simulate`` (tiny images, short jobs) so its ledger of billed jobs can be
read. Then one line's prompt is edited and the same command runs again: a new manifest, so a new
batch, which takes every unchanged line from the first one and buys one image. Prints the images
the simulator billed and the wall seconds of each run, as lines to paste into a note.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import CLI, manifest  # noqa: E402

SIM_CONFIG = {"image_mode": "tiny", "latency_s": 0.2}
LIMITS = {
    # An account the embedded worker cannot outrun: the first run is bound by its CPU.
    "IMAGEBATCH_SIMULATOR_MAX_IN_FLIGHT": "128",
    "IMAGEBATCH_SIMULATOR_REQUESTS_PER_SECOND": "400",
    "IMAGEBATCH_POLL_INITIAL_S": "0.2",
    "IMAGEBATCH_POLL_MAX_S": "0.5",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def billed_images(ledger: dict[str, Any]) -> int:
    return sum(
        int(job["images"])
        for job in ledger["jobs"]
        if job["credit_cost"] and job["status"] != "FAILED"
    )


def run(source: Path, out: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    result = subprocess.run(
        [*CLI, "run", str(source), "--provider", "simulator", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    return wall, result.stdout


def main(lines: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-reuse-") as tmp:
        folder = Path(tmp)
        port = free_port()
        sim = subprocess.Popen(
            [*CLI, "simulate", "--port", str(port), "--config", json.dumps(SIM_CONFIG)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"{base}/_sim/ledger", timeout=2).raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

            def ledger() -> dict[str, Any]:
                answer: dict[str, Any] = httpx.get(f"{base}/_sim/ledger", timeout=60).json()
                return answer

            env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
            env |= {"IMAGEBATCH_SIMULATOR_BASE_URL": base, **LIMITS}
            out = folder / "out"
            source = manifest(folder / "catalog.jsonl", lines)
            first_s, _ = run(source, out, env)
            first = billed_images(ledger())
            # One prompt edited: the file's content changes, so the default batch id does too
            text = source.read_text().splitlines()
            middle = lines // 2
            edited = json.loads(text[middle])
            edited["prompt"] += ", edited"
            text[middle] = json.dumps(edited)
            source.write_text("\n".join(text) + "\n")
            second_s, said = run(source, out, env)
            second = billed_images(ledger()) - first
            (batch,) = [b for b in os.listdir(out) if b in said]
            summary = json.loads((out / batch / "summary.json").read_text())
        finally:
            sim.terminate()
            sim.wait(10)
    print(f"reuse_{lines}: first run: {first:,} images bought · {first_s:.1f} s wall")
    print(
        f"reuse_{lines}: re-run with 1 line edited: {second:,} image(s) bought (simulator "
        f"ledger) · {summary['reused']:,} lines reused · {second_s:.1f} s wall "
        f"({first_s / second_s:.0f}× faster)"
    )
    if second != 1 or summary["reused"] != lines - 1:
        sys.exit(f"expected 1 image bought and {lines - 1} lines reused")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
