"""The script a competent user would write instead of imagebatch: the benchmarks' yardstick.

APIFrame v2 over one ``httpx.AsyncClient``: a semaphore of ``cap`` around each line's whole
life, a token bucket of ``rate`` submits per second, polls paced like the official SDK's
``waitFor`` (first after 2 s, then x1.5 up to 5 s, give up after 10 min), every image
downloaded to a folder, and each 429 waited out (``Retry-After``, else 1 s) in its slot.

    .venv/bin/python bench/asyncio_script.py MANIFEST --base-url http://127.0.0.1:8765 \\
        --cap 16 --rate 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

FIRST_POLL_S, POLL_FACTOR, MAX_POLL_S, GIVE_UP_S = 2.0, 1.5, 5.0, 600.0
ASPECT = {"1024x1024": "1:1", "1536x1024": "3:2", "1024x1536": "2:3"}


@dataclass(frozen=True)
class ScriptResult:
    wall_s: float
    cpu_s: float
    """CPU of the event loop's thread: the script's own, not an in-process simulator's."""
    succeeded: int
    failed: int
    rate_limited: int
    """429 answers the script met (and waited out)."""


class TokenBucket:
    """``rate`` submits per second, with bursts of one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, max(1.0, rate)
        self.tokens, self.updated = self.capacity, time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self) -> None:
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class Script:
    def __init__(self, client: httpx.AsyncClient, out: Path, cap: int, rate: float) -> None:
        self.client, self.out = client, out
        self.slots, self.bucket = asyncio.Semaphore(cap), TokenBucket(rate)
        self.run_id, self.rate_limited = uuid.uuid4().hex, 0

    async def send(self, method: str, url: str, paced: bool = False, **kw: Any) -> httpx.Response:
        """One request, sent again after each 429 once its ``Retry-After`` has passed."""
        while True:
            if paced:
                await self.bucket.take()
            response = await self.client.request(method, url, **kw)
            if response.status_code != 429:
                return response
            self.rate_limited += 1
            await asyncio.sleep(float(response.headers.get("Retry-After", 1)))

    async def line(self, item: dict[str, Any]) -> bool:
        async with self.slots:
            try:
                return await self.generate(item)
            except (httpx.HTTPError, ValueError, KeyError):
                return False

    async def generate(self, item: dict[str, Any]) -> bool:
        params = {
            "quality": item.get("quality", "auto"),
            "output_format": item.get("output_format", "png"),
            "aspect_ratio": ASPECT[item.get("size", "1024x1024")],
            "number_of_images": item.get("n", 1),
        }
        body = {"model": "gpt-image-1.5", "prompt": item["prompt"], "gptImageParams": params}
        key = {"Idempotency-Key": f"{self.run_id}:{item['id']}"}
        submitted = await self.send("POST", "/v2/images/generate", True, json=body, headers=key)
        if submitted.status_code != 202:
            return False
        job_id, delay = submitted.json()["jobId"], FIRST_POLL_S
        deadline = time.monotonic() + GIVE_UP_S
        while True:
            await asyncio.sleep(delay)
            polled = await self.send("GET", f"/v2/jobs/{job_id}")
            job = polled.json() if polled.status_code == 200 else {"status": "?"}
            if job["status"] == "COMPLETED":
                break
            if job["status"] in ("FAILED", "CANCELLED") or time.monotonic() > deadline:
                return False
            delay = min(delay * POLL_FACTOR, MAX_POLL_S)
        result = job["result"]
        for k, url in enumerate([result] if isinstance(result, str) else result["images"], 1):
            image = await self.send("GET", url)
            image.raise_for_status()
            suffix = Path(httpx.URL(url).path).suffix
            (self.out / f"{item['id']}-{k}{suffix}").write_bytes(image.content)
        return True


async def _run(
    base_url: str, api_key: str, items: list[dict[str, Any]], out: Path, cap: int, rate: float
) -> tuple[list[bool], int]:
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    headers = {"X-API-Key": api_key}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=60
    ) as client:
        script = Script(client, out, cap, rate)
        outcomes = await asyncio.gather(*(script.line(item) for item in items))
    return outcomes, script.rate_limited


def run_script(
    base_url: str, api_key: str, manifest: Path, out: Path, cap: int, submits_per_s: float
) -> ScriptResult:
    """Generate every line of a JSONL ``manifest`` (``bench/fleet.py``'s format) into ``out``."""
    started, cpu = time.monotonic(), time.thread_time()
    items = [json.loads(text) for text in manifest.read_text().splitlines() if text.strip()]
    out.mkdir(parents=True, exist_ok=True)
    outcomes, limited = asyncio.run(_run(base_url, api_key, items, out, cap, submits_per_s))
    return ScriptResult(
        wall_s=time.monotonic() - started,
        cpu_s=time.thread_time() - cpu,
        succeeded=sum(outcomes),
        failed=len(outcomes) - sum(outcomes),
        rate_limited=limited,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--base-url", default="http://127.0.0.1:8765")
    parser.add_argument("--api-key", default="afk_benchmark_key")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--cap", type=int, default=16, help="lines in flight at once")
    parser.add_argument("--rate", type=float, default=10.0, help="submits per second")
    args = parser.parse_args(argv)
    result = run_script(args.base_url, args.api_key, args.manifest, args.out, args.cap, args.rate)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
