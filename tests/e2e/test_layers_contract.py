"""The import contracts bite: ``lint-imports`` on a copy of the code with one import that
climbs a layer (the domain importing the runtime) fails and names it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def copy_of_the_code(target: Path) -> Path:
    for package in ("jobs", "worker"):
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def lint(where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"],
        cwd=where,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(where)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_contracts_hold_for_the_code_as_it_is(tmp_path: Path) -> None:
    result = lint(copy_of_the_code(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_the_domain_importing_the_runtime_breaks_the_layers_and_the_forbidden_contract(
    tmp_path: Path,
) -> None:
    code = copy_of_the_code(tmp_path)
    text = code / "jobs" / "text.py"
    text.write_text(text.read_text() + "\nfrom worker import runtime  # climbs two layers\n")
    result = lint(code)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "worker runs one way down its layers" in result.stdout
    assert "jobs.text -> worker.runtime" in result.stdout
    assert "the domain (jobs) never imports Celery, Redis or the runtime BROKEN" in result.stdout


def test_a_lower_worker_layer_importing_a_higher_one_breaks_the_layers(tmp_path: Path) -> None:
    code = copy_of_the_code(tmp_path)
    records = code / "worker" / "lines" / "records.py"
    records.write_text(records.read_text() + "\nfrom worker.batch import start  # climbs\n")
    result = lint(code)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "worker.lines.records -> worker.batch.start" in result.stdout
