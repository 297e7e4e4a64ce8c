"""What load tests and benchmarks need from the simulator: CDN lag, 429s that say which limit
they hit (and are counted), cheap images, exact job timestamps and latency distributions."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from PIL import Image

from jobs.errors import DownloadError
from jobs.fetch.download import verify
from jobs.simulator import Faults, Simulator, SimulatorConfig

KEY = "afk_bench_key"
TOKEN = "sk-bench"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.2, sync_latency_s=0.02)) as simulator:
        yield simulator


@pytest.fixture
def api(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers={"X-API-Key": KEY}, timeout=5) as client:
        yield client


def submit(api: httpx.Client, prompt: str = "a teal kettle", **params: Any) -> httpx.Response:
    body: dict[str, Any] = {"prompt": prompt, "model": "gpt-image-1.5"}
    if params:
        body["gptImageParams"] = params
    return api.post("/v2/images/generate", json=body)


def wait(api: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/v2/jobs/{job_id}").json()
        if job["status"] in ("COMPLETED", "FAILED"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def run(api: httpx.Client, prompt: str = "a teal kettle", **params: Any) -> dict[str, Any]:
    response = submit(api, prompt, **params)
    assert response.status_code == 202, response.text
    return wait(api, response.json()["jobId"])


def openai(sim: Simulator, **body: Any) -> httpx.Response:
    return httpx.post(
        sim.url_for("openai") + "/v1/images/generations",
        json={"model": "gpt-image-1.5", "prompt": "a lighthouse", **body},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )


def ms(timestamp: str) -> int:
    return round(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000)


# -- CDN propagation lag -----------------------------------------------------------------------


def test_cdn_lag_404s_each_image_once_then_serves_it(sim: Simulator, api: httpx.Client) -> None:
    sim.update(faults=Faults(cdn_lag=1))
    job = run(api, number_of_images=2, output_format="png")
    with httpx.Client(timeout=5) as cdn:
        for url in job["result"]["images"]:
            assert cdn.get(url).status_code == 404
            assert [cdn.get(url).status_code for _ in range(2)] == [200, 200]
    polled = api.get(f"/v2/jobs/{job['id']}").json()
    assert polled["expired"] is False, "a lagging CDN is not an expired result"
    assert sim.ledger()["requests"]["GET /cdn/images/{name} 404"] == 2


# -- 429s: which limit, and how many ------------------------------------------------------------


def test_each_429_names_its_limit_and_the_ledger_counts_them_by_cause(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(max_in_flight=1, sync_latency_s=0.5)
    assert submit(api).status_code == 202
    concurrency = submit(api, "another")
    assert concurrency.status_code == 429 and int(concurrency.headers["Retry-After"]) >= 1
    assert concurrency.json() == {"error": "Too many concurrent jobs (limit 1)"}

    slow_call = threading.Thread(target=openai, args=(sim,))
    slow_call.start()
    time.sleep(0.2)
    busy = openai(sim)
    slow_call.join()
    assert busy.status_code == 429 and busy.headers["Retry-After"]
    assert busy.json()["error"]["message"] == "Too many concurrent requests (limit 1)"
    assert busy.json()["error"]["code"] == "rate_limit_exceeded"

    sim.update(max_in_flight=None, rate_limit_rps=0.5, rate_limit_burst=1)
    assert api.get("/v2/me").status_code == 200
    rate = api.get("/v2/me")
    assert (rate.status_code, rate.json()) == (429, {"error": "Rate limit exceeded"})
    assert int(rate.headers["Retry-After"]) >= 1

    sim.update(rate_limit_rps=None, faults={"error_429": 1})
    assert api.get("/v2/me").json() == {"error": "Too many requests"}

    ledger = sim.ledger()
    assert ledger["rate_limited"] == {"concurrency": 2, "rate": 1, "read_rate": 0, "fault": 1}
    assert ledger["rate_limited_by_provider"] == {
        "apiframe": {"concurrency": 1, "rate": 1, "read_rate": 0, "fault": 1},
        "openai": {"concurrency": 1, "rate": 0, "read_rate": 0, "fault": 0},
    }
    sim.reset()
    assert sim.ledger()["rate_limited"] == {"concurrency": 0, "rate": 0, "read_rate": 0, "fault": 0}


# -- tiny images -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "fmt", "size"),
    [
        ({"aspect_ratio": "3:2", "output_format": "png"}, "png", (96, 64)),
        ({"aspect_ratio": "2:3", "output_format": "jpeg"}, "jpeg", (64, 96)),
        ({"output_format": "webp"}, "webp", (64, 64)),
        ({"background": "transparent", "output_format": "png"}, "png", (64, 64)),
    ],
)
def test_tiny_images_are_small_complete_distinct_files(
    sim: Simulator, api: httpx.Client, params: dict[str, Any], fmt: str, size: tuple[int, int]
) -> None:
    sim.update(image_mode="tiny")
    job = run(api, number_of_images=2, **params)
    with httpx.Client(timeout=5) as cdn:
        bodies = [cdn.get(url).content for url in job["result"]["images"]]
    assert bodies[0] != bodies[1], "each image is its own"
    for data in bodies:
        fetched = verify(data, fmt)  # the pipeline's own check: decodes, has its end marker
        assert (fetched.width, fetched.height) == size
        assert len(data) < 2000
    if params.get("background") == "transparent":
        assert Image.open(io.BytesIO(bodies[0])).mode == "RGBA"


def test_tiny_mode_applies_to_inline_images_and_full_stays_the_default(sim: Simulator) -> None:
    assert sim.config.image_mode == "full"
    sim.update(image_mode="tiny")
    body = openai(sim, size="1024x1536", output_format="jpeg", n=2).json()
    images = [verify(base64.b64decode(item["b64_json"]), "jpeg") for item in body["data"]]
    assert [(i.width, i.height) for i in images] == [(64, 96), (64, 96)]
    assert images[0].sha256 != images[1].sha256
    assert body["size"] == "1024x1536", "the response still describes the size asked for"


def test_corrupt_marker_still_corrupts_tiny_images(sim: Simulator, api: httpx.Client) -> None:
    sim.update(image_mode="tiny")
    job = run(api, "[[corrupt]] a vase")
    data = httpx.get(job["result"]["images"][0], timeout=5).content
    with pytest.raises(DownloadError, match="image is not whole"):
        verify(data)


# -- latency: exact timestamps, stable or jittered ------------------------------------------------


def test_created_and_completed_at_differ_by_exactly_the_latency(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(latency_s=0.25)
    for _ in range(3):
        job = run(api)
        assert job["createdAt"].endswith("Z") and job["completedAt"].endswith("Z")
        assert ms(job["completedAt"]) - ms(job["createdAt"]) == 250


def test_jittered_latency_is_spread_bounded_and_reproducible_for_a_seed() -> None:
    def durations(seed: int) -> list[int]:
        config = SimulatorConfig(latency_s=0.05, latency_jitter_s=0.2, faults=Faults(seed=seed))
        with (
            Simulator(config) as simulator,
            httpx.Client(base_url=simulator.base_url, headers={"X-API-Key": KEY}) as client,
        ):
            ids = [submit(client, f"a kite {i}").json()["jobId"] for i in range(6)]
            jobs = [wait(client, job_id) for job_id in ids]
        return [ms(j["completedAt"]) - ms(j["createdAt"]) for j in jobs]

    first = durations(5)
    assert all(50 <= d <= 250 for d in first) and len(set(first)) > 1
    assert durations(5) == first


def test_sync_latency_jitter(sim: Simulator) -> None:
    sim.update(sync_latency_s=0.0, sync_latency_jitter_s=0.2)
    took = []
    for _ in range(4):
        started = time.monotonic()
        assert openai(sim, quality="low").status_code == 200
        took.append(time.monotonic() - started)
    assert max(took) - min(took) > 0.01 and max(took) < 1.0
