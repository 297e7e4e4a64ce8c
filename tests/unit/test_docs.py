"""docs/architecture.md says what the code is: its key table is ``worker.redis.keys``'s
docstring, its status table is ``worker.lines.records.TABLE``, and every file and module it
names exists."""

from __future__ import annotations

import importlib.util
import re

from tests.harness import ROOT
from worker.lines.records import TABLE
from worker.redis import keys

DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def test_the_key_table_is_the_one_in_keys_py() -> None:
    assert keys.__doc__ is not None
    table = keys.__doc__[keys.__doc__.index("Per batch") :].rstrip()
    start = DOC.index("```\nPer batch") + len("```\n")
    assert DOC[start : DOC.index("```", start)].rstrip() == table


def test_the_status_table_is_records_table() -> None:
    rows = re.findall(r"^\| ([A-Z]+) \| (.+?) \| (.+?) \| (yes|no) \|$", DOC, re.M)
    assert {status for status, *_ in rows} == {status.name for status in TABLE}
    for status, step, _home, slot in rows:
        info = TABLE[next(s for s in TABLE if s.name == status)]
        assert step.startswith(info.step.value if info.step else "—"), status
        assert (slot == "yes") == info.holds_slot, status


def test_every_file_and_module_it_names_exists() -> None:
    paths = set(re.findall(r"`((?:jobs|worker|tests|bench|docs)/[\w/.]+\.(?:py|lua|md))", DOC))
    assert paths, "the document names no file"
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == []
    walk = DOC[DOC.index("### The walk") :]
    block = walk[walk.index("```\n") + 4 : walk.index("\n```", walk.index("```\n") + 4)]
    modules = [m.strip() for m in block.replace("\n", " ").split("→")]
    assert len(modules) == len(set(modules)), "a module named twice in the walk"
    assert [m for m in modules if importlib.util.find_spec(m) is None] == []
