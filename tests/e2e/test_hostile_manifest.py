"""A manifest written by someone careless or hostile: every bad line is rejected with its
physical line number and a reason naming the field, the good lines still run, and nothing
is written outside ``OUT/BATCH/images/``."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.harness import check_invariants, counted_lines, read_local, run_batch

BATCH = "hostile"
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Spec:
    data: bytes
    reason: tuple[str, ...] = ()
    """Substrings the rejection reason must contain; empty for a good or skipped line."""
    good: bool = False


def obj(**fields: object) -> bytes:
    return json.dumps(fields).encode()


GOOD = [
    Spec(obj(id="good-1", prompt="a red kettle", size="1024x1024", output_format="png"), good=True),
    Spec(
        obj(
            id="good-2",
            prompt="un café ☕ à Tōkyō — 東京",
            size="1536x1024",
            output_format="jpeg",
            metadata={"sku": "ü-1", "nested": {"a": [1, 2]}},
        ),
        good=True,
    ),
    Spec(obj(id="good-3", prompt="a blue vase", n=2, output_format="webp"), good=True),
    Spec(obj(prompt="a line with no id gets one derived from its content"), good=True),
]
BAD = [
    Spec(b'{"id": "bad-json", "prompt": ', ("not valid JSON",)),
    Spec(b'{"id": "latin-1", "prompt": "caf\xe9"}', ("not valid UTF-8",)),
    Spec(obj(id="long", prompt="x" * (1024 * 1024 + 10)), ("over 1048576 bytes",)),
    Spec(obj(id="no-prompt", size="1024x1024"), ("prompt is required",)),
    Spec(obj(id="empty-prompt", prompt=""), ("prompt",)),
    Spec(obj(id="blank-prompt", prompt="   \t "), ("prompt is empty",)),
    Spec(
        obj(id="bad-size", prompt="p", size="1000x1000"),
        ("size '1000x1000' is not one of auto, 1024x1024, 1536x1024, 1024x1536",),
    ),
    Spec(obj(id="bad-quality", prompt="p", quality="ultra"), ("quality 'ultra' is not one of",)),
    Spec(
        obj(id="bad-format", prompt="p", output_format="gif"),
        ("output_format 'gif' is not one of png, jpeg, webp",),
    ),
    Spec(obj(id="n-zero", prompt="p", n=0), ("n 0", "greater than or equal to 1")),
    Spec(obj(id="n-eleven", prompt="p", n=11), ("n 11", "less than or equal to 10")),
    Spec(obj(id="n-string", prompt="p", n="2"), ("n '2'", "integer")),
    Spec(obj(id="good-1", prompt="another kettle"), ("id 'good-1' repeats an earlier line's id",)),
    Spec(obj(id="../x", prompt="p"), ("id must be",)),
    Spec(obj(id="/etc/passwd", prompt="p"), ("id must be",)),
    Spec(obj(id="a\\b", prompt="p"), ("id must be",)),
    Spec(obj(id="a\u0001b", prompt="p"), ("id must be",)),
    Spec(obj(id="s\u0430mple", prompt="p"), ("id must be",)),  # Cyrillic small a (U+0430)
    Spec(obj(id="..", prompt="p"), ("id must be",)),
    Spec(obj(id=".", prompt="p"), ("id must be",)),
    Spec(obj(id="", prompt="p"), ("id must be",)),
    Spec(obj(id="x" * 129, prompt="p"), ("id must be",)),
    Spec(obj(id=7, prompt="p"), ("id",)),
    Spec(
        obj(id="typo", prompt="p", qualty="high"),
        ("unknown field 'qualty' (did you mean 'quality'?)",),
    ),
    Spec(obj(id="meta-str", prompt="p", metadata="sku-1"), ("metadata",)),
    Spec(obj(id="meta-list", prompt="p", metadata=[1, 2]), ("metadata",)),
    Spec(b"[1, 2, 3]", ("not a JSON object",)),
    Spec(b'"just a string"', ("not a JSON object",)),
    Spec(b"null", ("not a JSON object",)),
]
SKIPPED = [Spec(b""), Spec(b"   \t"), Spec(b"# a comment"), Spec(b"   # indented comment")]


def build(path: Path) -> dict[int, Spec]:
    """Write the manifest (BOM, CRLF, blanks and comments between lines); returns line specs."""
    order = [
        GOOD[0],
        SKIPPED[0],
        *BAD[:6],
        SKIPPED[2],
        GOOD[1],
        *BAD[6:14],
        SKIPPED[1],
        GOOD[2],
        *BAD[14:24],
        SKIPPED[3],
        *BAD[24:],
        GOOD[3],
    ]
    physical = [spec.data for spec in order]
    physical[0] = BOM + physical[0]
    # CRLF line ends; the last line has no line end at all.
    path.write_bytes(b"\r\n".join(physical))
    return {number: spec for number, spec in enumerate(order, start=1)}


def test_every_hostile_line_is_rejected_with_its_line_and_reason_and_good_lines_run(
    tmp_path: Path,
) -> None:
    # Given a hostile manifest
    manifest = tmp_path / "hostile.jsonl"
    specs = build(manifest)
    bad = {n: s for n, s in specs.items() if s.reason}
    good = {n for n, s in specs.items() if s.good}
    assert counted_lines(manifest) == sorted([*bad, *good])
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    # When it runs
    result = run_batch(
        manifest,
        "simulator",
        str(out),
        BATCH,
        cwd=cwd,
        timeout=90,
    )

    # Then the run finishes with exit 1 and one row per counted line
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    outcome = read_local(out, BATCH)
    check_invariants(manifest, outcome)
    rows = {row.line: row for row in outcome.rows}
    statuses = Counter(row.status for row in outcome.rows)
    assert statuses == {"succeeded": len(good), "rejected": len(bad)}, statuses

    # Every bad line is rejected with its physical line number and a reason naming the field
    for number, spec in bad.items():
        row = rows[number]
        assert row.status == "rejected" and row.error is not None, (number, row)
        assert row.error.type == "rejected" and not row.error.retryable
        for part in spec.reason:
            assert part in row.error.message, (number, row.error.message)
        assert not row.images and row.credits == 0 and row.job_id is None
    # ... and stderr says FILE:LINE: rejected: REASON for each, one line each
    reported = [
        line for line in result.stderr.splitlines() if re.match(r".*:\d+: rejected: ", line)
    ]
    assert len(reported) == len(bad), reported
    for number in bad:
        prefix = f"{manifest}:{number}: rejected: "
        matching = [line for line in reported if line.startswith(prefix)]
        assert len(matching) == 1, (number, matching)
        assert matching[0] == prefix + rows[number].error.message  # type: ignore[union-attr]
    assert "\x1b" not in result.stderr and "\x1b" not in result.stdout
    assert not any(line.startswith("evil.jsonl") for line in result.stderr.splitlines())

    # The good lines run, with their own ids, metadata untouched
    for number in good:
        row = rows[number]
        assert row.status == "succeeded" and row.images, row
        assert row.error is None
    assert rows[min(good)].id == "good-1"  # the BOM did not become part of the line
    by_id = {row.id: row for row in outcome.rows if row.status == "succeeded"}
    assert by_id["good-2"].metadata == {"sku": "ü-1", "nested": {"a": [1, 2]}}
    assert by_id["good-2"].prompt == "un café ☕ à Tōkyō — 東京"
    assert len(by_id["good-3"].images) == 2
    derived = rows[max(good)].id
    assert derived is not None and re.fullmatch(r"line-[0-9a-f]{16}", derived), derived

    # Nothing was written outside OUT/BATCH: images only under OUT/BATCH/images/
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "hostile.jsonl", "out"]
    assert [p.name for p in out.iterdir()] == [BATCH]
    root = out / BATCH
    allowed_top = {
        "results.jsonl",
        "failed.jsonl",
        "summary.json",
        "manifest.jsonl",
        "report.html",
    }
    allowed_state = {".state/batch.json", ".state/rejected.jsonl", ".state/write-check"}
    for path in root.rglob("*"):
        if path.is_dir():
            continue
        relative = path.relative_to(root).as_posix()
        if relative.startswith("images/"):
            line_id, name = relative.removeprefix("images/").split("/")
            assert line_id in by_id and re.fullmatch(r"\d+\.(png|jpeg|webp)", name), relative
        elif relative.startswith("report/thumbs/"):
            line_id, _, name = relative.removeprefix("report/thumbs/").rpartition("-")
            assert line_id in by_id and re.fullmatch(r"\d+\.webp", name), relative
        elif relative.startswith(".state/parts/"):
            assert re.fullmatch(r"\d{6}\.jsonl", relative.removeprefix(".state/parts/")), relative
        elif relative.startswith(".state/stored/"):
            assert re.fullmatch(r"\d{6}\.tsv", relative.removeprefix(".state/stored/")), relative
        elif relative.startswith(".state/"):
            assert relative in allowed_state, relative
        else:
            assert relative in allowed_top, relative
    stored = {key.split("/")[0] for key in outcome.objects}
    assert stored == set(by_id)


def run_small(tmp_path: Path, lines: list[bytes]) -> tuple[Path, object]:
    manifest = tmp_path / "small.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    result = run_batch(
        manifest,
        "simulator",
        str(tmp_path / "out"),
        "small",
        timeout=60,
    )
    return manifest, result


def test_a_lone_surrogate_escape_is_rejected_and_does_not_take_the_run_down(
    tmp_path: Path,
) -> None:
    # Given lines whose JSON is valid but whose strings are not Unicode text (lone surrogate
    # escapes), in the prompt of one line and in the metadata of an otherwise valid line
    lines = [
        obj(id="fine", prompt="a green lamp"),
        b'{"id": "surrogate-prompt", "prompt": "ok \\ud800 lone"}',
        b'{"id": "surrogate-meta", "prompt": "ok", "metadata": {"k": "\\udfff"}}',
        b'{"id": "surrogate-params", "prompt": "ok", "provider_params": {"k": "\\ud83d"}}',
        obj(id="fine-2", prompt="a green chair"),
    ]
    # When the manifest runs
    manifest, result = run_small(tmp_path, lines)
    # Then those lines are rejected (with their line and field), the others still run
    assert "Traceback" not in result.stderr, result.stderr[-2000:]  # type: ignore[attr-defined]
    assert result.returncode == 1, result.stderr  # type: ignore[attr-defined]
    outcome = read_local(tmp_path / "out", "small")
    check_invariants(manifest, outcome)
    by_line = {row.line: row for row in outcome.rows}
    assert [by_line[n].status for n in (1, 5)] == ["succeeded", "succeeded"]
    for number, field in ((2, "prompt"), (3, "metadata"), (4, "provider_params")):
        row = by_line[number]
        assert row.status == "rejected" and row.error is not None, row
        assert field in row.error.message or "surrogate" in row.error.message, row.error
        assert f"small.jsonl:{number}: rejected: " in result.stderr  # type: ignore[attr-defined]


def test_a_field_name_with_control_characters_cannot_forge_or_colour_stderr_lines(
    tmp_path: Path,
) -> None:
    # Given an unknown field whose name holds an ANSI escape and a newline that imitates the
    # rejection report of another file
    forged = "\u001b[31mred\nevil.jsonl:99: rejected: forged"
    lines = [obj(id="fine", prompt="a green lamp"), obj(prompt="p", **{forged: 1})]
    # When the manifest runs
    manifest, result = run_small(tmp_path, lines)
    stderr: str = result.stderr  # type: ignore[attr-defined]
    # Then the line is rejected as an unknown field, reported on exactly one stderr line
    assert "Traceback" not in stderr, stderr[-2000:]
    outcome = read_local(tmp_path / "out", "small")
    check_invariants(manifest, outcome)
    row = outcome.rows[1]
    assert row.status == "rejected" and row.error is not None
    assert "unknown field" in row.error.message
    assert "\x1b" not in stderr, repr(stderr)
    reports = [line for line in stderr.splitlines() if ": rejected: " in line]
    assert reports == [line for line in reports if line.startswith(f"{manifest}:2: rejected: ")]
    assert len(reports) == 1, reports


def test_text_from_a_manifest_reaches_the_terminal_escaped_and_cut_short(tmp_path: Path) -> None:
    """The defects: ESC sequences in prompts were echoed raw to the terminal, and a
    900,000-character prompt was echoed in full on stderr."""
    # Given a line whose bad value holds an ANSI escape, and one with a 900,000-character prompt
    lines = [
        obj(id="fine", prompt="a green lamp"),
        obj(id="ansi", prompt="a lamp", size="\u001b[2J\u001b[31mhuge"),
        obj(id="long", prompt="x" * 900_000),
    ]
    # When the manifest runs
    manifest, result = run_small(tmp_path, lines)
    stderr: str = result.stderr  # type: ignore[attr-defined]
    # Then both are rejected on one short, escaped stderr line each
    assert "\x1b" not in stderr, repr(stderr[:300])
    reports = [line for line in stderr.splitlines() if ": rejected: " in line]
    assert len(reports) == 2, reports
    assert all(len(line) < 600 for line in reports), [len(line) for line in reports]
    assert "\\x1b" in reports[0], reports[0]
    assert "more characters" in reports[1] or "32000" in reports[1], reports[1]
    outcome = read_local(tmp_path / "out", "small")
    check_invariants(manifest, outcome)
    assert [row.status for row in outcome.rows] == ["succeeded", "rejected", "rejected"]


def test_failed_jsonl_holds_each_line_as_written_under_one_comment_with_its_reason(
    tmp_path: Path,
) -> None:
    """The defects: a line over the 1 MB limit left an empty line in failed.jsonl (the fix-up
    manifest silently lost it), and every comment said the status twice (``rejected:
    rejected: …``)."""
    # Given a manifest with a line over 1 MB, a typo and a line the provider refuses
    huge = obj(id="huge", prompt="x" * (1024 * 1024 + 10))
    typo = obj(id="typo", prompt="a red lamp", qualty="high")
    policy = obj(id="flagged", prompt="a lamp [[policy]]")
    manifest, result = run_small(
        tmp_path, [obj(id="fine", prompt="a green lamp"), huge, typo, policy]
    )
    assert result.returncode == 1, result.stderr  # type: ignore[attr-defined]
    outcome = read_local(tmp_path / "out", "small")
    check_invariants(manifest, outcome)
    rows = {row.line: row for row in outcome.rows}
    assert [rows[n].status for n in (1, 2, 3, 4)] == ["succeeded", "rejected", "rejected", "failed"]
    # When the fix-up manifest is read
    failed = (tmp_path / "out" / "small" / "failed.jsonl").read_bytes()
    # Then it holds each of those lines exactly as written, under one comment saying why
    policy_error = rows[4].error
    assert policy_error is not None
    assert failed.split(b"\n") == [
        f"# line 2: rejected: line is over {1024 * 1024} bytes".encode(),
        huge,
        b"# line 3: rejected: unknown field 'qualty' (did you mean 'quality'?)",
        typo,
        f"# line 4: failed ({policy_error.type}): {policy_error.message}".encode(),
        policy,
        b"",
    ]
