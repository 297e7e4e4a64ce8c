"""APIFrame webhooks: a signed delivery advances its line at once (no polls); a forged, wrongly
keyed or replayed one changes nothing; polling still finishes a line whose webhook never came."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from jobs.simulator import Faults, Simulator, SimulatorConfig
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
from tests.servers import free_port
from worker.redis import keys

KEY = "afk_webhook_test_key_0123456789"
PATH = "/webhooks/apiframe"


def manifest(path: Path, count: int) -> Path:
    lines = [
        {"id": f"lamp-{i:02d}", "prompt": f"A brass desk lamp, angle {i}", "quality": "low"}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def sign(body: bytes, key: str) -> str:
    digest = hashlib.sha256(key.encode()).digest()
    return "sha256=" + hmac.new(digest, body, hashlib.sha256).hexdigest()


@contextmanager
def receiver(env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """``imagebatch webhook`` as a process; yields its delivery URL once it answers."""
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [*CLI, "webhook", "--port", str(port)],
            env=cli_env(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, "the webhook receiver")
        yield url + PATH
    finally:
        stop(process)


def polls(ledger: dict[str, Any]) -> int:
    return sum(n for label, n in ledger["requests"].items() if label.startswith("GET /v2/jobs/"))


def fleet_env(redis_url: str, sim: Simulator, out: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        "IMAGEBATCH_BROKER_URL": redis_url,
        "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
        "IMAGEBATCH_APIFRAME_API_KEY": KEY,
        "IMAGEBATCH_OUT": str(out),
        "IMAGEBATCH_WEBHOOK_URL": f"http://127.0.0.1:{port}",
        **extra,
    }


def test_signed_webhooks_finish_every_line_without_a_single_poll_and_a_replay_changes_nothing(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    source = manifest(tmp_path / "lamps.jsonl", 12)
    out = tmp_path / "out"
    port = free_port()
    with Simulator(SimulatorConfig(latency_s=0.5, image_mode="tiny")) as sim:
        env = fleet_env(redis_url, sim, out, port)
        with receiver(env, port, tmp_path / "webhook.log") as url:
            worker = start_worker(env, "hooks", tmp_path / "worker.log")
            try:
                # Given a batch whose submits ask APIFrame for webhooks
                done = run_cli(
                    "submit", str(source), "--provider", "apiframe", "--batch-id", "lamps", env=env
                )
                assert done.returncode == 0, done.stderr
                # When the jobs finish and their webhooks arrive
                wait_for(lambda: redis_client.hget(keys.batch("lamps"), "summary"), 60, "the batch")
                ledger = sim.ledger()
                outcome = read_local(out, "lamps")
                # ...and a delivery for a finished job is replayed, correctly signed
                job = outcome.rows[0].job_id
                body = json.dumps(
                    {
                        "event": "completed",
                        "jobId": job,
                        "status": "COMPLETED",
                        "result": {"images": ["http://127.0.0.1:1/evil.png"]},
                    }
                ).encode()
                replayed = httpx.post(
                    url, content=body, headers={"X-Webhook-Signature": sign(body, KEY)}
                )
                time.sleep(1)
            finally:
                stop(worker)
    # Then every line finished through its webhook: not one poll was needed
    check_invariants(source, outcome, ledger, redis_client, idempotent=True)
    assert [row.status for row in outcome.rows] == ["succeeded"] * 12
    assert polls(ledger) == 0, ledger["requests"]
    assert outcome.summary["webhooks"] == 12
    assert ledger["webhooks"]["delivered"] == 12, ledger["webhooks"]
    # ...and the replay was acknowledged but changed nothing
    assert replayed.status_code == 200 and "ignored" in replayed.text, replayed.text
    assert read_local(out, "lamps").rows == outcome.rows


def test_forged_deliveries_change_nothing_and_polling_finishes_lines_whose_webhook_never_came(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    source = manifest(tmp_path / "lamps.jsonl", 4)
    out = tmp_path / "out"
    port = free_port()
    # Given jobs whose webhooks never arrive, and polling as the fallback every 4 s
    config = SimulatorConfig(latency_s=0.5, image_mode="tiny", faults=Faults(webhook_drop=1.0))
    with Simulator(config) as sim:
        env = fleet_env(redis_url, sim, out, port, IMAGEBATCH_WEBHOOK_POLL_S="4")
        with receiver(env, port, tmp_path / "webhook.log") as url:
            worker = start_worker(env, "forged", tmp_path / "worker.log")
            try:
                done = run_cli(
                    "submit", str(source), "--provider", "apiframe", "--batch-id", "forged", env=env
                )
                assert done.returncode == 0, done.stderr

                def waiting() -> list[tuple[bytes, bytes]]:
                    found = []
                    for key in redis_client.scan_iter(match=keys.line_pattern("forged")):
                        line = redis_client.hgetall(key)
                        if line.get(b"status") == b"submitted":
                            found.append((key, line[b"job_id"]))
                    return found if len(found) == 4 else []

                submitted = wait_for(waiting, 30, "four lines waiting for their jobs")
                # When someone posts completions for those jobs: unsigned, badly signed,
                # and signed with another key
                results = []
                for _line, job in submitted:
                    body = json.dumps(
                        {
                            "event": "completed",
                            "jobId": job.decode(),
                            "status": "COMPLETED",
                            "result": {"images": ["http://127.0.0.1:1/forged.png"]},
                        }
                    ).encode()
                    for headers in (
                        {},
                        {"X-Webhook-Signature": "sha256=" + "0" * 64},
                        {"X-Webhook-Signature": sign(body, "afk_someone_elses_key")},
                    ):
                        results.append(httpx.post(url, content=body, headers=headers).status_code)
                still = {key: redis_client.hgetall(key) for key, _ in submitted}
                # Then each was refused and no line moved...
                assert set(results) == {401}, results
                assert all(line.get(b"status") == b"submitted" for line in still.values()), {
                    k: {f: v[:40] for f, v in line.items()} for k, line in still.items()
                }
                # ...and polling, the fallback, finishes them with the real images
                wait_for(
                    lambda: redis_client.hget(keys.batch("forged"), "summary"), 60, "the batch"
                )
            finally:
                stop(worker)
        ledger = sim.ledger()
    outcome = read_local(out, "forged")
    check_invariants(source, outcome, ledger, redis_client, idempotent=True)
    assert [row.status for row in outcome.rows] == ["succeeded"] * 4
    assert polls(ledger) >= 4
    assert outcome.summary["webhooks"] == 0
    # ...whose images came from the provider's own CDN, not from the forged URL
    assert ledger["requests"].get("GET /cdn/images/{name} 200", 0) >= 4, ledger["requests"]
