"""A manifest the CLI cannot read (an S3 connection cut mid-body) leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

from tests.servers import S3Server


def test_a_manifest_that_cannot_be_read_leaves_no_temp_file_behind(
    aws_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """The defect: a failed read left a 0-byte ``imagebatch-manifest-*`` file in the temp dir."""
    import os
    import subprocess
    import sys

    from tests.harness import cli_env

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = cli_env({**os.environ, "TMPDIR": str(scratch)})
    source = f"s3://{s3_bucket}/missing.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "run",
            source,
            "--provider",
            "simulator",
            "--out",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "does not exist" in result.stderr, result.stderr
    assert [p.name for p in scratch.iterdir() if p.name.startswith("imagebatch-manifest")] == []
