"""Celery beat for imagebatch's schedules: cron expressions as users write them (five fields or
``@daily``), the beat entry of a task, and running the beat until it is stopped."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery.schedules import ParseException, crontab

from jobs.errors import ConfigError
from jobs.settings import CoreSettings
from jobs.text import shown
from worker.celery.app import configure
from worker.redis.keys import QUEUE

__all__ = ["crontab", "entry", "parse_cron", "run"]

CRON_SHORTCUTS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


def parse_cron(expression: str) -> crontab:
    """Five cron fields (minute hour day-of-month month day-of-week) or ``@daily`` & co.

    Raises:
        ConfigError: the expression is not one; the message names ``IMAGEBATCH_SCHEDULE``.
    """
    text = CRON_SHORTCUTS.get(expression.strip().lower(), expression)
    fields = text.split()
    if len(fields) != 5:
        raise ConfigError(
            f"IMAGEBATCH_SCHEDULE '{shown(expression)}' is not a cron expression: give five "
            "fields, minute hour day-of-month month day-of-week (e.g. '*/5 * * * *')"
        )
    minute, hour, day, month, weekday = fields
    # cron allows 7 for Sunday; Celery counts 0-6.
    weekday = ",".join("0" if part == "7" else part for part in weekday.split(","))
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day,
            month_of_year=month,
            day_of_week=weekday,
        )
    except (ValueError, ParseException) as exc:
        raise ConfigError(
            f"IMAGEBATCH_SCHEDULE '{shown(expression)}': {shown(str(exc))} "
            "(fields: minute 0-59, hour 0-23, day-of-month 1-31, month 1-12, day-of-week 0-6)"
        ) from None


def entry(name: str, task: str, cron: crontab, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The beat's one entry; a pass not started before the next is due is dropped."""
    now = datetime.now(UTC)
    first = cron.remaining_estimate(now)
    # The next firing after one a minute past the first: the gap, give or take that minute.
    gap = cron.remaining_estimate(now + first + timedelta(seconds=61)) - first
    return {
        name: {
            "task": task,
            "schedule": cron,
            "kwargs": kwargs,
            "options": {"queue": QUEUE, "expires": max(60.0, gap.total_seconds())},
        }
    }


def run(settings: CoreSettings, schedule: dict[str, Any]) -> None:
    """Celery beat, its schedule file in a private temp dir (the root filesystem may be
    read-only, and two schedulers on one host must not share one file)."""
    assert settings.broker_url is not None
    celery_app = configure(settings, settings.broker_url)
    celery_app.conf.beat_schedule = schedule
    celery_app.conf.timezone = "UTC"
    folder = tempfile.mkdtemp(prefix="imagebatch-beat-")
    try:
        celery_app.Beat(
            schedule=str(Path(folder) / "beat-schedule"),
            loglevel=settings.log_level,
            quiet=True,
        ).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
