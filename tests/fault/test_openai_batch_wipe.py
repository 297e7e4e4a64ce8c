"""Issue 18's fault test (docs/invariants.md: Redis wiped, with OpenAI's Batch API): a few
hundred ``openai-batch`` lines on a fleet, a worker SIGKILLed and Redis wiped while OpenAI
batches are in progress, then the same ``submit`` again on a fresh fleet. The groups saved in
the output store bring each in-flight line back into its own OpenAI batch: every line is
accounted for, one OpenAI batch per group, and no request is bought twice."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.output import groups, layout
from jobs.simulator import BatchConfig, Simulator, SimulatorConfig
from tests.fault.test_crash import fleet, wait_finished
from tests.harness import check_invariants, read_s3, run_cli, wait_for
from tests.servers import S3Server

pytestmark = pytest.mark.fault

LINES = 300
RETRIED = (17, 150, 299)
"""Lines whose first request fails with a 500: a new attempt in a later group."""


def write_manifest(path: Path) -> Path:
    lines = []
    for i in range(LINES):
        prompt = f"Studio photo of teapot {i:03d} on a grey seamless background"
        if i in RETRIED:
            prompt += " [[fail-once]]"
        lines.append(
            {"id": f"pot-{i:03d}", "prompt": prompt, "quality": "low", "size": "1024x1024"}
        )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def env_for(redis_url: str, s3: S3Server, bucket: str, sim: Simulator) -> dict[str, str]:
    return {
        "IMAGEBATCH_BROKER_URL": redis_url,
        "IMAGEBATCH_OPENAI_API_KEY": "sk-fault-test",
        "IMAGEBATCH_OPENAI_BASE_URL": sim.url_for("openai"),
        "IMAGEBATCH_OPENAI_BATCH_GROUP_SIZE": "100",
        "IMAGEBATCH_OPENAI_BATCH_MAX_IN_FLIGHT": "300",
        "IMAGEBATCH_OPENAI_BATCH_POLL_S": "0.5",
        "IMAGEBATCH_OUT": f"s3://{bucket}/runs",
        "IMAGEBATCH_VISIBILITY_TIMEOUT_S": "10",
        "IMAGEBATCH_LEASE_S": "5",
        **s3.env(),
    }


def submit(manifest: Path, batch: str, env: dict[str, str]) -> None:
    args = ["submit", str(manifest), "--provider", "openai-batch", "--batch-id", batch]
    done = run_cli(*args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def line_of(custom_id: str) -> str:
    return custom_id.split(":", 2)[2]


def test_a_worker_killed_and_redis_wiped_mid_batch_lose_no_line_and_buy_no_request_twice(
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis[Any],
    s3: S3Server,
    s3_bucket: str,
) -> None:
    # Given 300 lines in groups of 100: three OpenAI batches of about six seconds each
    manifest = write_manifest(tmp_path / "teapots.jsonl")
    batch = "wiped-batch-api"
    config = BatchConfig(request_latency_s=0.5, concurrency=8, validating_s=0.3)
    with Simulator(SimulatorConfig(image_mode="tiny", batch=config)) as sim:
        env = env_for(redis_url, s3, s3_bucket, sim)
        submit(manifest, batch, env)
        (tmp_path / "before").mkdir()
        with fleet(env, tmp_path / "before") as workers:

            def in_progress() -> bool:
                found = sim.ledger()["openai_batches"]
                return len(found) >= 3 and any(b["status"] == "in_progress" for b in found)

            wait_for(in_progress, 90, "the OpenAI batches to run", interval=0.1)
            # When one worker is SIGKILLed, the other stopped, and Redis wiped
            os.kill(workers.workers[0].pid, signal.SIGKILL)
            workers.workers[0].wait(10)
            workers.stop_all()
        before = sim.ledger()
        redis_client.flushall()
        running = {b["id"] for b in before["openai_batches"] if b["status"] != "completed"}
        assert running, "the wipe must catch an OpenAI batch in progress"

        # ...and the same submit is run again on a fresh fleet
        (tmp_path / "after").mkdir()
        with fleet(env, tmp_path / "after") as workers:
            submit(manifest, batch, env)
            wait_finished(redis_client, batch, workers, 120)
        ledger = sim.ledger()

    # Then every line has its one row, its images stored once, and Redis kept nothing else
    outcome = read_s3(s3.client, s3_bucket, "runs", batch)
    check_invariants(manifest, outcome, redis_client=redis_client)
    assert [row.status for row in outcome.rows] == ["succeeded"] * LINES, [
        (row.id, row.error) for row in outcome.rows if row.status != "succeeded"
    ]
    attempts = {row.id: row.attempts for row in outcome.rows}
    assert {line for line, n in attempts.items() if n > 1} == {f"pot-{i:03d}" for i in RETRIED}
    # ...one OpenAI batch per group: the wipe's in-flight groups were found again, not remade
    jobs = ledger["openai_batches"]
    per_group = Counter(b["metadata"]["imagebatch_group"] for b in jobs)
    assert set(per_group.values()) == {1}, per_group
    before_groups = {b["metadata"]["imagebatch_group"] for b in before["openai_batches"]}
    made_after = [b for b in jobs if b["id"] not in {j["id"] for j in before["openai_batches"]}]
    assert not {b["metadata"]["imagebatch_group"] for b in made_after} & before_groups
    # ...and the ledger shows no request bought twice, every stored line bought once
    billed = Counter(
        line_of(r["custom_id"]) for r in ledger["openai_batch_requests"] if r["billed"]
    )
    assert set(billed.values()) == {1} and len(billed) == LINES
    # ...the batches in progress at the wipe were collected after it, their lines' rows naming
    # their requests; and the summary counts the OpenAI batches used
    requests = {r["custom_id"]: r for r in ledger["openai_batch_requests"] if r["billed"]}
    collected_after = [r for r in requests.values() if r["batch"] in running]
    assert collected_after
    assert outcome.summary["openai_batches"] == len(jobs)
    prefix = f"runs/{layout.groups_prefix(batch)}"
    listed = s3.client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])
    saved = [
        groups.GroupFile.from_json(
            s3.client.get_object(Bucket=s3_bucket, Key=item["Key"])["Body"].read()
        )
        for item in listed
    ]
    assert {r.job_id for r in saved} == {b["id"] for b in jobs}
    assert all(r.status == "collected" for r in saved)
