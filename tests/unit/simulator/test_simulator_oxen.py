"""Oxen's model object and request schema: what the simulator serves, that it accepts exactly
what that schema says, and how the Oxen adapter reads it (or falls back) to validate lines."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from pydantic import SecretStr

from jobs.manifest.request import ImageRequest
from jobs.providers.oxen import FALLBACK_SCHEMA, Oxen
from jobs.settings import Settings
from jobs.simulator import Faults, Simulator, SimulatorConfig
from jobs.simulator.oxen_models import GPT_IMAGE_1_5_SCHEMA
from jobs.simulator.validation import from_json_schema, validate

TOKEN = "sk-oxen-secret-token-1234"
MODEL_LABEL = "GET /oxen/api/ai/models/{id}"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(sync_latency_s=0.0)) as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def _fresh(sim: Simulator) -> Iterator[None]:
    sim.reset()
    yield
    sim.update(faults=Faults())
    sim.reset()


def get_model(sim: Simulator, model: str, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{sim.url_for('oxen')}/api/ai/models/{model}", headers=headers, timeout=5)


def generate(sim: Simulator, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-image-1-5", "prompt": "an ox in the snow"} | body
    return httpx.post(
        f"{sim.url_for('oxen')}/api/ai/images/generate",
        json=payload,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )


# -- the simulator's model object -------------------------------------------------------------


def test_model_object_carries_a_json_schema_with_every_documented_field(sim: Simulator) -> None:
    response = get_model(sim, "gpt-image-1-5")
    assert response.status_code == 200
    model = response.json()
    assert model["id"] == "gpt-image-1-5"
    schema = model["json_request_schema"]
    Draft202012Validator.check_schema(schema)
    assert (schema["type"], schema["additionalProperties"]) == ("object", False)
    assert "prompt" in schema["required"]
    props = schema["properties"]
    assert {"prompt", "input_image", "output_format", "size"} <= set(props)  # seed 000's table
    assert {"quality", "input_fidelity", "background"} <= set(props)  # seed 000's prose
    assert {"response_format", "n", "target_namespace"} <= set(props)  # the endpoint's own
    assert props["background"]["enum"] == ["auto", "transparent", "opaque"]
    assert props["quality"]["enum"] == ["auto", "low", "medium", "high"]
    assert props["input_fidelity"]["enum"] == ["low", "high"]
    assert props["size"]["enum"] == ["auto", "square", "portrait", "landscape"]
    assert props["output_format"]["enum"] == ["webp", "jpeg", "png"]


def test_unknown_model_is_oxen_404_and_the_route_needs_the_key(sim: Simulator) -> None:
    missing = get_model(sim, "flux-9")
    assert (missing.status_code, missing.json()) == (404, {"error": "Model 'flux-9' not found"})
    assert get_model(sim, "gpt-image-1-5", token=None).status_code == 401
    assert sim.ledger()["requests"] == {f"{MODEL_LABEL} 404": 1, f"{MODEL_LABEL} 401": 1}


def test_generate_passes_quality_fidelity_and_background(sim: Simulator) -> None:
    response = generate(
        sim,
        quality="high",
        background="transparent",
        input_fidelity="high",
        input_image=["https://example.com/ref.png"],
        output_format="png",
    )
    assert response.status_code == 200, response.text
    bad = generate(sim, input_fidelity="auto")
    assert bad.status_code == 400 and "input_fidelity" in bad.json()["error"]


BODIES: list[dict[str, Any]] = [
    {},
    {"quality": "medium", "background": "opaque", "size": "portrait", "n": 2},
    {"input_fidelity": "low", "response_format": "b64_json", "output_format": "webp"},
    {"target_namespace": "team-a"},
    {"input_image": ["data:image/png;base64,AAAA"]},
    {"quality": "ultra"},
    {"background": "none"},
    {"input_fidelity": "auto"},
    {"size": "1024x1024"},
    {"n": 0},
    {"n": 11},
    {"n": "2"},
    {"target_namespace": ""},
    {"input_image": "https://example.com/a.png"},
    {"input_image": ["ftp://example.com/a.png"]},
    {"prompt": ""},
    {"seed": 7},
    {"model": "gpt-image-2"},
]


@pytest.mark.parametrize("fields", BODIES, ids=lambda f: "-".join(map(str, f.items())) or "plain")
def test_the_simulator_accepts_exactly_what_its_served_schema_says(
    sim: Simulator, fields: dict[str, Any]
) -> None:
    served = get_model(sim, "gpt-image-1-5").json()["json_request_schema"]
    body = {"model": "gpt-image-1-5", "prompt": "an ox"} | fields
    valid = Draft202012Validator(served).is_valid(body)
    assert (generate(sim, **fields).status_code == 200) is valid


def test_schema_compiler_refuses_keywords_it_does_not_implement() -> None:
    check = from_json_schema(GPT_IMAGE_1_5_SCHEMA)
    assert validate(check, {"model": "gpt-image-1-5", "prompt": "x"}) == []
    unsupported: dict[str, Any]
    for unsupported in ({"oneOf": []}, {"type": "number"}, {"enum": [1, 2]}, {"$ref": "#/x"}):
        with pytest.raises(ValueError, match=r"unsupported|only string"):
            from_json_schema(unsupported)
    open_object = from_json_schema({"type": "object", "properties": {}})
    assert validate(open_object, {"anything": 1}) == []


# -- the adapter reads it ----------------------------------------------------------------------


def adapter(base_url: str, key: str | None = TOKEN, client: httpx.Client | None = None) -> Oxen:
    overrides: dict[str, Any] = {"oxen_base_url": base_url}
    if key is not None:
        overrides["oxen_api_key"] = SecretStr(key)
    settings = Settings(_env_file=None, **overrides)  # type: ignore[call-arg]
    return Oxen(settings.provider_config("oxen"), client)


def line(**fields: Any) -> ImageRequest:
    return ImageRequest.model_validate({"prompt": "an ox in the snow", **fields})


@pytest.fixture
def make() -> Iterator[Callable[..., Oxen]]:
    made: list[Oxen] = []

    def build(*args: Any, **kwargs: Any) -> Oxen:
        made.append(adapter(*args, **kwargs))
        return made[-1]

    yield build
    for one in made:
        one.close()


def test_adapter_fetches_the_schema_once_and_passes_the_fields_through(
    sim: Simulator, make: Callable[..., Oxen]
) -> None:
    oxen = make(sim.url_for("oxen"))
    rich = line(quality="high", background="transparent", input_fidelity="high", size="1536x1024")
    rich = rich.model_copy(update={"input_images": ["https://example.com/ref.png"]})
    barrier = threading.Barrier(8)
    verdicts: list[list[tuple[str, str]]] = []

    def check() -> None:
        barrier.wait()
        verdicts.append(oxen.validate(rich))

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verdicts == [[]] * 8
    assert oxen.schema_source == "provider"
    assert sim.ledger()["requests"] == {f"{MODEL_LABEL} 200": 1}
    body = oxen.body(rich)
    assert (body["quality"], body["background"], body["input_fidelity"]) == (
        "high",
        "transparent",
        "high",
    )
    oxen.submit(rich, "line-1")
    assert sim.ledger()["submits"] == 1


def test_adapter_names_the_manifest_field_and_what_oxen_accepts(
    sim: Simulator, make: Callable[..., Oxen]
) -> None:
    oxen = make(sim.url_for("oxen"))
    assert oxen.validate(line(input_fidelity="auto")) == [
        ("input_fidelity", "Oxen's gpt-image-1-5 accepts input_fidelity low, high")
    ]
    assert oxen.validate(line(provider_params={"seed": 3})) == [
        ("provider_params", "Oxen's gpt-image-1-5 has no seed parameter")
    ]
    assert oxen.validate(line(provider_params={"target_namespace": ""})) == [
        (
            "provider_params",
            "Oxen's gpt-image-1-5 does not accept this provider_params.target_namespace"
            " (minLength 1)",
        )
    ]
    assert oxen.validate(line(provider_params={"target_namespace": "team-a"})) == []
    assert ("moderation", "oxen has no moderation setting") in oxen.validate(line(moderation="low"))


def test_a_live_schema_is_followed_and_request_schema_is_accepted_too(
    make: Callable[..., Oxen],
) -> None:
    narrowed = copy.deepcopy(GPT_IMAGE_1_5_SCHEMA)
    narrowed["properties"]["quality"]["enum"] = ["high"]
    narrowed["properties"]["size"]["enum"] = ["square", "landscape"]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "gpt-image-1-5", "request_schema": narrowed})

    oxen = make("https://oxen.test", client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert oxen.validate(line(quality="high", size="1024x1024")) == []
    assert oxen.validate(line(quality="low")) == [
        ("quality", "Oxen's gpt-image-1-5 accepts quality high")
    ]
    assert oxen.validate(line(size="1024x1536")) == [
        ("size", "Oxen's gpt-image-1-5 accepts size 1024x1024, 1536x1024")
    ]
    assert [str(r.url) for r in seen] == ["https://oxen.test/api/ai/models/gpt-image-1-5"]
    assert seen[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_a_schema_without_model_or_response_format_does_not_reject_every_line(
    make: Callable[..., Oxen],
) -> None:
    bare = copy.deepcopy(GPT_IMAGE_1_5_SCHEMA)
    for name in ("model", "response_format"):
        del bare["properties"][name]
    bare["required"] = ["prompt"]
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, json={"json_request_schema": bare})
    )
    oxen = make("https://oxen.test", client=httpx.Client(transport=transport))
    assert oxen.validate(line(quality="low")) == []
    assert oxen.schema_source == "provider"


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError(f"connection refused (sent {TOKEN})", request=request)


UNREADABLE: list[Callable[[httpx.Request], httpx.Response]] = [
    lambda r: httpx.Response(503, json={"error": "Service unavailable"}),
    lambda r: httpx.Response(401, json={"error": f"Incorrect API key {TOKEN}"}),
    lambda r: httpx.Response(200, content=b"<html>not json</html>"),
    lambda r: httpx.Response(200, json={"id": "gpt-image-1-5"}),
    lambda r: httpx.Response(200, json={"json_request_schema": {"type": 5}}),
    lambda r: httpx.Response(302, headers={"Location": "https://elsewhere.test/schema"}),
    refused,
]


@pytest.mark.parametrize("answer", UNREADABLE, ids=range(len(UNREADABLE)))
def test_an_unreadable_schema_falls_back_quietly_and_never_shows_the_key(
    make: Callable[..., Oxen],
    caplog: pytest.LogCaptureFixture,
    answer: Callable[[httpx.Request], httpx.Response],
) -> None:
    oxen = make("https://oxen.test", client=httpx.Client(transport=httpx.MockTransport(answer)))
    with caplog.at_level(logging.DEBUG):
        assert oxen.validate(line(quality="high", background="opaque")) == []
        assert oxen.validate(line(input_fidelity="auto"))[0][0] == "input_fidelity"
    assert oxen.schema_source == "fallback"
    assert "cannot read the gpt-image-1-5 request schema" in caplog.text
    assert TOKEN not in caplog.text


def test_faults_on_the_real_route_fall_back_and_without_a_key_nothing_is_fetched(
    sim: Simulator, make: Callable[..., Oxen]
) -> None:
    sim.update(faults=Faults(error_5xx=1))
    assert make(sim.url_for("oxen")).validate(line(quality="low")) == []
    sim.update(faults=Faults())
    sim.reset()
    keyless = make(sim.url_for("oxen"), key=None)
    assert keyless.validate(line(quality="low")) == []
    assert keyless.schema_source == "fallback" and sim.ledger()["requests"] == {}


def test_fallback_agrees_with_the_served_schema_on_the_documented_fields() -> None:
    served = GPT_IMAGE_1_5_SCHEMA["properties"]
    for name, spec in FALLBACK_SCHEMA["properties"].items():
        if "enum" in spec:
            assert spec["enum"] == served[name]["enum"], name
    assert set(FALLBACK_SCHEMA["properties"]) <= set(served)
