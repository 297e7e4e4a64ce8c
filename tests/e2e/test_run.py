"""``imagebatch run`` on the embedded default: what a user sees on a fresh machine."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from tests.harness import ROOT, check_invariants, read_local, run_batch, run_cli

CATALOG = ROOT / "examples" / "catalog.jsonl"
BAD = ROOT / "examples" / "bad.jsonl"


def test_catalog_runs_on_the_embedded_default_and_writes_every_output(tmp_path: Path) -> None:
    result = run_batch(
        CATALOG,
        "simulator",
        str(tmp_path),
        "catalog-test",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done · 20 succeeded · 0 failed · 0 rejected" in result.stdout
    outcome = read_local(tmp_path, "catalog-test")
    check_invariants(CATALOG, outcome)
    assert [row.status for row in outcome.rows] == ["succeeded"] * 20
    requested = [json.loads(line) for line in CATALOG.read_text().splitlines()]
    for row, line in zip(outcome.rows, requested, strict=True):
        assert row.id == line["id"] and row.metadata == line["metadata"]
        assert len(row.images) == line.get("n", 1)
        width, height = map(int, line["size"].split("x"))
        for image in row.images:
            assert (image.width, image.height) == (width, height)
            assert image.content_type == f"image/{line['output_format']}"
            with Image.open(image.uri) as stored:
                assert stored.size == (width, height)
    assert outcome.summary["credits"] == 552 and outcome.summary["credit_unit"] == "credits"


def test_plan_estimate_equals_the_credits_a_clean_run_spends(tmp_path: Path) -> None:
    plan = run_cli("plan", CATALOG, "--provider", "simulator")
    assert plan.returncode == 0, plan.stderr
    estimate = float(re.search(r"est\. ([\d.]+) credits", plan.stdout).group(1))  # type: ignore[union-attr]
    run_batch(CATALOG, "simulator", str(tmp_path), "b1")
    assert read_local(tmp_path, "b1").summary["credits"] == estimate == 552


def test_bad_lines_are_rejected_with_line_and_reason_and_good_lines_still_run(
    tmp_path: Path,
) -> None:
    result = run_batch(str(BAD), "simulator", str(tmp_path), "bad")
    assert result.returncode == 1, result.stdout + result.stderr
    outcome = read_local(tmp_path, "bad")
    check_invariants(BAD, outcome)
    by_line = {row.line: row for row in outcome.rows}
    assert {n for n, row in by_line.items() if row.status == "succeeded"} == {2, 10}
    expected = {
        3: "unknown field 'qualty' (did you mean 'quality'?)",
        4: "size '1000x1000' is not one of auto, 1024x1024, 1536x1024, 1024x1536",
        5: "prompt is required",
        6: "less than or equal to 10",
        7: "id must be",
        8: "not valid JSON",
        9: "id 'ok-1' repeats an earlier line's id",
    }
    for line, reason in expected.items():
        row = by_line[line]
        assert row.status == "rejected" and row.error is not None
        assert reason in row.error.message
        assert f"bad.jsonl:{line}: rejected: " in result.stderr
    assert by_line[3].prompt == "a blue kettle"


def test_strict_refuses_the_whole_manifest_and_submits_nothing(tmp_path: Path) -> None:
    result = run_cli(
        "run",
        str(BAD),
        "--provider",
        "simulator",
        "--strict",
        "--out",
        str(tmp_path),
        "--batch-id",
        "strict",
    )
    assert result.returncode == 2
    assert "nothing was submitted" in result.stderr
    assert not (tmp_path / "strict").exists()


def test_no_provider_and_no_key_exits_2_and_says_how_to_pick_one(tmp_path: Path) -> None:
    result = run_cli("run", CATALOG, "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: no provider key: set IMAGEBATCH_APIFRAME_API_KEY, or use --provider "
        "simulator to try it out"
    )
    assert not list(tmp_path.iterdir())


def test_manifest_from_stdin(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.harness import cli_env

    line = b'{"id": "one", "prompt": "a kite", "size": "1024x1024", "output_format": "png"}\n'
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "run",
            "-",
            "--provider",
            "simulator",
            "--out",
            str(tmp_path),
            "--batch-id",
            "stdin",
        ],
        input=line,
        env=cli_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [row.id for row in read_local(tmp_path, "stdin").rows] == ["one"]
