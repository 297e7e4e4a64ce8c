"""OpenAI's image models: sizes and prices before any money is spent, and the simulator agreeing."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from jobs.manifest.request import FREE_SIZE_MODELS, ImageRequest
from jobs.providers.openai import OpenAI
from jobs.providers.openai_batch import OpenAIBatch
from jobs.providers.openai_models import MODELS as MODELS_TABLE
from jobs.providers.openai_models import max_price, price, size_problem
from jobs.settings import ProviderConfig
from jobs.simulator import Simulator, SimulatorConfig
from jobs.validate import tally

MODELS = ("gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini", "gpt-image-2")
FIXED = ("gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini")
SIZES = [
    "auto",
    "1024x1024",
    "1536x1024",
    "1024x1536",
    "2048x1152",
    "3840x2160",
    "2160x3840",
    "1008x3024",
    "1000x1000",
    "3856x2160",
    "2176x2176",
    "512x1600",
    "0x1024",
    "big",
    "1024X1024",
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("size", ["auto", "1024x1024", "1536x1024", "1024x1536"])
def test_every_model_takes_the_standard_sizes_and_auto(model: str, size: str) -> None:
    assert size_problem(model, size) is None


@pytest.mark.parametrize("model", FIXED)
def test_older_models_refuse_a_free_size_and_say_which_sizes_they_take(model: str) -> None:
    problem = size_problem(model, "2048x1152")
    assert problem is not None and "auto, 1024x1024, 1536x1024, 1024x1536" in problem


@pytest.mark.parametrize("size", ["2048x1152", "3840x2160", "2160x3840", "1008x3024", "16x48"])
def test_gpt_image_2_takes_any_size_within_its_rules(size: str) -> None:
    assert size_problem("gpt-image-2", size) is None


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ("1000x1000", "multiples of 16"),
        ("0x1024", "multiples of 16"),
        ("512x1600", "between 1:3 and 3:1"),
        ("3856x2160", "at most 3840x2160"),
        ("2176x2176", "at most 3840x2160"),
        ("big", "WIDTHxHEIGHT"),
        ("1024X1024", "WIDTHxHEIGHT"),
    ],
)
def test_gpt_image_2_refuses_a_size_outside_its_rules_with_a_reason(size: str, reason: str) -> None:
    problem = size_problem("gpt-image-2", size)
    assert problem is not None and reason in problem


def test_an_unknown_model_is_named_in_the_problem() -> None:
    problem = size_problem("dall-e-4", "1024x1024")
    assert problem is not None and "dall-e-4" in problem and "gpt-image-1.5" in problem


@pytest.mark.parametrize(
    ("model", "quality", "size", "usd"),
    [
        ("gpt-image-1.5", "low", "1024x1024", 0.009),
        ("gpt-image-1.5", "medium", "1024x1024", 0.034),
        ("gpt-image-1.5", "high", "1024x1024", 0.133),
        ("gpt-image-1.5", "low", "1536x1024", 0.013),
        ("gpt-image-1.5", "medium", "1024x1536", 0.05),
        ("gpt-image-1.5", "high", "1536x1024", 0.2),
        ("gpt-image-1.5", "auto", "1024x1024", 0.133),
        ("gpt-image-1.5", None, "1024x1536", 0.2),
        ("gpt-image-1-mini", "low", "1024x1024", 0.005),
        ("gpt-image-1-mini", "medium", "1024x1024", 0.011),
        ("gpt-image-1-mini", "high", "1024x1024", 0.036),
        ("gpt-image-1-mini", "high", "1536x1024", 0.052),
        ("gpt-image-1", "low", "1024x1024", 0.011),
        ("gpt-image-1", "medium", "1024x1024", 0.042),
        ("gpt-image-1", "high", "1024x1024", 0.167),
        ("gpt-image-1", "low", "1024x1536", 0.016),
        ("gpt-image-1", "medium", "1536x1024", 0.063),
        ("gpt-image-1", "high", "1536x1024", 0.25),
    ],
)
def test_list_price_per_image_by_model_quality_and_size(
    model: str, quality: str | None, size: str, usd: float
) -> None:
    assert price(model, quality, size) == pytest.approx(usd)


@pytest.mark.parametrize(
    ("model", "quality", "size"),
    [
        ("gpt-image-2", "low", "1024x1024"),
        ("gpt-image-2", "high", "2048x1152"),
        ("gpt-image-1.5", "high", "2048x1152"),
        ("gpt-image-1.5", "ultra", "1024x1024"),
        ("gpt-image-1.5", "high", "auto"),
        ("gpt-image-1.5", "high", None),
        ("dall-e-4", "high", "1024x1024"),
    ],
)
def test_a_price_that_is_not_known_is_none_never_a_guess(
    model: str, quality: str | None, size: str | None
) -> None:
    assert price(model, quality, size) is None


def test_the_most_an_auto_size_can_cost_is_the_dearest_standard_size() -> None:
    assert max_price("gpt-image-1.5", "medium") == pytest.approx(0.05)
    assert max_price("gpt-image-1", None) == pytest.approx(0.25)
    assert max_price("gpt-image-2", "low") is None


def test_the_openai_adapter_estimates_a_non_square_line_at_its_list_price() -> None:
    config = ProviderConfig("openai", "http://127.0.0.1:9", None, 4, 2.0, 30.0)
    adapter = OpenAI(config)
    try:
        wide = ImageRequest(prompt="x", size="1536x1024", quality="high", n=2)
        assert adapter.estimate(wide) == pytest.approx(0.4)
        square = ImageRequest(prompt="x", size="1024x1024", quality="low")
        assert adapter.estimate(square) == pytest.approx(0.009)
    finally:
        adapter.close()


# --- issue 18 item 5: the OpenAI providers take every GPT image model, each at its own sizes ---


def adapters() -> Iterator[OpenAI]:
    for name in ("openai", "openai-batch"):
        config = ProviderConfig(name, "http://127.0.0.1:9", None, 4, 2.0, 30.0)
        yield (OpenAIBatch if name == "openai-batch" else OpenAI)(config)


@pytest.mark.parametrize("model", MODELS)
def test_both_openai_providers_take_every_gpt_image_model(model: str) -> None:
    for adapter in adapters():
        try:
            for size in ("auto", "1024x1024", "1536x1024", "1024x1536"):
                line = ImageRequest(prompt="x", model=model, size=size)
                assert adapter.validate(line) == [], (adapter.name, model, size)
            assert adapter.validate(ImageRequest(prompt="x", model="dall-e-3")) != []
        finally:
            adapter.close()


@pytest.mark.parametrize("size", SIZES)
def test_a_free_size_reaches_the_adapter_only_for_gpt_image_2_which_checks_its_rules(
    size: str,
) -> None:
    for model in MODELS:
        try:
            line = ImageRequest(prompt="x", model=model, size=size)
        except ValidationError as exc:
            # The manifest refuses it outright: a size no model takes, or a free size for a
            # model without free sizes (the manifest's own message names the fixed sizes).
            assert "is not one of auto, 1024x1024, 1536x1024, 1024x1536" in str(exc)
            assert size_problem(model, size) is not None
            continue
        for adapter in adapters():
            try:
                problems = adapter.validate(line)
            finally:
                adapter.close()
            assert (problems == []) == (size_problem(model, size) is None), (model, size)


def test_the_manifest_s_free_size_models_are_the_rules_free_size_models() -> None:
    assert {name for name, m in MODELS_TABLE.items() if m.flexible_sizes} == FREE_SIZE_MODELS


def test_a_model_without_a_published_price_is_unknown_not_guessed() -> None:
    for adapter in adapters():
        try:
            line = ImageRequest(prompt="x", model="gpt-image-2", size="2048x1152", quality="low")
            assert not adapter.price_known(line) and adapter.estimate(line) == 0.0
            known = ImageRequest(prompt="x", model="gpt-image-1-mini", quality="low")
            assert adapter.price_known(known) and adapter.estimate(known) > 0
        finally:
            adapter.close()


def test_plan_counts_the_lines_whose_price_is_unknown_apart() -> None:
    lines = [
        {"prompt": "a", "model": "gpt-image-2", "size": "2048x1152"},
        {"prompt": "b", "model": "gpt-image-2"},
        {"prompt": "c", "model": "gpt-image-1.5", "quality": "low"},
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    adapter = next(adapters())
    try:
        plan = tally([data], lambda name: adapter, "openai")
    finally:
        adapter.close()
    assert plan.valid == 3 and plan.unpriced == {"gpt-image-2": 2}
    assert plan.estimate.by_currency == {"USD": pytest.approx(0.009)}


# --- the simulator's own rules agree -----------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(sync_latency_s=0, image_mode="tiny")) as simulator:
        yield simulator


@pytest.mark.parametrize("model", MODELS)
def test_the_simulator_accepts_exactly_the_sizes_the_client_rules_accept(
    sim: Simulator, model: str
) -> None:
    url = sim.url_for("openai") + "/v1/images/generations"
    with httpx.Client(headers={"Authorization": "Bearer sk-test"}, timeout=10) as http:
        for size in SIZES:
            body = {"model": model, "prompt": "a kettle", "size": size, "quality": "low"}
            response = http.post(url, json=body)
            accepted = size_problem(model, size) is None
            assert response.status_code == (200 if accepted else 400), (model, size, response.text)
            if not accepted:
                assert response.json()["error"]["param"] == "size"


def test_the_simulator_draws_a_gpt_image_2_image_at_the_free_size_asked(sim: Simulator) -> None:
    sim.update(image_mode="full")
    try:
        body = {"model": "gpt-image-2", "prompt": "a kettle", "size": "2048x1152", "n": 1}
        response = httpx.post(
            sim.url_for("openai") + "/v1/images/generations",
            json=body,
            headers={"Authorization": "Bearer sk-test"},
            timeout=30,
        )
    finally:
        sim.update(image_mode="tiny")
    assert response.status_code == 200 and response.json()["size"] == "2048x1152"
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.size == (2048, 1152)
