"""Infrastructure that is missing or misconfigured is found before anything is spent.

An overnight ``imagebatch run`` started by cron must fail the same way whatever is wrong:
exit 2, one line on stderr that names the setting and how to fix it, no traceback (``--debug``
shows one), nothing submitted to the provider and nothing seeded in Redis. Each case runs the
real CLI against real servers (redis-server, SeaweedFS, the provider simulator over HTTP);
a closed port is ``free_port()``. Positive controls prove the same set-up spends when nothing
is wrong, so the "nothing submitted" assertions can fail.
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from jobs.simulator import Simulator, SimulatorConfig
from tests import servers
from tests.harness import ROOT, run_cli
from tests.servers import ManagedProcess, S3Server
from worker.redis.state import State

KEY = "afk_infrastructure_test_key"
QUICK = {
    # Fail fast: one boto attempt per call.
    "AWS_MAX_ATTEMPTS": "1",
}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.2)) as running:
        yield running


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "night.jsonl"
    path.write_text(json.dumps({"id": "one", "prompt": "a paper lantern", "quality": "low"}) + "\n")
    return path


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[tuple[str, str]]:
    """A redis-server that wants a password: (url without it, the password)."""
    executable = servers.find_redis_server()
    if executable is None:
        servers.unavailable("redis-server not found")
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="imagebatch-locked-redis-"))
    password = f"pw-{uuid.uuid4().hex}"
    port = servers.free_port()
    argv = [
        executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(workdir), "--requirepass", password,
    ]  # fmt: skip
    process = ManagedProcess.start("locked-redis", argv, workdir)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, password=password, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        servers._wait_until(up, process, 15)
        client.close()
        yield url, password
    finally:
        process.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def closed_redis() -> str:
    return f"redis://127.0.0.1:{servers.free_port()}/0"


def keys_in(url: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return list(client.scan_iter(count=1000))


@dataclass
class Case:
    """One broken piece of infrastructure: what to run, and what the one line must say."""

    args: list[str]
    env: dict[str, str]
    says: list[str]
    """Fragments the error line must contain (the setting to fix, what is wrong)."""
    secrets: list[str] = field(default_factory=list)
    """Values that must not be printed."""
    untouched: list[str] = field(default_factory=list)
    """Redis URLs that must still be empty afterwards (nothing seeded or queued)."""
    no_files: Path | None = None
    """A local directory that must stay empty."""


def run_args(source: Path | str, out: str) -> list[str]:
    return ["run", str(source), "--provider", "apiframe", "--out", out, "--batch-id", "night"]


def provider_env(sim: Simulator) -> dict[str, str]:
    return {
        "IMAGEBATCH_APIFRAME_API_KEY": KEY,
        "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
        **QUICK,
    }


Build = Callable[..., Case]


def broker_unreachable(sim: Simulator, manifest: Path, tmp_path: Path, **_: Any) -> Case:
    env = {**provider_env(sim), "IMAGEBATCH_BROKER_URL": closed_redis()}
    return Case(run_args(manifest, str(tmp_path / "out")), env, ["IMAGEBATCH_BROKER_URL"])


def broker_unreachable_state_up(
    sim: Simulator, manifest: Path, tmp_path: Path, redis_url: str, **_: Any
) -> Case:
    env = {
        **provider_env(sim),
        "IMAGEBATCH_BROKER_URL": closed_redis(),
        "IMAGEBATCH_REDIS_URL": redis_url,
    }
    return Case(
        run_args(manifest, str(tmp_path / "out")),
        env,
        ["IMAGEBATCH_BROKER_URL", "broker"],
        untouched=[redis_url],
    )


def state_unreachable(
    sim: Simulator, manifest: Path, tmp_path: Path, redis_url: str, **_: Any
) -> Case:
    env = {
        **provider_env(sim),
        "IMAGEBATCH_BROKER_URL": redis_url,
        "IMAGEBATCH_REDIS_URL": closed_redis(),
    }
    return Case(
        run_args(manifest, str(tmp_path / "out")),
        env,
        ["IMAGEBATCH_REDIS_URL"],
        untouched=[redis_url],
    )


def wrong_password(
    sim: Simulator, manifest: Path, tmp_path: Path, locked: tuple[str, str], **_: Any
) -> Case:
    url, password = locked
    wrong = f"wrong-{uuid.uuid4().hex}"
    env = {**provider_env(sim), "IMAGEBATCH_BROKER_URL": url.replace("//", f"//:{wrong}@")}
    return Case(
        run_args(manifest, str(tmp_path / "out")),
        env,
        ["IMAGEBATCH_BROKER_URL", "password"],
        secrets=[wrong, password],
        untouched=[url.replace("//", f"//:{password}@")],
    )


def missing_password(
    sim: Simulator, manifest: Path, tmp_path: Path, locked: tuple[str, str], **_: Any
) -> Case:
    url, password = locked
    env = {**provider_env(sim), "IMAGEBATCH_BROKER_URL": url}
    return Case(
        run_args(manifest, str(tmp_path / "out")),
        env,
        ["IMAGEBATCH_BROKER_URL", "needs a password"],
        secrets=[password],
        untouched=[url.replace("//", f"//:{password}@")],
    )


def s3_unreachable(sim: Simulator, manifest: Path, s3: S3Server, bucket: str, **_: Any) -> Case:
    env = {
        **provider_env(sim),
        **s3.env(),
        "IMAGEBATCH_S3_ENDPOINT_URL": f"http://127.0.0.1:{servers.free_port()}",
    }
    return Case(run_args(manifest, f"s3://{bucket}/runs"), env, ["IMAGEBATCH_S3_ENDPOINT_URL"])


def missing_bucket(sim: Simulator, manifest: Path, s3: S3Server, **_: Any) -> Case:
    name = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    env = {**provider_env(sim), **s3.env()}
    return Case(run_args(manifest, f"s3://{name}/runs"), env, [name, "create the bucket", "--out"])


def wrong_s3_secret(sim: Simulator, manifest: Path, s3: S3Server, bucket: str, **_: Any) -> Case:
    wrong = f"wrong{uuid.uuid4().hex}"
    env = {**provider_env(sim), **s3.env(), "AWS_SECRET_ACCESS_KEY": wrong}
    return Case(
        run_args(manifest, f"s3://{bucket}/runs"),
        env,
        ["AWS_SECRET_ACCESS_KEY", "refused"],
        secrets=[wrong, s3.secret_key],
    )


def unknown_s3_key_id(sim: Simulator, manifest: Path, s3: S3Server, bucket: str, **_: Any) -> Case:
    env = {**provider_env(sim), **s3.env(), "AWS_ACCESS_KEY_ID": "AKNOBODY0000000000"}
    return Case(
        run_args(manifest, f"s3://{bucket}/runs"),
        env,
        ["AWS_ACCESS_KEY_ID"],
        secrets=[s3.secret_key],
    )


def manifest_missing(sim: Simulator, tmp_path: Path, **_: Any) -> Case:
    missing = tmp_path / "not-there.jsonl"
    out = tmp_path / "out"
    return Case(run_args(missing, str(out)), provider_env(sim), [str(missing)], no_files=out)


def s3_manifest_missing(
    sim: Simulator, tmp_path: Path, s3: S3Server, bucket: str, **_: Any
) -> Case:
    uri = f"s3://{bucket}/inbox/not-there.jsonl"
    out = tmp_path / "out"
    env = {**provider_env(sim), **s3.env()}
    return Case(run_args(uri, str(out)), env, [uri, "does not exist"], no_files=out)


def out_under_a_file(sim: Simulator, manifest: Path, tmp_path: Path, **_: Any) -> Case:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    return Case(
        run_args(manifest, str(blocker / "out")), provider_env(sim), [str(blocker), "--out"]
    )


def out_in_proc(sim: Simulator, manifest: Path, **_: Any) -> Case:
    # /proc refuses new entries even to root, so this fails as the tests' root user too.
    out = f"/proc/imagebatch-{uuid.uuid4().hex[:8]}"
    return Case(run_args(manifest, out), provider_env(sim), [out, "--out"])


CASES: dict[str, Build] = {
    "broker unreachable": broker_unreachable,
    "broker unreachable, state Redis up": broker_unreachable_state_up,
    "state Redis unreachable, broker up": state_unreachable,
    "wrong Redis password": wrong_password,
    "Redis password missing": missing_password,
    "S3 endpoint unreachable": s3_unreachable,
    "bucket missing": missing_bucket,
    "wrong S3 secret key": wrong_s3_secret,
    "unknown S3 access key": unknown_s3_key_id,
    "manifest file missing": manifest_missing,
    "manifest s3 key missing": s3_manifest_missing,
    "out is under a regular file": out_under_a_file,
    "out is in /proc": out_in_proc,
}


@pytest.fixture
def context(
    request: pytest.FixtureRequest,
    sim: Simulator,
    manifest: Path,
    tmp_path: Path,
) -> dict[str, Any]:
    """What the case builders take; servers are only started for the cases that use them."""
    built: dict[str, Any] = {"sim": sim, "manifest": manifest, "tmp_path": tmp_path}
    name = request.node.callspec.params.get("case", "")
    needs = CASES[name].__code__.co_varnames if name else ()
    if "redis_url" in needs:
        built["redis_url"] = request.getfixturevalue("redis_url")
        request.getfixturevalue("redis_client")  # empty before the run
    if "locked" in needs:
        built["locked"] = request.getfixturevalue("locked_redis")
    if "s3" in needs:
        built["s3"] = request.getfixturevalue("s3")
        built["bucket"] = request.getfixturevalue("s3_bucket")
    return built


def only_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_broken_infrastructure_exits_2_with_one_line_and_spends_nothing(
    case: str, context: dict[str, Any], sim: Simulator
) -> None:
    # Given one broken piece of infrastructure
    setup = CASES[case](**context)
    # When an unattended run starts
    result = run_cli(*setup.args, env=setup.env, timeout=60)
    # Then it stops before spending, with one line naming the setting and the fix
    assert result.returncode == 2, result.stdout + result.stderr
    line = only_line(result.stderr)
    assert line.startswith("error: "), line
    assert "Traceback" not in result.stderr
    for fragment in setup.says:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    for secret in setup.secrets:
        assert secret not in result.stdout + result.stderr
    assert "progress" not in result.stdout and "done ·" not in result.stdout
    assert sim.ledger()["submits"] == 0
    for url in setup.untouched:
        assert keys_in(url) == [], f"{url} was written to"
    if setup.no_files is not None:
        assert not setup.no_files.exists() or not any(setup.no_files.iterdir())


def test_debug_shows_the_traceback_and_still_exits_2(
    sim: Simulator, manifest: Path, tmp_path: Path
) -> None:
    setup = broker_unreachable(sim, manifest, tmp_path)
    result = run_cli(*setup.args, "--debug", env=setup.env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: cannot reach Redis")
    assert sim.ledger()["submits"] == 0


def test_control_the_same_embedded_s3_setup_spends_when_nothing_is_broken(
    sim: Simulator, manifest: Path, s3: S3Server, s3_bucket: str
) -> None:
    """Without this, "0 submits" above could hold because nothing ever runs."""
    env = {**provider_env(sim), **s3.env()}
    result = run_cli(*run_args(manifest, f"s3://{s3_bucket}/runs"), env=env, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sim.ledger()["submits"] == 1


def test_control_a_working_broker_and_state_redis_accept_the_batch(
    sim: Simulator, manifest: Path, tmp_path: Path, redis_url: str, redis_client: Any
) -> None:
    env = {
        **provider_env(sim),
        "IMAGEBATCH_BROKER_URL": redis_url,
        "IMAGEBATCH_REDIS_URL": redis_url,
    }
    args = ["submit", str(manifest), "--provider", "apiframe", "--out", str(tmp_path / "o")]
    result = run_cli(*args, "--batch-id", "night", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert keys_in(redis_url), "the working set-up seeded nothing"


# --- submit, relative --out, the simulator's surfaces ---------------------------------------


def test_submit_refuses_a_batch_no_worker_could_process(
    manifest: Path, tmp_path: Path, redis_url: str, redis_client: Any
) -> None:
    """``--provider simulator`` on a broker: remote workers cannot reach a simulator this
    command would start, so the batch must name one (IMAGEBATCH_SIMULATOR_BASE_URL)."""
    env = {"IMAGEBATCH_BROKER_URL": redis_url}
    args = ["submit", str(manifest), "--provider", "simulator", "--out", str(tmp_path / "o")]
    result = run_cli(*args, env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "IMAGEBATCH_SIMULATOR_BASE_URL" in only_line(result.stderr)
    assert keys_in(redis_url) == []
    assert not (tmp_path / "o").exists()


def test_a_relative_out_is_stored_and_shown_as_an_absolute_path(tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    source = work / "m.jsonl"
    source.write_text(json.dumps({"id": "rel", "prompt": "a red kite", "quality": "low"}) + "\n")
    # (with JSON logs on: stdout stays the command's result; stderr is the JSON log)
    result = run_cli(
        "run", "m.jsonl", "--provider", "simulator", "--out", "./relative", "--batch-id", "rel",
        cwd=work, env={"IMAGEBATCH_LOG_FORMAT": "json"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(json.loads(line)["batch"] == "rel" for line in result.stderr.splitlines())
    where = (work / "relative" / "rel").resolve()
    assert f"out → {where}/" in result.stdout
    summary = json.loads((where / "summary.json").read_text())
    assert summary["out"] == str(where)
    assert summary["results_uri"] == str(where / "results.jsonl")
    # status from anywhere else shows the absolute location
    shown = run_cli("status", "rel", "--out", str(work / "relative"), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert str(where) in shown.stdout, shown.stdout


SURFACE = re.compile(r"(APIFrame|OpenAI|AI/ML API|Omixa|Oxen) (?:at|under) `?(/[a-z0-9]+)`?")
PROBES = {
    # One real endpoint of each surface, relative to where it is said to be served.
    "APIFrame": "/images/generate",
    "OpenAI": "/v1/images/generations",
    "AI/ML API": "/v1/images/generations",
    "Omixa": "/api/v1/images/generations",
    "Oxen": "/api/ai/images/generate",
}


def test_simulate_help_and_the_readme_agree_on_each_surface_and_the_simulator_serves_it() -> None:
    help_text = " ".join(run_cli("simulate", "--help").stdout.split())
    readme = " ".join((ROOT / "README.md").read_text().split())
    said_by_help = dict(SURFACE.findall(help_text))
    row = next(line for line in readme.split("| `imagebatch simulate") if "/_sim/" in line)
    said_by_readme = dict(SURFACE.findall(row))
    assert set(said_by_help) == set(PROBES), help_text
    assert said_by_help == said_by_readme
    # Any other location the help names for APIFrame ("also under /apiframe") must work too.
    extra = re.findall(r"also under (/[a-z0-9]+)", help_text)
    with Simulator(SimulatorConfig(latency_s=0.1)) as sim:
        for name, prefix in said_by_help.items():
            for where in [prefix, *(e + prefix for e in extra if name == "APIFrame")]:
                # Served means the API answers (a 4xx about the request), not a route miss
                answer = httpx.post(
                    sim.base_url + where + PROBES[name],
                    json={"prompt": "x"},
                    headers={"X-API-Key": KEY, "Authorization": f"Bearer {KEY}"},
                    timeout=10,
                )
                assert answer.status_code != 404, (name, where, answer.text)


def test_health_answers_for_this_hosts_workers_however_many_share_it(
    redis_client: redis.Redis[Any], redis_url: str
) -> None:
    env = {"IMAGEBATCH_BROKER_URL": redis_url}
    state = State(redis.Redis.from_url(redis_url, decode_responses=True))

    alone = run_cli("health", "--worker", env=env)
    state.worker_alive(socket.gethostname(), 4242, ttl=60)
    state.worker_alive(socket.gethostname(), 4243, ttl=60)
    seen = run_cli("health", "--worker", env=env)

    assert alone.returncode == 1 and "no heartbeat" in alone.stderr, alone.stderr
    assert seen.returncode == 0 and seen.stdout.strip() == "ok", seen.stderr
    assert state.workers_alive() == 2
    assert run_cli("health", env={"IMAGEBATCH_BROKER_URL": "redis://127.0.0.1:9/0"}).returncode == 2
