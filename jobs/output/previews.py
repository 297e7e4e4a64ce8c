"""The report's previews: one small WebP per image, made while the image's bytes are at hand.

The store step makes each preview as it stores the image, so finalize need not read and decode
every image again; ``report.html`` reads them by ``thumbnail_key`` and makes any missing one.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from jobs.errors import StorageError
from jobs.storage import Store

THUMB_PX = 320
"""The longest side of a preview: sharp on a 2x screen at the page's card size."""
MAX_PIXELS = 64_000_000
"""A stored image larger than this is not decoded for a preview (the largest size is 1.5 MP)."""


def thumbnail_key(batch: str, line_id: str, k: int) -> str:
    """``ID-K``: the image number is always the last ``-`` part, so two images never collide."""
    return f"{batch}/report/thumbs/{line_id}-{k}.webp"


class ThumbnailError(Exception):
    """The bytes could not be turned into a preview (not an image, truncated, too large)."""


@dataclass(frozen=True)
class Thumbnail:
    """A WebP preview (WebP keeps alpha, so a transparent product stays transparent)."""

    data: bytes
    width: int
    height: int
    alpha: bool


def store_preview(store: Store, batch: str, line_id: str, k: int, data: bytes) -> bool:
    """Make image ``k``'s preview while its bytes are at hand, so that finalize need not read
    and decode it again; False if that failed (finalize tries again, or shows a placeholder)."""
    try:
        thumb = make_thumbnail(data)
        store.put(thumbnail_key(batch, line_id, k), thumb.data, "image/webp")
    except (ThumbnailError, StorageError):
        return False
    return True


def stored_preview(store: Store, key: str) -> Thumbnail | None:
    """A preview the store step already made (only its header is read), or None."""
    from PIL import Image  # only drawing a report needs Pillow: the CLI starts faster without

    try:
        data = store.get(key)
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as image:
            return Thumbnail(data, image.width, image.height, image.mode == "RGBA")
    except Exception:  # noqa: BLE001 - an unreadable preview is made again from the image
        return None


def make_thumbnail(data: bytes, box: int = THUMB_PX) -> Thumbnail:
    """Shrink an image to fit ``box`` x ``box``, keeping its aspect ratio and transparency.

    Raises:
        ThumbnailError: the bytes are not a decodable image, or it is implausibly large.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning must stop this image, not go to the caller's log.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _shrink(data, box)
    except ThumbnailError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types on bad bytes
        raise ThumbnailError(f"not a decodable image ({type(exc).__name__})") from exc


def _shrink(data: bytes, box: int) -> Thumbnail:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ThumbnailError(f"image of {image.width}x{image.height} is too large to preview")
        alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
        image.draft("RGB", (box, box))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
        # Shrink before converting (reduce() by whole factors, then a cheap filter): a third of
        # the CPU of converting the full image and LANCZOS, which a preview does not need.
        image.thumbnail((box, box), Image.Resampling.BILINEAR, reducing_gap=1.0)
        small = image.convert("RGBA" if alpha else "RGB")
    out = io.BytesIO()
    small.save(out, "WEBP", quality=75, method=0)
    return Thumbnail(out.getvalue(), small.width, small.height, alpha)
