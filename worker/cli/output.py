"""Where a command's words go.

stdout carries the command's result: the batch header, the ``done …`` line, ``status`` and
``ls`` lines, the batch id ``submit`` prints (and, as text, the progress bar or progress
records). stderr carries everything else: rejections, warnings, errors, what an interrupt
did. With ``IMAGEBATCH_LOG_FORMAT=json``, stderr is a log a machine reads: every notice, the
progress records and each line's outcome are one JSON object per line (``event`` says which,
``batch`` names the batch), and stdout keeps only the result lines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from rich.console import Console

from jobs.manifest.parse import Line
from jobs.text import shown

out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

log = logging.getLogger("imagebatch.cli")
_mode = {"json": False}


def use_json(on: bool) -> None:
    """Set once the settings are read (``IMAGEBATCH_LOG_FORMAT``)."""
    _mode["json"] = on


def json_logs() -> bool:
    return _mode["json"]


def notice(
    text: str, *, event: str, level: int = logging.INFO, prefix: str = "", **fields: Any
) -> None:
    """One line on stderr: ``prefix`` and ``text`` for people, or a JSON log record of
    ``text`` with ``event`` and ``fields`` (the level says what the prefix would)."""
    if _mode["json"]:
        log.log(level, "%s", text, extra={"event": event, **fields})
    else:
        err_console.print(prefix + text, markup=False)


def result(text: str) -> None:
    """One line of the command's result, on stdout."""
    out_console.print(text, markup=False)


def event(text: str, *, event: str, **fields: Any) -> None:
    """What stdout already says as a result line (a batch started, finished), also as a
    record in a JSON log, so the log alone tells the batch's story; nothing in text mode."""
    if _mode["json"]:
        log.info("%s", text, extra={"event": event, **fields})


def print_rejection(source: str) -> Callable[[Line], None]:
    """What the batch's start calls with each line it read: a rejection, printed as it is found
    (``SOURCE:LINE: rejected: why``, or its JSON record), the others nothing."""

    def show(line: Line) -> None:
        if line.rejection is not None:
            reason = shown(line.rejection.message, 300)
            notice(
                f"{shown(source)}:{line.number}: rejected: {reason}",
                event="rejected",
                level=logging.WARNING,
                line=line.number,
                line_id=line.id,
                reason=reason,
            )

    return show
