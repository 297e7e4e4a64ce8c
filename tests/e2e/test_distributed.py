"""A fleet: ``imagebatch submit`` onto a real Redis, two ``imagebatch worker`` processes, and
``imagebatch status`` — images into a real S3 bucket (SeaweedFS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import CATALOG, check_invariants, read_s3, run_cli, start_worker, stop, wait_for
from tests.servers import S3Server

KEY = "afk_distributed_test_key_0123456789"


def fleet_env(redis_url: str, s3: S3Server, bucket: str, sim: Simulator) -> dict[str, str]:
    return {
        "IMAGEBATCH_BROKER_URL": redis_url,
        "IMAGEBATCH_APIFRAME_API_KEY": KEY,
        "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
        "IMAGEBATCH_OUT": f"s3://{bucket}/runs",
        **s3.env(),
    }


def test_submit_two_workers_and_status_put_every_image_in_s3(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any], s3: S3Server, s3_bucket: str
) -> None:
    with Simulator(SimulatorConfig(latency_s=0.5, latency_jitter_s=0.5)) as sim:
        env = fleet_env(redis_url, s3, s3_bucket, sim)
        submitted = run_cli(
            "submit", str(CATALOG), "--provider", "apiframe", "--batch-id", "fleet", env=env
        )
        assert submitted.returncode == 0, submitted.stderr
        assert submitted.stdout.strip() == "fleet"

        logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
        workers = [start_worker(env, f"w{i}", log) for i, log in enumerate(logs, 1)]
        try:

            def finished() -> str | None:
                status = run_cli("status", "fleet", env=env)
                assert status.returncode == 0, status.stderr
                return status.stdout if "finished" in status.stdout else None

            final = wait_for(finished, 90, "the batch to finish", interval=1)
        finally:
            for worker in workers:
                stop(worker)
        ledger = sim.ledger()

    assert "20/20 done · 20 succeeded · 0 failed · 0 rejected · 552 credits" in final
    for log in logs:
        assert "imagebatch." in log.read_text(), f"{log.name} did no work"
    outcome = read_s3(s3.client, s3_bucket, "runs", "fleet")
    check_invariants(CATALOG, outcome, ledger, redis_client)
    assert all(row.status == "succeeded" for row in outcome.rows)
    assert all(
        image.uri.startswith(f"s3://{s3_bucket}/runs/fleet/images/")
        for row in outcome.rows
        for image in row.images
    )
    assert outcome.summary["results_uri"] == f"s3://{s3_bucket}/runs/fleet/results.jsonl"
    assert ledger["submits"] == 20 and ledger["replays"] == 0


def test_plan_reads_a_manifest_straight_from_s3(s3: S3Server, s3_bucket: str) -> None:
    s3.client.put_object(Bucket=s3_bucket, Key="in/catalog.jsonl", Body=CATALOG.read_bytes())
    result = run_cli(
        "plan", f"s3://{s3_bucket}/in/catalog.jsonl", "--provider", "apiframe", env=s3.env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("20 lines · 20 valid · 0 rejected · 23 images · est. 552")
    missing = run_cli(
        "plan", f"s3://{s3_bucket}/in/nope.jsonl", "--provider", "apiframe", env=s3.env()
    )
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
