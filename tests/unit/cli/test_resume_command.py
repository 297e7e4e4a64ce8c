"""The command an interrupted or stranded run prints to resume its batch parses as the CLI
takes it (the defect: ``imagebatch retry ds1 --batch-id ds1``: retry has no --batch-id)."""

from __future__ import annotations

import shlex

import click
import pytest

from worker.cli import main
from worker.cli.follow import resume_command


def parses(command: str) -> click.Context:
    """Parse ``command`` with the real CLI, as the shell would hand it over."""
    program, name, *rest = shlex.split(command)
    assert program == "imagebatch"
    return main.commands[name].make_context(name, rest)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["imagebatch", "retry", "ds1"], "imagebatch retry ds1 --out /srv/out"),
        (
            ["imagebatch", "retry", "ds1", "--out", "/srv/out"],
            "imagebatch retry ds1 --out /srv/out",
        ),
        (
            ["imagebatch", "run", "cat.jsonl", "--provider", "simulator"],
            "imagebatch run cat.jsonl --provider simulator --batch-id ds1",
        ),
        (
            ["imagebatch", "run", "c.jsonl", "--batch-id=ds1"],
            "imagebatch run c.jsonl --batch-id=ds1",
        ),
        (
            ["imagebatch", "run", "-", "--provider", "simulator"],
            "imagebatch retry ds1 --out /srv/out",
        ),
        (["imagebatch", "submit", "c.jsonl"], "imagebatch submit c.jsonl --batch-id ds1"),
    ],
)
def test_the_printed_resume_command_parses(argv: list[str], expected: str) -> None:
    command = resume_command(argv, "ds1", "/srv/out")
    assert command == expected
    ctx = parses(command)
    assert ctx.params.get("batch_id") == "ds1"
