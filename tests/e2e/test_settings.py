"""Settings a user meant to give: a misspelt ``IMAGEBATCH_*`` variable, in the environment or
in ``.env``, was ignored without a word (the defect: ``IMAGEBATCH_MAX_ATEMPTS=5`` ran with 3
attempts). Now each gets one warning naming the closest real setting, and the command still
runs."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import CATALOG, run_cli


def test_an_unknown_imagebatch_variable_gets_a_warning_naming_the_closest_setting(
    tmp_path: Path,
) -> None:
    # Given a typo in the environment and one in .env (beside a real setting and another tool's)
    (tmp_path / ".env").write_text(
        "IMAGEBATCH_QUALTY=high\nIMAGEBATCH_LOG_LEVEL=INFO\nOTHER_TOOL_SETTING=1\n"
    )
    env = {"IMAGEBATCH_MAX_ATEMPTS": "5", "IMAGEBATCH_RETRY_BASE_S": "0.05"}
    # When a command reads its settings
    result = run_cli("plan", str(CATALOG), "--provider", "simulator", env=env, cwd=tmp_path)
    # Then it runs, and warns once for each typo, naming the closest real setting
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, result.stderr
    assert "IMAGEBATCH_MAX_ATEMPTS" in warnings[0] and "IMAGEBATCH_MAX_ATTEMPTS" in warnings[0]
    assert "IMAGEBATCH_QUALTY" in warnings[1] and ".env" in warnings[1]
    assert "IMAGEBATCH_" in warnings[1].split("IMAGEBATCH_QUALTY", 1)[1], warnings[1]
    assert "OTHER_TOOL_SETTING" not in result.stderr


def test_with_json_logs_the_warning_is_a_json_object(tmp_path: Path) -> None:
    env = {"IMAGEBATCH_MAX_ATEMPTS": "5", "IMAGEBATCH_LOG_FORMAT": "json"}
    result = run_cli("plan", str(CATALOG), "--provider", "simulator", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert len(records) == 1, result.stderr
    assert records[0]["level"] == "WARNING"
    assert "IMAGEBATCH_MAX_ATTEMPTS" in records[0]["message"]
