"""``imagebatch schedule``: every new manifest of an inbox is submitted exactly once, even with
two schedulers at once, against a real Redis, a real worker and the simulator; the S3 inbox
against SeaweedFS; the cron setting and its errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.errors import ConfigError
from jobs.manifest.spool import default_batch_id
from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import (
    CLI,
    check_invariants,
    cli_env,
    read_local,
    read_s3,
    run_cli,
    start_worker,
    stop,
    wait_for,
)
from tests.servers import S3Server
from worker.celery import beat
from worker.celery.app import app
from worker.services.inbox import schedule as inbox

KEY = "afk_schedule_test_key_0123456789"
GOOD_1 = [f'{{"id": "mug-{i}", "prompt": "a mug, colour {i}", "quality": "low"}}' for i in range(3)]
GOOD_2 = ['{"id": "cup", "prompt": "a cup", "quality": "low"}', "# a comment", ""]
BAD = ['{"prompt": "a kettle", "qualty": "low"}', "this is not json", '{"n": 99}']


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.2)) as simulator:
        yield simulator


def put(folder: Path, name: str, lines: list[str], age_s: float = 60.0) -> Path:
    """A manifest as a user leaves it: written, then left alone (older than SETTLE_S)."""
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def batch_of(name: str, content: bytes) -> str:
    return default_batch_id(name, hashlib.sha256(content).hexdigest(), "apiframe")


def sched_env(redis_url: str, sim: Simulator, where: str, out: str, **more: str) -> dict[str, str]:
    return {
        "IMAGEBATCH_BROKER_URL": redis_url,
        "IMAGEBATCH_PROVIDER": "apiframe",
        "IMAGEBATCH_APIFRAME_API_KEY": KEY,
        "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
        "IMAGEBATCH_INBOX": where,
        "IMAGEBATCH_OUT": out,
        **more,
    }


def together(env: dict[str, str], count: int = 2) -> list[subprocess.CompletedProcess[str]]:
    """``count`` ``imagebatch schedule --once`` processes started at the same moment."""
    procs = [
        subprocess.Popen(
            [*CLI, "schedule", "--once"],
            env=cli_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def said(results: list[subprocess.CompletedProcess[str]], word: str) -> Counter[str]:
    """How often the processes, between them, said ``word NAME ...`` (e.g. submitted)."""
    return Counter(
        line.split()[1]
        for result in results
        for line in result.stdout.splitlines()
        if line.startswith(f"{word} ")
    )


def claims(client: redis.Redis[Any]) -> dict[str, dict[str, Any]]:
    return {
        key.decode(): json.loads(client.get(key) or b"{}")
        for key in client.scan_iter(match="ib:inbox:*")
    }


def finish_with_a_worker(env: dict[str, str], batches: list[str], log: Path) -> None:
    worker = start_worker(env, "w1", log)
    try:

        def finished() -> bool:
            for batch in batches:
                status = run_cli("status", batch, env=env)
                if "finished" not in status.stdout:
                    return False
            return True

        wait_for(finished, 90, "the inbox's batches to finish", interval=1)
    finally:
        stop(worker)


# --- two schedulers, one folder inbox ----------------------------------------------------------


def test_two_schedulers_at_once_submit_each_manifest_exactly_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any], sim: Simulator
) -> None:
    box, out = tmp_path / "inbox", tmp_path / "out"
    box.mkdir()
    one = put(box, "catalog-one.jsonl", GOOD_1).read_bytes()
    two = put(box, "catalog-two.jsonl", GOOD_2).read_bytes()
    put(box, "broken.jsonl", BAD)
    batches = [batch_of("catalog-one.jsonl", one), batch_of("catalog-two.jsonl", two)]
    env = sched_env(redis_url, sim, str(box), str(out))

    results = together(env)

    # Between them, the two schedulers submitted each good manifest once, refused the bad one
    # once; whichever refused it exits 1.
    assert said(results, "submitted") == {"catalog-one.jsonl": 1, "catalog-two.jsonl": 1}, [
        r.stdout + r.stderr for r in results
    ]
    assert said(results, "refused") == {"broken.jsonl:": 1}
    assert sorted(r.returncode for r in results) == [0, 1]
    assert "WARNING worker.services.inbox.schedule" in "".join(r.stderr for r in results)
    # One batch each, in Redis and in the output store, each started once.
    assert sorted(m.decode() for m in redis_client.smembers("ib:batches")) == sorted(batches)
    assert sorted(p.name for p in out.iterdir()) == sorted(batches)
    for batch in batches:
        assert json.loads((out / batch / ".state" / "batch.json").read_text())["runs"] == 1
        assert (out / batch / "manifest.jsonl").is_file()
    # The claims of the two submitted ones stay (long TTL); the refused one's was let go.
    held = claims(redis_client)
    assert sorted(c["batch_id"] for c in held.values()) == sorted(batches)
    assert {c["state"] for c in held.values()} == {"submitted"}
    assert all(0 < redis_client.ttl(key) <= inbox.SUBMITTED_TTL_S for key in held)
    # The inbox: nothing left in it; the submitted moved with their batch, the bad with why.
    assert sorted(p.name for p in box.glob("*.jsonl")) == []
    assert (box / "submitted" / "catalog-one.jsonl").read_bytes() == one
    record = json.loads((box / "submitted" / "catalog-one.jsonl.submitted.json").read_text())
    assert record["batch_id"] == batches[0] and record["out"] == str(out)
    reason = (box / "refused" / "broken.jsonl.reason.txt").read_text()
    assert "none of its 3 lines is valid" in reason and "line 2: not valid JSON" in reason
    assert (box / "refused" / "broken.jsonl").is_file()

    # A second pass (two again) finds nothing new.
    again = together(env)
    assert all(r.returncode == 0 for r in again), [r.stderr for r in again]
    assert all(r.stdout.strip().endswith("nothing new") for r in again)

    # A worker runs both batches: no line bought twice, every row accounted for.
    finish_with_a_worker(env, batches, tmp_path / "worker.log")
    ledger = sim.ledger()
    for batch, manifest in zip(batches, ["catalog-one.jsonl", "catalog-two.jsonl"], strict=True):
        outcome = read_local(out, batch)
        check_invariants(box / "submitted" / manifest, outcome, ledger)
        assert all(row.status == "succeeded" for row in outcome.rows)
    assert ledger["submits"] == 4 and ledger["replays"] == 0


def test_a_refused_manifest_put_back_fixed_is_submitted(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any], sim: Simulator
) -> None:
    box, out = tmp_path / "inbox", tmp_path / "out"
    box.mkdir()
    put(box, "fixme.jsonl", BAD)
    env = sched_env(redis_url, sim, str(box), str(out))
    first = run_cli("schedule", "--once", env=env)
    assert first.returncode == 1 and "refused fixme.jsonl" in first.stdout
    assert run_cli("schedule", "--once", env=env).stdout.strip().endswith("nothing new")
    fixed = put(box, "fixme.jsonl", GOOD_2).read_bytes()
    second = run_cli("schedule", "--once", env=env)
    assert second.returncode == 0, second.stderr
    assert f"submitted fixme.jsonl as batch {batch_of('fixme.jsonl', fixed)}" in second.stdout
    # A file still being written (modified just now) waits for a later pass.
    put(box, "fresh.jsonl", GOOD_1, age_s=0)
    third = run_cli("schedule", "--once", env=env)
    assert "left fresh.jsonl for the next pass: modified" in third.stdout
    assert (box / "fresh.jsonl").exists()


def test_a_scheduler_that_died_holding_a_claim_delays_the_manifest_never_loses_it(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any], sim: Simulator
) -> None:
    box, out = tmp_path / "inbox", tmp_path / "out"
    box.mkdir()
    content = put(box, "orphan.jsonl", GOOD_1).read_bytes()
    key = inbox.claim_key("orphan.jsonl", hashlib.sha256(content).hexdigest())
    # What a scheduler killed between claim and submit leaves: a claim nobody renews.
    dead = {"state": "claimed", "owner": "dead-scheduler", "host": "gone", "pid": 1}
    redis_client.set(key, json.dumps(dead), px=8000)
    env = sched_env(redis_url, sim, str(box), str(out))
    busy = run_cli("schedule", "--once", env=env)
    assert "orphan.jsonl: another scheduler is submitting it" in busy.stdout, busy.stderr
    assert (box / "orphan.jsonl").exists() and not out.exists()
    wait_for(lambda: not redis_client.exists(key), 15, "the dead claim's lease to run out")
    taken = run_cli("schedule", "--once", env=env)
    batch = batch_of("orphan.jsonl", content)
    assert f"submitted orphan.jsonl as batch {batch}" in taken.stdout, taken.stderr
    assert json.loads(redis_client.get(key) or b"{}")["state"] == "submitted"


def test_a_scheduler_that_died_after_submitting_only_gets_its_record_finished(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any], sim: Simulator
) -> None:
    box, out = tmp_path / "inbox", tmp_path / "out"
    box.mkdir()
    content = put(box, "late.jsonl", GOOD_1).read_bytes()
    batch = batch_of("late.jsonl", content)
    key = inbox.claim_key("late.jsonl", hashlib.sha256(content).hexdigest())
    claim = {"state": "submitted", "owner": "dead", "batch_id": batch, "out": str(out)}
    redis_client.set(key, json.dumps(claim), ex=3600)
    result = run_cli("schedule", "--once", env=sched_env(redis_url, sim, str(box), str(out)))
    assert f"late.jsonl: already submitted as batch {batch}; recorded" in result.stdout
    assert (box / "submitted" / "late.jsonl").is_file() and not (box / "late.jsonl").exists()
    assert not out.exists() and not redis_client.smembers("ib:batches")  # not submitted again


# --- the S3 inbox ----------------------------------------------------------------------------


def test_an_s3_inbox_with_two_schedulers_records_each_manifest_once(
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis[Any],
    sim: Simulator,
    s3: S3Server,
    s3_bucket: str,
    aws_env: S3Server,
) -> None:
    client = s3.client
    manifests = {
        "catalog-one.jsonl": GOOD_1,
        "catalog-two.jsonl": GOOD_2,
        "broken.jsonl": BAD,
        "nested/ignored.jsonl": GOOD_1,  # not directly under the inbox
        "notes.txt": ["not a manifest name"],
    }
    bodies = {name: ("\n".join(lines) + "\n").encode() for name, lines in manifests.items()}
    for name, content in bodies.items():
        client.put_object(Bucket=s3_bucket, Key=f"inbox/{name}", Body=content)
    batches = [batch_of(n, bodies[n]) for n in ("catalog-one.jsonl", "catalog-two.jsonl")]
    out = f"s3://{s3_bucket}/runs"
    env = sched_env(redis_url, sim, f"s3://{s3_bucket}/inbox/", out, **s3.env())

    results = together(env)

    assert said(results, "submitted") == {"catalog-one.jsonl": 1, "catalog-two.jsonl": 1}, [
        r.stdout + r.stderr for r in results
    ]
    assert said(results, "refused") == {"broken.jsonl:": 1}
    assert sorted(m.decode() for m in redis_client.smembers("ib:batches")) == sorted(batches)

    def body(key: str) -> bytes:
        return client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()

    def etag(key: str) -> str:
        return client.head_object(Bucket=s3_bucket, Key=key)["ETag"]

    # Manifests stay where they are; a marker each says what became of them.
    for name, batch in zip(["catalog-one.jsonl", "catalog-two.jsonl"], batches, strict=True):
        assert body(f"inbox/{name}") == bodies[name]
        marker = json.loads(body(f"inbox/.imagebatch/{name}.submitted.json"))
        assert marker["batch_id"] == batch and marker["etag"] == etag(f"inbox/{name}")
        assert body(f"runs/{batch}/manifest.jsonl") == bodies[name]
    refused = json.loads(body("inbox/.imagebatch/broken.jsonl.refused.json"))
    assert "none of its 3 lines is valid" in refused["reason"]
    assert refused["etag"] == etag("inbox/broken.jsonl")
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/", Delimiter="/")
    assert sorted(p["Prefix"] for p in listed.get("CommonPrefixes", [])) == sorted(
        f"runs/{b}/" for b in batches
    )

    again = together(env)
    assert all(r.stdout.strip().endswith("nothing new") for r in again), [r.stderr for r in again]

    # New content under an old name is a new manifest: the fixed bad one is submitted now.
    fixed = ("\n".join(GOOD_2) + "\n").encode()
    client.put_object(Bucket=s3_bucket, Key="inbox/broken.jsonl", Body=fixed)
    third = run_cli("schedule", "--once", env=env)
    assert third.returncode == 0, third.stderr
    assert f"submitted broken.jsonl as batch {batch_of('broken.jsonl', fixed)}" in third.stdout

    finish_with_a_worker(env, [*batches, batch_of("broken.jsonl", fixed)], tmp_path / "w.log")
    for batch, name in zip(batches, ["catalog-one.jsonl", "catalog-two.jsonl"], strict=True):
        (tmp_path / name).write_bytes(bodies[name])
        check_invariants(tmp_path / name, read_s3(client, s3_bucket, "runs", batch))


# --- beat: two of them, a worker running the passes ------------------------------------------


def test_two_beats_fire_imagebatch_inbox_and_a_worker_submits_each_manifest_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any], sim: Simulator
) -> None:
    box, out = tmp_path / "inbox", tmp_path / "out"
    box.mkdir()
    one = put(box, "first.jsonl", GOOD_1).read_bytes()
    two = put(box, "second.jsonl", GOOD_2).read_bytes()
    put(box, "broken.jsonl", BAD)
    batches = sorted([batch_of("first.jsonl", one), batch_of("second.jsonl", two)])
    env = sched_env(redis_url, sim, str(box), str(out), IMAGEBATCH_SCHEDULE="* * * * *")
    logs = [tmp_path / f"beat{i}.log" for i in (1, 2)]
    beats = []
    for log in logs:
        with open(log, "wb") as handle:
            beats.append(
                subprocess.Popen(
                    [*CLI, "schedule"], env=cli_env(env), stdout=handle, stderr=subprocess.STDOUT
                )
            )
    # A plain worker knows the inbox task: the Celery app includes its module.
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as handle:
        worker = subprocess.Popen(
            [
                *CLI,
                "worker",
                "--concurrency=4",
                "--hostname=inbox-worker@%h",
            ],
            env=cli_env({**env, "IMAGEBATCH_LOG_LEVEL": "INFO"}),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: worker_log.read_text().count("imagebatch.inbox") >= 4,  # 2 received, 2 done
            140,
            "both beats' passes to run",
            interval=1,
        )
        wait_for(lambda: not list(box.glob("*.jsonl")), 30, "the inbox to be emptied")
    finally:
        for beat in beats:
            stop(beat)
        stop(worker)
    for log in logs:
        assert "schedule '* * * * *' (UTC)" in log.read_text(), log.read_text()
    assert all(redis_client.exists(f"ib:{batch}") for batch in batches)
    assert sorted(p.name for p in out.iterdir()) == batches
    assert (box / "refused" / "broken.jsonl.reason.txt").is_file()
    text = worker_log.read_text()
    assert text.count("submitted first.jsonl as batch") == 1, text
    assert text.count("submitted second.jsonl as batch") == 1, text


# --- the cron setting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "minute", "hour", "weekday"),
    [
        ("*/5 * * * *", set(range(0, 60, 5)), set(range(24)), set(range(7))),
        ("30 2 * * 1-5", {30}, {2}, {1, 2, 3, 4, 5}),
        ("0 0 * * 7", {0}, {0}, {0}),  # cron's 7 is Sunday, Celery's 0
        ("@daily", {0}, {0}, set(range(7))),
        ("  15  */6 * * sun  ", {15}, {0, 6, 12, 18}, {0}),
    ],
)
def test_cron_expressions_become_celery_crontabs(
    expression: str, minute: set[int], hour: set[int], weekday: set[int]
) -> None:
    cron = beat.parse_cron(expression)
    assert (cron.minute, cron.hour, cron.day_of_week) == (minute, hour, weekday)


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("* * * *", "give five fields"),
        ("* * * * * *", "give five fields"),
        ("", "give five fields"),
        ("61 * * * *", "61 > 59"),
        ("*/0 * * * *", "step cannot be zero"),
        ("0 0 32 * *", "32 > 31"),
        ("0 0 * * funday", "funday"),
    ],
)
def test_a_bad_cron_expression_is_a_config_error_naming_the_setting(
    expression: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        beat.parse_cron(expression)
    assert caught.value.message.startswith("IMAGEBATCH_SCHEDULE ")
    assert says in caught.value.message


def test_the_schedule_command_exits_2_on_a_bad_setting(tmp_path: Path) -> None:
    bad = run_cli(
        "schedule",
        "--once",
        env={
            "IMAGEBATCH_SCHEDULE": "every five minutes",
            "IMAGEBATCH_INBOX": str(tmp_path),
            "IMAGEBATCH_PROVIDER": "apiframe",
        },
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: IMAGEBATCH_SCHEDULE 'every five minutes'")
    assert "Traceback" not in bad.stderr
    no_inbox = run_cli("schedule", "--once", env={"IMAGEBATCH_PROVIDER": "apiframe"})
    assert no_inbox.returncode == 2 and "set IMAGEBATCH_INBOX" in no_inbox.stderr


def test_the_beat_entry_sends_imagebatch_inbox_with_the_pass_it_runs() -> None:
    target = inbox.Target("s3://b/inbox", "s3://b/out", "apiframe")
    entry = inbox.beat_entry(beat.parse_cron("*/5 * * * *"), target)["imagebatch-inbox"]
    assert entry["task"] == "imagebatch.inbox"
    assert entry["kwargs"] == {"inbox": "s3://b/inbox", "out": "s3://b/out", "provider": "apiframe"}
    assert entry["options"]["queue"] == "imagebatch"
    assert 290 <= entry["options"]["expires"] <= 310  # a pass not run before the next is dropped
    assert "imagebatch.inbox" in app.tasks
