"""Text that came from a manifest, rendered for people: escaped and short.

A manifest value may hold an ANSI escape that recolours a terminal, a newline that forges
another report line, or 900,000 characters. Every reason, log line or terminal line that
repeats such a value shows it through ``shown``.
"""

from __future__ import annotations

import reprlib

LIMIT = 120
"""Characters of a value shown by default: enough to recognise it, short enough for one line."""

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxstring = _REPR.maxother = 60
"""A bounded repr for non-text values: any depth or length of JSON renders in bounded time."""


def shown(value: object, limit: int = LIMIT) -> str:
    """``value`` as one printable line of at most ``limit`` characters plus a cut marker.

    Non-printable characters (controls, ESC, line and paragraph separators, bidi overrides,
    lone surrogates) are written as Python escapes (``\\x1b``, ``\\n``, ``\\u202e``); what
    does not fit is replaced by ``… (N more characters)``. Values that are not ``str`` are
    shown as a bounded ``repr``.

    Args:
        value: a manifest-derived string, or any other value (shown as its repr).
        limit: the most characters of the rendering kept before the cut marker.

    Returns:
        Text safe to print on a terminal and to store in a result row.
    """
    text = value if isinstance(value, str) else _REPR.repr(value)
    if len(text) <= limit and text.isprintable():
        return text
    pieces: list[str] = []
    used = 0
    for index, char in enumerate(text):
        piece = char if char.isprintable() else _escape(char)
        if used + len(piece) > limit:
            rest = len(text) - index
            return "".join(pieces) + f"… ({rest:,} more character{'' if rest == 1 else 's'})"
        pieces.append(piece)
        used += len(piece)
    return "".join(pieces)


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
