"""Placeholder images with real bytes, and the CDN route that serves them.

Every (job, index) gets its own colour and label, so a test can tell two downloads apart;
encoded images are cached because polling clients download the same file more than once.
``tiny`` jobs get images 1/16 of the size (no text, a row of digest pixels instead), because
rendering full-size images would dominate the simulator's CPU in load tests.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import threading
import time
from collections import OrderedDict

from PIL import Image, ImageDraw, ImageFont

from jobs.simulator.core import Request, Response, json_response
from jobs.simulator.state import Job, State

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ASPECT_SIZES = {"1:1": (1024, 1024), "3:2": (1536, 1024), "2:3": (1024, 1536)}
_NAME = re.compile(r"(?P<id>[0-9a-f-]{36})-(?P<k>\d+)\.(?P<ext>png|jpeg|webp)")
_CACHE_SIZE = 128
TINY_SCALE = 16
_OPTIONS: dict[str, dict[str, int]] = {
    "png": {"compress_level": 1},
    "jpeg": {"quality": 85},
    "webp": {"method": 0},
}


def parse_size(size: str) -> tuple[int, int]:
    """``"1536x1024"`` → ``(1536, 1024)``; ``auto`` means the square default."""
    if size == "auto":
        return 1024, 1024
    width, height = size.split("x")
    return int(width), int(height)


class ImageCache:
    """Encoded images by file name, least recently used evicted first."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def image(self, job: Job, k: int) -> bytes:
        name = f"{job.id}-{k}.{job.fmt}"
        with self._lock:
            if name in self._items:
                self._items.move_to_end(name)
                return self._items[name]
        data = render(job, k)
        with self._lock:
            self._items[name] = data
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return data

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def render(job: Job, k: int) -> bytes:
    """Image ``k`` of ``job`` in its size and format; garbage of the same length if corrupt."""
    digest = hashlib.sha256(f"{job.id}-{k}".encode()).digest()
    colour = (digest[0], digest[1], digest[2])
    transparent = job.transparent and job.fmt != "jpeg"
    mode = "RGBA" if transparent else "RGB"
    background = (0, 0, 0, 0) if transparent else colour
    if job.tiny:
        size = (max(1, job.width // TINY_SCALE), max(1, job.height // TINY_SCALE))
        canvas = Image.new(mode, size, background)
        for x in range(min(size[0], len(digest) // 3)):
            pixel = digest[3 * x : 3 * x + 3]
            canvas.putpixel((x, 0), (*pixel, 255) if transparent else tuple(pixel))
    else:
        canvas = Image.new(mode, (job.width, job.height), background)
        draw = ImageDraw.Draw(canvas)
        margin = job.width // 8
        box = (margin, margin, job.width - margin, job.height - margin)
        draw.rectangle(box, fill=(*colour, 255) if transparent else _shade(colour))
        font = ImageFont.load_default(size=48)
        draw.text((margin + 24, margin + 24), f"{job.id[:8]} #{k}", fill="white", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format=job.fmt.upper(), **_OPTIONS[job.fmt])
    data = buffer.getvalue()
    if job.corrupt:
        return b"NOT-AN-IMAGE" + random.Random(digest).randbytes(max(0, len(data) - 12))
    return data


def _shade(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = colour
    return (r + 128) % 256, (g + 128) % 256, (b + 128) % 256


def serve_cdn(
    state: State, cache: ImageCache, req: Request, name: str, provider: str | None = None
) -> Response:
    """``GET /cdn/images/{jobId}-{k}.{ext}``: no auth, 404 until done and after expiry, and
    for another provider's job on a ``provider``'s dedicated port."""
    match = _NAME.fullmatch(name)
    now = time.monotonic()
    with state.lock:
        job = state.jobs.get(match["id"]) if match else None
        ttl = state.config.cdn_ttl_s
    if job is not None and provider not in (None, job.provider):
        job = None
    if match is None or job is None or job.status(now) != "COMPLETED":
        return json_response(404, {"error": "Not found"})
    k = int(match["k"])
    if match["ext"] != job.fmt or not 1 <= k <= job.n or job.expired(now, ttl):
        return json_response(404, {"error": "Not found"})
    with state.lock:
        first = k not in job.fetched
        job.fetched.add(k)
    if first and state.fault("cdn_lag"):
        # Not yet propagated to this edge: a real CDN's 404 right after completion.
        return json_response(404, {"error": "Not found"})
    if state.fault("cdn_expired"):
        job.purged = True
        return json_response(404, {"error": "Not found"})
    data = cache.image(job, k)
    truncate_to = len(data) // 2 if state.fault("cdn_truncated") else None
    headers = {"Cache-Control": "public, max-age=86400"}
    return Response(200, data, CONTENT_TYPES[job.fmt], headers, truncate_to=truncate_to)
