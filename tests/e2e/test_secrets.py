"""The provider key is a secret: it must not reach any output, log, object or Redis value.

A distinctive key (``afk_SECRET_`` + random hex) is used for a whole fleet run with faults on
(5xx, 429, a content-policy line), the worker logging at DEBUG. Then every place the run
wrote to is searched: CLI stdout/stderr, the worker log, every object in the bucket, and
every Redis key and value, snapshotted mid-run and at the end (Celery's queues and unacked
messages included, their base64 bodies decoded). The search is proven able to find the key
by planting it into a copy of the same data.
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from jobs.errors import ImagebatchError
from jobs.manifest.request import ImageRequest
from jobs.providers import adapter_class
from jobs.registry import REGISTRY
from jobs.settings import PROVIDER_NAMES, Settings
from jobs.simulator import Faults, Simulator, SimulatorConfig
from tests.harness import CLI, check_invariants, cli_env, read_s3, run_cli, stop, wait_for
from tests.servers import S3Server
from worker.redis import keys

BATCH = "secrets"


def new_key() -> str:
    return f"afk_SECRET_{uuid.uuid4().hex}"


# -- finding a secret, in any of the forms it could be written in ------------------------------


def needles(secret: str) -> list[bytes]:
    """The key, its random part, and the key as it reads inside base64 at any alignment."""
    raw = secret.encode()
    found = [raw, secret.removeprefix("afk_SECRET_").encode()]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        # Drop the characters that also depend on the neighbouring bytes.
        start = (offset * 4 + 2) // 3 + 1
        found.append(encoded[start : len(encoded) - 4])
    return found


def decoded_forms(value: bytes) -> Iterable[bytes]:
    """A value and, when it is a kombu message, its base64-decoded body."""
    yield value
    try:
        message = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return
    stack = [message]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
            body = item.get("body")
            if isinstance(body, str):
                try:
                    yield base64.b64decode(body, validate=True)
                except ValueError:
                    yield body.encode()
        elif isinstance(item, str) and item.startswith(("{", "[")):
            yield from decoded_forms(item.encode())


def leaks(secret: str, places: dict[str, bytes]) -> list[str]:
    """The names of the places where the secret appears in any form."""
    searched = needles(secret)
    return sorted(
        name
        for name, data in places.items()
        if any(n in form for form in decoded_forms(data) for n in searched)
    )


def redis_snapshot(url: str, label: str) -> dict[str, bytes]:
    """Every key and value of every database in use, read by type (no DUMP)."""
    places: dict[str, bytes] = {}
    with redis.Redis.from_url(url) as client:
        databases = list(client.info("keyspace"))
    for db in databases:
        with redis.Redis.from_url(url, db=int(str(db)[2:])) as conn:
            places.update(read_database(conn, f"redis[{label}] {db}"))
    return places


def read_database(conn: redis.Redis[bytes], label: str) -> dict[str, bytes]:
    places: dict[str, bytes] = {}
    for key in conn.scan_iter(count=1000):
        name = f"{label} {key!r}"
        places[name + " (key)"] = key
        kind = conn.type(key).decode()  # type: ignore[no-untyped-call]
        values: list[bytes] = []
        if kind == "string":
            values = [conn.get(key) or b""]
        elif kind == "list":
            values = list(conn.lrange(key, 0, -1))
        elif kind == "hash":
            values = [part for pair in conn.hgetall(key).items() for part in pair]
        elif kind == "zset":
            values = list(conn.zrange(key, 0, -1))
        elif kind == "set":
            values = list(conn.smembers(key))
        elif kind == "stream":
            values = [
                part for _, fields in conn.xrange(key) for pair in fields.items() for part in pair
            ]
        for k, value in enumerate(values):
            places[f"{name} [{kind} {k}]"] = value
    return places


def bucket_objects(s3: S3Server, bucket: str) -> dict[str, bytes]:
    places = {}
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            got = s3.client.get_object(Bucket=bucket, Key=item["Key"])
            places[f"s3://{bucket}/{item['Key']}"] = (
                item["Key"].encode() + b"\n" + got["Body"].read()
            )
    return places


def test_the_search_finds_the_key_in_every_form_it_could_be_written_in() -> None:
    key = new_key()
    message = {"body": base64.b64encode(json.dumps({"args": [key]}).encode()).decode()}
    places = {
        "plain": f"header X-API-Key: {key}\n".encode(),
        "random part only": key.removeprefix("afk_SECRET_")[:32].encode(),
        "kombu message": json.dumps(message).encode(),
        "nested json string": json.dumps({"payload": json.dumps(message)}).encode(),
        **{
            f"base64 at offset {k}": base64.b64encode(b"x" * k + key.encode() + b"y")
            for k in range(3)
        },
        "clean": b"afk_SECRET_ only the prefix, and another key " + new_key().encode(),
    }
    assert leaks(key, places) == sorted(set(places) - {"clean"})


# -- a fleet run, searched everywhere -------------------------------------------------------


def manifest(path: Path) -> Path:
    lines = [
        {"id": f"s-{k}", "prompt": f"Secrets test: a glass bottle, variant {k}", "quality": "low"}
        for k in range(10)
    ]
    lines.append({"id": "s-policy", "prompt": "[[policy]] a flagged prompt", "quality": "low"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_key_is_in_no_output_log_object_or_redis_value_of_a_fleet_run(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[bytes], s3: S3Server, s3_bucket: str
) -> None:
    key = new_key()
    source = manifest(tmp_path / "secrets.jsonl")
    faults = Faults(seed=11, error_5xx=0.15, error_429=0.05)
    places: dict[str, bytes] = {}
    with Simulator(SimulatorConfig(latency_s=1.0, latency_jitter_s=0.5, faults=faults)) as sim:
        env = {
            "IMAGEBATCH_BROKER_URL": redis_url,
            "IMAGEBATCH_APIFRAME_API_KEY": key,
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_OUT": f"s3://{s3_bucket}/runs",
            **s3.env(),
        }
        # Given a batch submitted with the key in the environment
        submitted = run_cli(
            "submit", str(source), "--provider", "apiframe", "--batch-id", BATCH, env=env
        )
        places["submit stdout"] = submitted.stdout.encode()
        places["submit stderr"] = submitted.stderr.encode()
        assert submitted.returncode == 0, submitted.stderr
        places.update(redis_snapshot(redis_url, "queued"))

        # When a worker logging at DEBUG runs it
        log = tmp_path / "worker.log"
        with open(log, "wb") as handle:
            worker = subprocess.Popen(
                [*CLI, "worker", "--concurrency=4", "--hostname=secrets@%h", "--loglevel=DEBUG"],
                env=cli_env(env),
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        try:

            def in_flight() -> bool:
                for item in redis_client.scan_iter(match=keys.line_pattern(BATCH)):
                    if redis_client.hget(item, "status") in (b"submitted", b"fetched"):
                        return True
                return False

            wait_for(in_flight, 30, "a line with a provider job in flight", interval=0.05)
            places.update(redis_snapshot(redis_url, "mid-run"))
            snapshots = 1

            def finished() -> bool:
                nonlocal snapshots
                status = run_cli("status", BATCH, env=env)
                places[f"status {snapshots} stdout"] = status.stdout.encode()
                places[f"status {snapshots} stderr"] = status.stderr.encode()
                places.update(redis_snapshot(redis_url, f"poll {snapshots}"))
                snapshots += 1
                assert status.returncode == 0, status.stderr
                return "finished" in status.stdout

            wait_for(finished, 90, "the batch to finish", interval=0.5)
        finally:
            stop(worker)
        ledger = sim.ledger()
    places.update(redis_snapshot(redis_url, "end"))
    places["worker log"] = log.read_bytes()
    objects = bucket_objects(s3, s3_bucket)
    places.update(objects)

    # The run really used the key, met the faults, and kept every line
    outcome = read_s3(s3.client, s3_bucket, "runs", BATCH)
    check_invariants(source, outcome, ledger, redis_client)
    assert ledger["submits"] >= 10, "the key was not accepted"
    assert any(k.endswith((" 503", " 429")) for k in ledger["requests"]), ledger["requests"]
    policy = next(row for row in outcome.rows if row.id == "s-policy")
    assert policy.status == "failed" and policy.error is not None
    assert b"DEBUG" in places["worker log"], "the worker did not log at DEBUG"
    assert any(".state/" in name for name in objects) and any(
        name.endswith("manifest.jsonl") for name in objects
    ), sorted(objects)
    assert sum(1 for name in places if name.startswith("redis[mid-run]")) > 5
    assert any("unacked" in name or "imagebatch" in name for name in places), "no Celery keys"

    kinds = {
        "places": len(places),
        "redis snapshots": snapshots + 2,
        "redis values": sum(1 for name in places if name.startswith("redis[")),
        "celery keys": sorted(
            {
                n.split("] ", 1)[1].split(" ")[1]
                for n in places
                if n.startswith("redis[") and "ib:" not in n
            }
        ),
        "s3 objects": len(objects),
        "worker log bytes": len(places["worker log"]),
    }
    print("secrets scan:", json.dumps(kinds, indent=1))

    # Then the key appears nowhere
    assert leaks(key, places) == []
    # ... and the search would have found it, in any of these places
    for name in (
        "worker log",
        "submit stdout",
        next(iter(objects)),
        next(n for n in places if n.startswith("redis[mid-run]")),
    ):
        planted = {**places, name: places[name] + b" " + key.encode()}
        assert leaks(key, planted) == [name]


# -- settings, configs and error messages ---------------------------------------------------


def test_settings_and_provider_configs_never_show_a_key() -> None:
    keys = {name: new_key() for name in PROVIDER_NAMES}
    api_keys: dict[str, Any] = {
        f"{REGISTRY[name].field}_api_key": key for name, key in keys.items()
    }
    settings = Settings(**api_keys)
    shown = [repr(settings), str(settings), f"{settings}", settings.model_dump_json()]
    shown.append(json.dumps(settings.model_dump(mode="json")))
    for name, key in keys.items():
        config = settings.provider_config(name)
        assert config.api_key is not None and config.api_key.get_secret_value() == key
        shown += [repr(config), str(config), f"{config!r}", repr(config.api_key)]
    text = "\n".join(shown).encode()
    for key in keys.values():
        assert leaks(key, {"shown": text}) == []


def test_a_configuration_error_exits_2_naming_the_setting_without_printing_the_key(
    tmp_path: Path,
) -> None:
    key = new_key()
    source = manifest(tmp_path / "m.jsonl")
    env = {"IMAGEBATCH_APIFRAME_API_KEY": key, "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "0"}
    result = run_cli("run", str(source), "--provider", "apiframe", "--out", str(tmp_path), env=env)
    assert leaks(key, {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}) == []
    # The contract: a configuration error names the setting, exits 2, and spends nothing
    assert result.returncode == 2, result.stderr
    assert "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def echoing(status: int) -> httpx.MockTransport:
    """A provider that quotes the credentials it was sent back in its error message."""

    def handler(request: httpx.Request) -> httpx.Response:
        sent = request.headers.get("x-api-key") or request.headers.get("authorization", "")
        message = f"Incorrect API key provided: {sent}"
        return httpx.Response(status, json={"error": {"message": message, "code": "invalid"}})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("name", "status"),
    [*((name, 401) for name in PROVIDER_NAMES), ("apiframe", 400), ("apiframe", 503)],
)
def test_a_provider_error_that_quotes_the_key_does_not_carry_it_into_the_error(
    name: str, status: int
) -> None:
    # Given a provider whose error message echoes the credentials of the request
    key = new_key()
    field = REGISTRY[name].field
    fields: dict[str, Any] = {f"{field}_api_key": key, f"{field}_base_url": "https://provider.test"}
    settings = Settings(**fields)
    config = settings.provider_config(name)
    cls = adapter_class(REGISTRY[name])
    adapter = cls(config, client=httpx.Client(transport=echoing(status)))  # type: ignore[call-arg]
    # When a submit fails (a group provider's: the upload of a group's input file)
    with pytest.raises(ImagebatchError) as caught:
        if REGISTRY[name].group:
            adapter.api.upload("g.jsonl", [b"{}\n"], size=3)  # type: ignore[attr-defined]
        else:
            adapter.submit(ImageRequest(prompt="a kettle", quality="low"), "idem-key-1")
    error = caught.value
    # Then the error (which ends up in the result row, the log and the terminal) has no key
    shown = f"{error.message}\n{error}\n{error!r}\n{json.dumps(error.as_row_error())}"
    assert str(status) in error.message
    assert leaks(key, {"error": shown.encode()}) == [], shown
