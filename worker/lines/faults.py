"""Crash points for fault tests: kill this worker at a named moment, once across a fleet.

Set ``IMAGEBATCH_CRASH_AT`` to a point name and ``IMAGEBATCH_CRASH_MARKER`` to a file path;
the first process to reach the point creates the marker and SIGKILLs itself, exactly like
an OOM kill or a lost machine. Without both settings this does nothing.
"""

from __future__ import annotations

import os
import signal

from jobs.settings import Settings

POINTS = ("after_submit", "during_poll", "before_upload", "mid_upload")


def crash_point(settings: Settings, name: str) -> None:
    if settings.crash_at != name or not settings.crash_marker:
        return
    try:
        os.close(os.open(settings.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
