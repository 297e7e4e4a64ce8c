"""How manifest-derived text is shown to people: escaped, so it cannot drive a terminal,
and short, so one hostile value cannot flood a screen or a result row."""

from __future__ import annotations

import pytest

from jobs.text import shown


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("\x1b[31mred", "\\x1b[31mred"),
        ("two\nlines\r\n", "two\\nlines\\r\\n"),
        ("tab\there", "tab\\there"),
        ("nul\x00", "nul\\x00"),
        ("csi\x9b2J", "csi\\x9b2J"),  # the 8-bit CSI some terminals obey
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("line\u2028sep", "line\\u2028sep"),
        ("lone \ud800", "lone \\ud800"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
    ],
)
def test_control_characters_and_escape_sequences_are_shown_escaped(
    value: str, expected: str
) -> None:
    assert shown(value) == expected
    assert shown(value).isprintable()
    shown(value).encode("utf-8")  # a lone surrogate would not encode


def test_printable_text_in_any_script_is_shown_as_it_is() -> None:
    text = "un café ☕ à Tōkyō — 東京 'quoted' \\ back"
    assert shown(text) == text


def test_a_long_value_is_cut_and_says_how_much_was_left_out() -> None:
    assert shown("x" * 900_000) == "x" * 120 + "… (899,880 more characters)"
    assert shown("y" * 121) == "y" * 120 + "… (1 more character)"


def test_a_value_at_the_limit_is_shown_whole() -> None:
    assert shown("z" * 120) == "z" * 120
    assert shown("abc", limit=3) == "abc"


def test_escapes_count_toward_the_limit() -> None:
    out = shown("\x1b" * 1000, limit=20)
    assert out.startswith("\\x1b" * 5 + "…")
    assert out.endswith("(995 more characters)")


def test_other_values_are_shown_as_a_bounded_repr() -> None:
    assert shown(7) == "7"
    assert shown(["high", None]) == "['high', None]"
    assert shown({"k": "\x1b"}) == "{'k': '\\x1b'}"
    deep: dict[str, object] = {}
    for _ in range(5000):
        deep = {"a": deep}
    out = shown(deep)
    assert len(out) <= 160 and out.isprintable()
    assert len(shown(list(range(100_000)))) <= 160
