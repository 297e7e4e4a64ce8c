"""Logging for people and for fleets: plain text by default, one JSON object per line with
``IMAGEBATCH_LOG_FORMAT=json`` (python-json-logger), carrying the batch, line id, job id,
provider, step and outcome of the line it is about. Per-request HTTP logs only at DEBUG.

Celery workers get the same setup (``configure_worker``, connected to Celery's
``setup_logging`` signal by ``worker.celery.app``), so Celery does not install its own
handlers over ours.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from jobs.settings import CoreSettings

FIELDS = ("batch", "line_id", "job_id", "provider", "step", "outcome")
NOISY = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "kombu", "amqp")


_configured = {"by_cli": False}


def configure(
    settings: CoreSettings,
    *,
    debug: bool = False,
    by_cli: bool = True,
    level_name: str | None = None,
) -> None:
    level = logging.DEBUG if debug else _level(level_name or settings.log_level)
    as_json = settings.log_format == "json"
    if by_cli and not debug and not as_json:
        level = max(level, logging.WARNING)  # a command's own output is its progress and result
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(with_batch)
    if settings.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Python warnings (Celery's "running as root", a library's deprecation) become log records
    # in the same format: a JSON log must not have a raw, multi-line warning in it.
    logging.captureWarnings(settings.log_format == "json")
    if by_cli and not debug:
        handler.addFilter(one_line)
    _configured["by_cli"] = _configured["by_cli"] or by_cli
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    # The CLI's own progress and rejections go to the terminal; per-line logs stay quiet
    # there unless asked for (a worker logs them at INFO), or the CLI's stderr is a JSON log:
    # then each line's outcome is a record in it. The embedded worker's own chatter (tasks
    # received and done) is no outcome.
    if not debug:
        lines_level = logging.INFO if as_json and by_cli else logging.WARNING
        logging.getLogger("imagebatch.lines").setLevel(lines_level)
    quiet_celery = by_cli and not debug
    logging.getLogger("celery").setLevel(logging.WARNING if quiet_celery else logging.NOTSET)


_context: dict[str, str | None] = {"batch": None}


def set_batch(batch: str | None) -> None:
    """The batch this process's command is about: every record without one gets it, so a
    JSON log of ``run`` names its batch on every line (the embedded worker's and Celery's
    records too)."""
    _context["batch"] = batch


def with_batch(record: logging.LogRecord) -> bool:
    if _context["batch"] and not getattr(record, "batch", None):
        record.batch = _context["batch"]
    return True


def one_line(record: logging.LogRecord) -> bool:
    """A command's terminal or cron log gets one line per problem: a task of the embedded
    worker that failed (an output-store outage fails a flush, which is tried again) is named
    with its error, without the traceback (``--debug`` shows it)."""
    if record.exc_info or record.exc_text:
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
    return True


class ContextFormatter(logging.Formatter):
    """Text logs with the line's context appended (``batch=… line_id=…``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(
            f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, None)
        )
        return f"{text} [{context}]" if context else text


def _level(name: str | int) -> int:
    if isinstance(name, int):
        return name
    value = logging.getLevelName(str(name).upper())
    return value if isinstance(value, int) else logging.INFO


def configure_worker(loglevel: str | int | None = None) -> None:
    """A worker logs its lines at INFO (or its ``--loglevel``); an embedded run keeps the
    terminal to progress."""
    if _configured["by_cli"] and not _configured.get("worker"):
        return
    from jobs.settings import Settings

    level = _level(loglevel) if loglevel is not None else None
    configure(Settings(), by_cli=False, level_name=logging.getLevelName(level) if level else None)
    debug = level is not None and level <= logging.DEBUG
    logging.getLogger("imagebatch.lines").setLevel(logging.DEBUG if debug else logging.INFO)
    if debug:
        for name in NOISY:
            logging.getLogger(name).setLevel(logging.DEBUG)


def stdout_to_log() -> None:
    """A JSON-logging worker: what Celery writes straight to the stdout file descriptor (its
    "Warm shutdown" and Ctrl-C notices bypass logging) becomes a log record as well, so that
    every line of the worker's output is one JSON object."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    os.dup2(write_fd, sys.stdout.fileno())
    os.close(write_fd)
    said = logging.getLogger("celery.stdout")

    def pump() -> None:
        with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                if line.strip():
                    said.info("%s", line.strip())

    threading.Thread(target=pump, name="imagebatch-stdout", daemon=True).start()


def for_worker() -> None:
    """``imagebatch worker``: let Celery's logging setup (our handler) take over."""
    _configured["worker"] = True
