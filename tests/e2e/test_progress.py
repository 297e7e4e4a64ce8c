"""Progress anywhere: an unattended ``imagebatch run`` piped into a log prints one-line progress
records while it works, and once it has ended ``status``, ``ls`` and ``status --watch
--exit-status`` answer for it from the output store (an embedded run's Redis is gone), with
the exit status ``run`` had. ``cancel`` on a fleet ends the batch with ``stop_reason:
"cancelled"``, and a ``status --watch --exit-status`` that was following it exits 1."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import (
    CLI,
    check_invariants,
    cli_env,
    read_local,
    run_cli,
    start_worker,
    stop,
    wait_for,
)
from worker.redis import keys

LINES = 45
INTERVAL_S = 5.0
SLOW = {
    # 45 lines, 2 s each, 2 at a time: about a minute of work.
    "IMAGEBATCH_EMBEDDED_SIMULATOR_LATENCY_S": "2.0",
    "IMAGEBATCH_SIMULATOR_MAX_IN_FLIGHT": "2",
    "IMAGEBATCH_PROGRESS_INTERVAL_S": str(INTERVAL_S),
}
RECORD = re.compile(
    r"progress (?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) · batch (?P<batch>\S+) · "
    r"(?P<done>\d+)/(?P<total>\d+) done \((?P<pct>\d+)%\) · (?P<ok>\d+) succeeded · "
    r"(?P<failed>\d+) failed · (?P<rejected>\d+) rejected · (?P<waiting>\d+) waiting · "
    r"(?P<submitted>\d+) submitted · (?P<storing>\d+) storing · "
    r"(?P<credits>[\d.]+) credits(?: \(projected (?P<projected>[\d.]+) credits\))? · "
    r"(?P<eta>ETA (?:–|\d+s|\d+m\d\ds|\d+h\d\dm))$"
)


def write_manifest(path: Path, count: int, policy: int | None = None) -> Path:
    lines = []
    for k in range(count):
        prompt = f"a folded paper crane, variant {k}"
        if k == policy:
            prompt += " [[policy]]"
        lines.append(json.dumps({"id": f"crane-{k:03d}", "prompt": prompt, "quality": "low"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Seen:
    at: float
    """Seconds since the run started, when the line reached the pipe."""
    text: str


def run_piped(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, list[Seen]]:
    """Run the CLI with stdout a pipe (as cron or systemd would), noting when each line
    arrives: progress must reach the log while the batch runs, not at the end."""
    started = time.monotonic()
    seen: list[Seen] = []
    with subprocess.Popen(
        [*CLI, *args],
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                seen.append(Seen(time.monotonic() - started, line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)
            reader.join(5)
    return code, seen


def test_a_piped_run_prints_progress_records_and_status_and_ls_answer_after_it_ended(
    tmp_path: Path,
) -> None:
    # Given a batch that takes about a minute, run with its output piped into a log
    manifest = write_manifest(tmp_path / "cranes.jsonl", LINES)
    out = tmp_path / "out"
    # ... and beside it, into the same place, a small batch with a line the provider refuses
    failing = write_manifest(tmp_path / "flagged.jsonl", 4, policy=2)
    flagged: dict[str, Any] = {}

    def run_flagged() -> None:
        time.sleep(4)  # started after the long batch, so it lists first (newest)
        flagged["code"], flagged["seen"] = run_piped(
            ["run", str(failing), "--provider", "simulator", "--out", str(out),
             "--batch-id", "flag"],
            {"IMAGEBATCH_PROGRESS_INTERVAL_S": str(INTERVAL_S)},
            timeout=120,
        )  # fmt: skip

    beside = threading.Thread(target=run_flagged, daemon=True)
    beside.start()
    args = ["run", str(manifest), "--provider", "simulator", "--out", str(out)]
    code, seen = run_piped([*args, "--batch-id", "cranes"], SLOW, timeout=180)
    beside.join(130)
    text = "\n".join(s.text for s in seen)
    assert code == 0, text
    ended = seen[-1].at

    # Then it printed one-line progress records, no terminal bar or escape codes
    assert "\x1b[" not in text and "━" not in text, text
    records = [(s, RECORD.match(s.text)) for s in seen if s.text.startswith("progress ")]
    for s, match in records:
        assert match is not None, s.text
    parsed = [(s, m) for s, m in records if m is not None]
    duration = parsed[-1][0].at - parsed[0][0].at
    print(
        f"progress: {len(parsed)} records over {ended:.1f}s "
        f"(gaps {[round(b[0].at - a[0].at, 1) for a, b in itertools.pairwise(parsed)]})"
    )
    assert ended > 40, f"the batch was meant to take about a minute, took {ended:.0f}s"
    # ... about one per interval, plus at most one per 10 % step
    assert duration / INTERVAL_S - 2 <= len(parsed) <= duration / INTERVAL_S + 12, len(parsed)
    # ... live: the first came long before the end
    assert parsed[0][0].at < ended - 30, "progress only reached the pipe at the end"
    # ... never more than an interval (plus the 1 s loop and slack) apart, and closer only
    # when a new 10 % step was reached
    for (a, ma), (b, mb) in itertools.pairwise(parsed):
        gap = b.at - a.at
        assert gap <= INTERVAL_S + 3, f"{gap:.1f}s without progress after {a.text}"
        if gap < INTERVAL_S - 1:
            decile = [10 * int(m["done"]) // int(m["total"]) for m in (ma, mb)]
            assert decile[1] > decile[0], (a.text, b.text)
    # ... each with done/total, the counts, cost and an ETA that is about right
    done = [int(m["done"]) for _, m in parsed]
    assert done == sorted(done) and done[-1] >= LINES * 0.9, done
    for s, m in parsed:
        assert m["batch"] == "cranes" and int(m["total"]) == LINES
        assert int(m["pct"]) == 100 * int(m["done"]) // LINES
        assert int(m["ok"]) + int(m["failed"]) + int(m["rejected"]) == int(m["done"])
        pending = [int(m[name]) for name in ("waiting", "submitted", "storing")]
        assert sum(pending) == LINES - int(m["done"]), s.text
        assert int(m["submitted"]) <= 2, s.text  # the account's 2 in flight
        assert float(m["credits"]) == 4 * int(m["ok"]), s.text  # low quality: 4 credits each
        if 0 < int(m["ok"]) < LINES:
            assert m["projected"] is not None and float(m["projected"]) == 4 * LINES, s.text
        if LINES * 0.2 <= int(m["done"]) <= LINES * 0.8:
            eta = eta_seconds(m["eta"])
            left = ended - s.at
            assert eta is not None and left / 3 <= eta <= left * 3, (s.text, f"{left:.0f}s left")
    where = out.resolve() / "cranes"
    assert seen[-1].text == (
        f"done · {LINES} succeeded · 0 failed · 0 rejected · {4 * LINES} credits · "
        f"{where}/results.jsonl"
    )
    check_invariants(manifest, read_local(out, "cranes"))

    # When a cron job asks afterwards (the embedded Redis is gone: the output store answers)
    status = run_cli("status", "cranes", "--out", str(out))
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == (
        f"cranes: finished · {LINES}/{LINES} done · {LINES} succeeded · 0 failed · 0 rejected"
        f" · {4 * LINES} credits · out {where}"
    )
    watched = run_cli("status", "cranes", "--out", str(out), "--watch", "--exit-status")
    assert watched.returncode == 0, watched.stdout + watched.stderr

    # The failing batch: run and status --exit-status both say 1
    assert flagged.get("code") == 1, "\n".join(s.text for s in flagged.get("seen", []))
    assert flagged["seen"][-1].text.startswith("done · 3 succeeded · 1 failed · 0 rejected")
    watched = run_cli("status", "flag", "--out", str(out), "--watch", "--exit-status")
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert "flag: finished · 4/4 done · 3 succeeded · 1 failed" in watched.stdout
    plain = run_cli("status", "flag", "--out", str(out))
    assert plain.returncode == 0, "without --exit-status, status itself succeeded"

    listing = run_cli("ls", "--out", str(out))
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.strip().splitlines()
    assert [row.split(":")[0] for row in rows] == ["flag", "cranes"], rows  # newest first
    assert rows[1].startswith(f"cranes: finished · {LINES}/{LINES} done · {LINES} succeeded")
    assert f"{4 * LINES} credits" in rows[1] and "started 20" in rows[1]
    assert "1 failed" in rows[0]


def eta_seconds(text: str) -> float | None:
    if text == "ETA –":
        return None
    value = text.removeprefix("ETA ")
    if m := re.fullmatch(r"(\d+)s", value):
        return float(m[1])
    if m := re.fullmatch(r"(\d+)m(\d\d)s", value):
        return 60.0 * int(m[1]) + int(m[2])
    if m := re.fullmatch(r"(\d+)h(\d\d)m", value):
        return 3600.0 * int(m[1]) + 60 * int(m[2])
    raise AssertionError(text)


# --- cancel on a fleet -------------------------------------------------------------------


def test_cancel_records_the_reason_and_a_watching_status_exits_1(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    manifest = write_manifest(tmp_path / "cancel.jsonl", 20)
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=1.5)) as sim:
        env = {
            "IMAGEBATCH_BROKER_URL": redis_url,
            "IMAGEBATCH_APIFRAME_API_KEY": "afk_progress_test",
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "2",
            "IMAGEBATCH_OUT": str(out),
        }
        args = ["submit", str(manifest), "--provider", "apiframe", "--batch-id", "halt"]
        submitted = run_cli(*args, env=env)
        assert submitted.returncode == 0, submitted.stderr
        # A cron job follows the batch until it ends
        watch_log = tmp_path / "watch.log"
        with open(watch_log, "wb") as handle:
            watcher = subprocess.Popen(
                [*CLI, "status", "halt", "--watch", "--exit-status"],
                env=cli_env(env),
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        worker = start_worker(env, "canceller", tmp_path / "worker.log", concurrency=2)
        try:
            wait_for(
                lambda: int(float(redis_client.hget(keys.counters("halt"), "succeeded") or 0)) >= 2,
                60,
                "the first lines to finish",
                interval=0.3,
            )
            cancelled = run_cli("cancel", "halt", env=env)
            assert cancelled.returncode == 0, cancelled.stderr
            assert "cancelled" in cancelled.stdout
            watcher.wait(90)
        finally:
            stop(watcher)
            stop(worker)
        watched_out = watch_log.read_text()
        ledger = sim.ledger()

    # Then the watcher exited as run would have: 1, some lines did not succeed
    assert watcher.returncode == 1, watched_out
    last = watched_out.strip().splitlines()[-1]
    assert last.startswith("halt: finished") and "stopped: cancelled" in last, last
    outcome = read_local(out, "halt")
    check_invariants(manifest, outcome, ledger, redis_client)
    assert outcome.summary["stop_reason"] == "cancelled", outcome.summary
    failed = [row for row in outcome.rows if row.status == "failed"]
    assert failed and all(row.error is not None and row.error.type == "cancelled" for row in failed)
    # ... and asking the store afterwards says the same
    shown = run_cli("status", "halt", "--out", str(out))
    assert "stopped: cancelled" in shown.stdout, shown.stdout


# --- status --watch piped ----------------------------------------------------------------


def test_a_piped_status_watch_prints_progress_records_not_a_line_every_two_seconds(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    """The defect: piped, ``status --watch`` printed its full line every ~2 s (1,800 lines an
    hour), and its "in progress" counted lines not yet submitted."""
    lines = 24
    manifest = write_manifest(tmp_path / "watch.jsonl", lines)
    out = tmp_path / "out"
    interval = 4.0
    with Simulator(SimulatorConfig(latency_s=1.0)) as sim:
        env = {
            "IMAGEBATCH_BROKER_URL": redis_url,
            "IMAGEBATCH_APIFRAME_API_KEY": "afk_progress_test",
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "2",
            "IMAGEBATCH_OUT": str(out),
            "IMAGEBATCH_PROGRESS_INTERVAL_S": str(interval),
        }
        args = ["submit", str(manifest), "--provider", "apiframe", "--batch-id", "watched"]
        submitted = run_cli(*args, env=env)
        assert submitted.returncode == 0, submitted.stderr
        worker = start_worker(env, "watched", tmp_path / "worker.log", concurrency=2)
        try:
            # When a cron job watches it with its output piped into a log
            code, seen = run_piped(["status", "watched", "--watch", "--exit-status"], env, 120)
        finally:
            stop(worker)
    text = "\n".join(s.text for s in seen)
    assert code == 0, text
    # Then it printed the batch's line, progress records like run's, and the line at the end
    assert seen[0].text.startswith("watched: running"), text
    assert seen[-1].text.startswith(f"watched: finished · {lines}/{lines} done"), text
    records = [RECORD.match(s.text) for s in seen[1:-1]]
    assert records and all(records), text
    # ... about one per interval and one per 10 % step, not one every 2 s
    took = seen[-1].at - seen[0].at
    assert len(records) <= took / interval + 11, (len(records), took)
    for m in records:
        assert m is not None
        left = [int(m[name]) for name in ("waiting", "submitted", "storing")]
        assert sum(left) == lines - int(m["done"]), m.string
        assert int(m["submitted"]) <= 2, m.string
    check_invariants(manifest, read_local(out, "watched"))
