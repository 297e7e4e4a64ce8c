"""The simulator bills from its own price table, not the client's: every surface, every quality."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from jobs.simulator import Simulator, SimulatorConfig, prices
from tests.harness import ROOT

TOKEN = "sk-test"
QUALITIES: tuple[str | None, ...] = (None, "auto", "low", "medium", "high")
SIMULATOR = ROOT / "jobs" / "simulator"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(sync_latency_s=0, image_mode="tiny")) as simulator:
        yield simulator


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def charged(sim: Simulator, provider: str) -> float:
    amount: float = sim.ledger()["credits_charged"].get(provider, 0)
    return amount


def bill_of(sim: Simulator, provider: str, send: Any) -> float:
    before = charged(sim, provider)
    response = send()
    assert response.status_code in (200, 202), response.text
    return round(charged(sim, provider) - before, 6)


def with_quality(body: dict[str, Any], quality: str | None) -> dict[str, Any]:
    return body if quality is None else body | {"quality": quality}


# (provider, path, model, sizes as the request names them → the size billed, qualities)
SYNC: list[tuple[str, str, str, dict[str, str], tuple[str | None, ...]]] = [
    (
        "openai",
        "/v1/images/generations",
        model,
        {s: s for s in prices.STANDARD_SIZES} | {"auto": prices.SQUARE},
        QUALITIES,
    )
    for model in ("gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini")
] + [
    (
        "aimlapi",
        "/v1/images/generations",
        "openai/gpt-image-1-5",
        {s: s for s in prices.STANDARD_SIZES},
        (None, "low", "medium", "high"),
    ),
    (
        "omixa",
        "/api/v1/images/generations",
        "gpt-image-1.5",
        {s: s for s in prices.STANDARD_SIZES} | {"auto": prices.SQUARE},
        QUALITIES,
    ),
    (
        "oxen",
        "/api/ai/images/generate",
        "gpt-image-1-5",
        {"square": prices.SQUARE, "landscape": prices.LANDSCAPE, "portrait": prices.PORTRAIT},
        QUALITIES,
    ),
]


@pytest.mark.parametrize(
    ("provider", "path", "model", "sizes", "qualities"), SYNC, ids=[f"{s[0]}-{s[2]}" for s in SYNC]
)
def test_every_synchronous_call_is_billed_what_the_simulators_table_says(
    sim: Simulator,
    http: httpx.Client,
    provider: str,
    path: str,
    model: str,
    sizes: dict[str, str],
    qualities: tuple[str | None, ...],
) -> None:
    url = sim.url_for(provider) + path
    headers = {"Authorization": f"Bearer {TOKEN}"}
    n = 1 if provider == "aimlapi" else 2  # AI/ML API's schema takes n=1 only
    for asked, billed_size in sizes.items():
        for quality in qualities:
            body = with_quality(
                {"model": model, "prompt": "a kettle", "size": asked, "n": n}, quality
            )
            bill = bill_of(sim, provider, lambda b=body: http.post(url, json=b, headers=headers))
            each = prices.listed(provider, model, quality, billed_size)
            assert each is not None, (model, quality, billed_size)
            assert bill == pytest.approx(n * each), (provider, model, quality, asked)


@pytest.mark.parametrize("quality", QUALITIES)
@pytest.mark.parametrize("aspect", ["1:1", "3:2", "2:3"])
def test_every_apiframe_job_is_billed_what_the_simulators_table_says(
    sim: Simulator, http: httpx.Client, quality: str | None, aspect: str
) -> None:
    params = with_quality({"aspect_ratio": aspect, "number_of_images": 3}, quality)
    body = {"model": "gpt-image-1.5", "prompt": "a kettle", "gptImageParams": params}
    bill = bill_of(
        sim,
        "apiframe",
        lambda: http.post(
            sim.base_url + "/v2/images/generate", json=body, headers={"X-API-Key": "afk_test"}
        ),
    )
    expected = {None: 24, "auto": 24, "low": 4, "medium": 9, "high": 24}[quality]
    assert bill == 3 * expected


@pytest.mark.parametrize(
    ("provider", "model", "quality", "size", "usd"),
    [
        ("openai", "gpt-image-1.5", "low", "1024x1024", 0.009),
        ("openai", "gpt-image-1.5", "auto", "1536x1024", 0.2),
        ("openai", "gpt-image-1.5", "medium", "1024x1536", 0.05),
        ("openai", "gpt-image-1", "high", "1536x1024", 0.25),
        ("openai", "gpt-image-1", None, "1024x1024", 0.167),
        ("openai", "gpt-image-1-mini", "medium", "1024x1024", 0.011),
        ("openai-batch", "gpt-image-1.5", "high", "1536x1024", 0.1),
        ("openai-batch", "gpt-image-1-mini", "low", "1024x1024", 0.0025),
        ("aimlapi", "openai/gpt-image-1-5", None, "1024x1024", 88.4),
        ("omixa", "gpt-image-1.5", "auto", "1536x1024", 0.039),
        ("oxen", "gpt-image-1-5", "high", "1024x1536", 0.167),
    ],
)
def test_the_table_holds_the_published_prices(
    provider: str, model: str, quality: str | None, size: str, usd: float
) -> None:
    assert prices.per_image(provider, model, quality, size) == pytest.approx(usd)


def test_a_model_with_no_published_price_is_billed_the_named_placeholder(
    sim: Simulator, http: httpx.Client
) -> None:
    body = {"model": "gpt-image-2", "prompt": "a kettle", "size": "2048x1152", "quality": "low"}
    url = sim.url_for("openai") + "/v1/images/generations"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert bill_of(sim, "openai", lambda: http.post(url, json=body, headers=headers)) == 1.0
    assert prices.PLACEHOLDER_PER_IMAGE == {"USD": 1.0, "credits": 100.0}
    frame = {"model": "gpt-image-2", "prompt": "a kettle"}
    send = lambda: http.post(  # noqa: E731
        sim.base_url + "/v2/images/generate", json=frame, headers={"X-API-Key": "afk_test"}
    )
    assert bill_of(sim, "apiframe", send) == 100
    assert prices.per_image("openai-batch", "gpt-image-2", "high", "1024x1024") == 0.5


def test_the_simulator_never_imports_the_clients_prices() -> None:
    """Style §24: a shared table would hide a wrong client price from every test."""
    for module in SIMULATOR.glob("*.py"):
        tree = ast.parse(module.read_text())
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert not {
            m for m in imported if m and m.startswith(("jobs.pricing", "jobs.providers"))
        }, module.name
