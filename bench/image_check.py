"""Is a structural check as good as a full decode, and how much cheaper? Prints, from one run,
for the simulator's small images and for realistic 2-3 MB ones: the milliseconds per image
of Pillow's full decode and of ``jobs.fetch.imagecheck``, and whether each catches the same cut
and garbled downloads (truncated at several points, one byte flipped in a PNG chunk).

    .venv/bin/python bench/image_check.py
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image

from jobs.fetch.imagecheck import BadImage, inspect


def pillow(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def structural(data: bytes) -> None:
    inspect(data)


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return out.getvalue()


def samples() -> dict[str, bytes]:
    flat = Image.new("RGB", (1024, 1024), (30, 120, 200))
    photo = Image.effect_noise((1024, 1024), 64).convert("RGB")
    found = {}
    for fmt in ("PNG", "JPEG", "WEBP"):
        found[f"small {fmt}"] = encode(flat, fmt)
        found[f"photo {fmt}"] = encode(photo, fmt)
    return found


def millis(check: Callable[[bytes], None], data: bytes, rounds: int = 20) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        check(data)
    return (time.perf_counter() - started) / rounds * 1000


def caught(check: Callable[[bytes], None], data: bytes) -> bool:
    try:
        check(data)
    except (BadImage, OSError, SyntaxError, ValueError):
        return True
    return False


def damaged(data: bytes) -> list[bytes]:
    cuts = [data[: len(data) * share // 10] for share in (1, 5, 9)] + [data[:-2]]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    return [*cuts, bytes(flipped)]


def main() -> None:
    ratios = []
    for name, data in samples().items():
        full, quick = millis(pillow, data), millis(structural, data)
        ratios.append(full / quick)
        bad = damaged(data)
        by_pillow = sum(caught(pillow, d) for d in bad)
        by_check = sum(caught(structural, d) for d in bad)
        # A flipped byte inside JPEG/WebP entropy data is caught by neither (no checksum).
        print(
            f"{name:<12} {len(data) / 1e6:5.2f} MB · decode {full:7.2f} ms · structural "
            f"{quick:6.3f} ms ({full / quick:6.0f}x cheaper) · damaged copies caught: "
            f"decode {by_pillow}/{len(bad)}, structural {by_check}/{len(bad)}"
        )
    print(f"structural check is {min(ratios):.0f}x to {max(ratios):.0f}x cheaper than a decode")


if __name__ == "__main__":
    main()
