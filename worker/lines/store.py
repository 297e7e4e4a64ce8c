"""The store step: download a finished job's images, prove them whole, upload them with their
checksum, and end the line. A failed download uploads nothing; a 404 right after the job
finished is CDN lag until it proves otherwise; an output-store outage is waited out.

Like every step it decides and returns a ``Transition``; ``worker.dispatch.runner`` applies it.
"""

from __future__ import annotations

import time
from typing import Any

from jobs import policy
from jobs.errors import (
    DownloadError,
    ImageExpired,
    ImageMissing,
    JobFailed,
    ProviderError,
    StorageError,
)
from jobs.fetch import download
from jobs.output import layout, previews
from jobs.output.rows import ImageRef
from jobs.providers.base import Artifact, Finished
from worker.lines.endings import fail, make_row, regenerate
from worker.lines.faults import crash_point
from worker.lines.records import LineRecord, LineStatus, Transition
from worker.lines.steps import Context

# -- store --------------------------------------------------------------------------------------


def store(ctx: Context, rec: LineRecord) -> Transition:
    """Download and verify every image first, then upload: a failed download uploads none."""
    settings = ctx.settings
    inline = {k: a.data for k, a in enumerate(ctx.payload) if a.data is not None}
    fetched: list[download.Fetched] = []
    try:
        for k, spec in enumerate(rec.artifacts):
            data: bytes | None = None
            if "blob" in spec:
                data = inline.get(k) or ctx.get_blob(spec["blob"])
                if data is None:
                    raise ImageExpired("the inline image was lost before it was stored")
            artifact = Artifact(url=spec.get("url"), data=data)
            fetched.append(
                download.fetch(
                    ctx.downloads,
                    artifact,
                    max_bytes=settings.download_max_bytes,
                    expected_format=rec.request.output_format,
                    trusted_hosts=ctx.trusted_hosts(rec.provider),
                )
            )
    except ImageMissing as exc:
        return _missing(ctx, rec, exc)
    except ImageExpired as exc:
        return regenerate(ctx.settings, rec, _expired(exc.message))
    except DownloadError as exc:
        if not exc.retryable or rec.tries >= settings.http_retries:
            return fail(rec, exc)
        wait = policy.backoff(rec.tries + 1, settings.retry_base_s, settings.retry_max_s)
        return Transition(
            LineStatus.FETCHED, {"tries": rec.tries + 1}, due_in=wait, outcome="retry download"
        )
    crash_point(settings, "before_upload")
    images = list(rec.images)
    try:
        for image in fetched:
            k = len(images)
            key = layout.image_key(rec.batch, rec.id, k, image.extension)
            ctx.store.put_new(key, image.data, image.content_type, image.sha256)
            crash_point(settings, "mid_upload")
            if rec.idx < settings.report_previews:
                previews.store_preview(ctx.store, rec.batch, rec.id, k, image.data)
            ref = ImageRef(
                uri=ctx.store.uri(key),
                sha256=image.sha256,
                bytes=len(image.data),
                content_type=image.content_type,
                width=image.width,
                height=image.height,
            )
            images.append(ref.model_dump())
    except StorageError as exc:
        return _storage_trouble(ctx, rec, exc, images)
    if len(images) < rec.request.n:
        changes = {"images": tuple(images), "artifacts": (), "job_id": "", "tries": 0}
        return Transition(LineStatus.READY, changes, outcome="next part")
    return Transition(
        LineStatus.SUCCEEDED,
        row=make_row(rec.evolve(images=tuple(images)), "succeeded"),
        outcome="succeeded",
    )


def _missing(ctx: Context, rec: LineRecord, exc: ImageMissing) -> Transition:
    """A finished job's image answered 404: fetch it again a few times (CDN propagation),
    then read the job again for fresh URLs; only an expired job, or a URL that stays gone,
    means buying the line again."""
    settings = ctx.settings
    misses = rec.misses + 1
    if misses <= settings.download_retries:
        wait = policy.backoff(misses, max(0.5, settings.retry_base_s), settings.retry_max_s)
        return Transition(
            LineStatus.FETCHED, {"misses": misses}, due_in=wait, outcome="image not there yet"
        )
    adapter = ctx.adapter(rec.provider)
    if not adapter.polled or not rec.job_id or misses > 2 * settings.download_retries + 1:
        return regenerate(ctx.settings, rec, _expired(f"{exc.message}, and it stayed so"))
    try:
        outcome = adapter.poll(rec.job_id)
    except JobFailed as failed:
        return regenerate(ctx.settings, rec, failed)
    except ProviderError:
        wait = policy.backoff(misses, settings.retry_base_s, settings.retry_max_s)
        return Transition(LineStatus.FETCHED, {"misses": misses}, due_in=wait, outcome="retry")
    if not isinstance(outcome, Finished) or outcome.expired:
        return regenerate(ctx.settings, rec, _expired(f"job {rec.job_id}'s images have expired"))
    urls = [{"url": a.url or ""} for a in outcome.artifacts]
    return Transition(
        LineStatus.FETCHED, {"misses": misses, "artifacts": tuple(urls)}, outcome="fresh URLs"
    )


def _storage_trouble(
    ctx: Context, rec: LineRecord, exc: StorageError, images: list[dict[str, Any]]
) -> Transition:
    """Waiting for the output store is not failing: the line keeps its images (inline ones
    are already in Redis) and tries again, until the storage deadline."""
    settings = ctx.settings
    changes: dict[str, Any] = {"images": tuple(images), "tries": rec.tries + 1}
    changes["artifacts"] = rec.artifacts[len(images) - len(rec.images) :]
    since = rec.fetched_at or time.time()
    if not exc.retryable or time.time() - since > settings.storage_deadline_s:
        return fail(rec.evolve(images=tuple(images)), exc)
    wait = min(60.0, policy.backoff(rec.tries + 1, settings.retry_base_s, 30.0) + 1.0)
    return Transition(
        LineStatus.FETCHED, changes, due_in=wait, counts={"storage_waits": 1}, outcome="storage"
    )


def _expired(message: str) -> JobFailed:
    """The job's images are gone: a new job (a new attempt) may get the line its images."""
    return JobFailed(message, retryable=True, type="image_expired")
