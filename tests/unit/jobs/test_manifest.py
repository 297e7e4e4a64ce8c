"""Manifest reading: every counted line becomes a request or a rejection naming line, field
and reason; one bad line never affects another."""

from __future__ import annotations

import json

import pytest

from jobs.manifest.lines import MAX_LINE_BYTES, physical_lines
from jobs.manifest.parse import Line, read_manifest
from jobs.manifest.request import ImageRequest


def lines_of(data: bytes, chunk: int = 7) -> list[Line]:
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    return list(read_manifest(chunks))


def test_blank_comment_bom_and_crlf_lines_are_handled() -> None:
    data = (
        b'\xef\xbb\xbf{"prompt": "a cat", "id": "c1"}\r\n'
        b"\r\n   \n# a comment\n"
        b'{"prompt": "a dog", "id": "d1"}\r\n'
    )
    result = lines_of(data)
    assert [(line.number, line.id, line.rejection) for line in result] == [
        (1, "c1", None),
        (5, "d1", None),
    ]


HOSTILE = [
    (
        b'{"prompt": "x", "qualty": "high"}',
        "qualty",
        "unknown field 'qualty' (did you mean 'quality'?)",
    ),
    (
        b'{"prompt": "x", "size": "1000x1000"}',
        "size",
        "size '1000x1000' is not one of auto, 1024x1024, 1536x1024, 1024x1536",
    ),
    (b'{"size": "1024x1024"}', "prompt", "prompt is required"),
    (b'{"prompt": "   "}', "prompt", "prompt is empty"),
    (b'{"prompt": ""}', "prompt", "at least 1 character"),
    (b'{"prompt": "x", "n": 11}', "n", "less than or equal to 10"),
    (b'{"prompt": "x", "n": 0}', "n", "greater than or equal to 1"),
    (b'{"prompt": "x", "n": "2"}', "n", "valid integer"),
    (b'{"prompt": "x", "id": "../etc"}', "id", "id must be"),
    (b'{"prompt": "x", "id": "/abs/path"}', "id", "id must be"),
    (b'{"prompt": "x", "id": "a\\\\b"}', "id", "id must be"),
    (b'{"prompt": "x", "id": "tab\\there"}', "id", "id must be"),
    (b'{"prompt": "x", "id": "\xd0\xb0pple"}', "id", "id must be"),  # Cyrillic a
    (b'{"prompt": "x", "id": ".."}', "id", "id must be"),
    (b'{"prompt": "x", "input_images": ["file:///etc/passwd"]}', "input_images", "not an http"),
    (b'{"prompt": "x", "metadata": "sku-1"}', "metadata", "valid dictionary"),
    (b'{"prompt": "x"', None, "not valid JSON"),
    (b'["prompt", "x"]', None, "not a JSON object"),
    (b'{"prompt": "caf\xe9"}', None, "not valid UTF-8"),
]


@pytest.mark.parametrize(("raw", "field", "reason"), HOSTILE)
def test_each_bad_line_is_rejected_with_field_and_reason(
    raw: bytes, field: str | None, reason: str
) -> None:
    good = b'{"prompt": "a good line", "id": "good"}'
    result = lines_of(good + b"\n" + raw + b"\n" + good.replace(b"good", b"also-good") + b"\n")
    assert [line.number for line in result] == [1, 2, 3]
    bad = result[1]
    assert bad.request is None and bad.rejection is not None
    assert bad.rejection.line == 2
    assert bad.rejection.field == field
    assert reason in bad.rejection.message
    assert result[0].request is not None and result[2].request is not None


def test_a_repeated_id_rejects_every_later_line_but_not_the_first() -> None:
    data = b"".join(
        json.dumps({"id": "same", "prompt": f"p{i}"}).encode() + b"\n" for i in range(3)
    )
    result = lines_of(data)
    assert result[0].request is not None
    for line in result[1:]:
        assert line.rejection is not None
        assert line.rejection.field == "id"
        assert "repeats" in line.rejection.message


def test_identical_lines_without_id_get_the_same_derived_id_and_the_copy_is_rejected() -> None:
    line = b'{"prompt": "a teapot", "size": "1024x1024"}\n'
    result = lines_of(line + line)
    assert result[0].id is not None and result[0].id.startswith("line-")
    assert result[1].rejection is not None and "repeats" in result[1].rejection.message


def test_a_line_over_the_size_cap_is_rejected_without_stopping_the_next() -> None:
    huge = b'{"prompt": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n'
    result = lines_of(huge + b'{"prompt": "small"}\n', chunk=65536)
    assert result[0].rejection is not None and "over" in result[0].rejection.message
    assert result[1].request is not None and result[1].number == 2


def test_last_line_without_newline_is_read() -> None:
    assert [(n, end) for n, _, end in physical_lines([b"a\nb"])] == [(1, 2), (2, 3)]


def test_derived_id_is_stable_across_runs() -> None:
    one = ImageRequest.model_validate({"prompt": "a", "size": "1024x1024"})
    two = ImageRequest.model_validate({"size": "1024x1024", "prompt": "a"})
    assert one.line_id == two.line_id


def test_provider_check_rejects_what_the_provider_cannot_do() -> None:
    def check(request: ImageRequest) -> list[tuple[str, str]]:
        return [("quality", "no quality here")] if request.quality else []

    result = list(read_manifest([b'{"prompt": "a", "quality": "high"}\n{"prompt": "b"}\n'], check))
    assert result[0].rejection is not None and result[0].rejection.field == "quality"
    assert result[1].request is not None
