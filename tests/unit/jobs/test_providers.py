"""Every provider adapter against that provider's own documentation, and over real HTTP.

The request-body schemas in ``tests/schemas/`` are transcribed from the provider docs the
project started from (the seeds, listed in ``docs/providers.md``) and from that page, never from the
adapters, so a field an adapter invents, renames or mis-spells fails here:

- ``aimlapi.json`` is the OpenAPI document embedded in seed 003 (docs.aimlapi.com, page
  "gpt-image-1-5", section "API Schema"), at
  ``paths./v1/images/generations.post.requestBody.content.application/json.schema``,
  copied verbatim (``json.dumps`` of that object, nothing added or removed).
- ``apiframe.json``: docs/providers.md, "APIFrame: the request", plus the ``gptImageParams``
  table of seed 001.
- ``openai.json``: docs/providers.md, "OpenAI: generations".
- ``omixa.json``: the field table of seed 002.
- ``oxen.json``: the field table of seed 000, the fields its prose names (quality, input
  fidelity, background) and ``response_format``, ``n``, ``target_namespace``
  (docs/providers.md, Oxen).

The HTTP half runs each adapter against the in-process simulator (one per module), which
serves all five APIs; it is reset and its config restored after every test that uses it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import httpx
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import SecretStr

from jobs.errors import (
    AmbiguousSubmit,
    BatchStop,
    JobFailed,
    PermanentProviderError,
    TransientProviderError,
)
from jobs.fetch.download import fetch
from jobs.manifest.request import ImageRequest
from jobs.providers import build, create, http, names
from jobs.providers.base import Artifact, Finished, Pending, Provider, SubmitOutcome, Submitted
from jobs.settings import PROVIDER_NAMES, Settings
from jobs.simulator import Faults, Simulator, SimulatorConfig
from tests.harness import ROOT, SCHEMAS

AIMLAPI_SEED = Path("/work/shared/seeds/003_8048455bc0784a35.txt")
"""Where aimlapi.json was copied from; the verbatim check is skipped where it is absent."""

PROVIDERS = ("apiframe", "openai", "aimlapi", "omixa", "oxen")
SYNC = tuple(p for p in PROVIDERS if p != "apiframe")
REPORTS_COST = ("apiframe", "aimlapi", "omixa")
"""Providers whose response says what the call cost (creditCost, credits_used, billed_amount)."""
GOOD_KEYS = {"apiframe": "afk_test_key", **{p: "sk-test-key" for p in SYNC}}
BAD_KEYS = {"apiframe": "sk-not-an-apiframe-key", **{p: "invalid-key" for p in SYNC}}
LOCAL = frozenset({"127.0.0.1"})
MAX_BYTES = 20 * 1024 * 1024
POLL_DEADLINE_S = 10.0
DIMENSIONS = {"1024x1024": (1024, 1024), "1536x1024": (1536, 1024), "1024x1536": (1024, 1536)}
DATA_URL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAE="


def load_catalog() -> list[ImageRequest]:
    lines = (ROOT / "examples" / "catalog.jsonl").read_text().splitlines()
    return [ImageRequest.model_validate(json.loads(line)) for line in lines if line.strip()]


CATALOG = load_catalog()
EXTRA_FIELDS: dict[str, dict[str, Any]] = {
    "high-opaque-jpeg": {"quality": "high", "background": "opaque", "output_format": "jpeg"},
    "low-transparent-png": {"quality": "low", "background": "transparent", "size": "1024x1024"},
    "medium-transparent-webp": {
        "quality": "medium",
        "background": "transparent",
        "output_format": "webp",
        "size": "1536x1024",
    },
    "auto-quality-auto-size": {"quality": "auto", "size": "auto", "n": 3},
    "moderation-low": {"moderation": "low", "quality": "medium", "n": 10},
    "compression-jpeg": {"output_compression": 60, "output_format": "jpeg"},
    "compression-webp": {"output_compression": 0, "output_format": "webp", "quality": "low"},
    "compression-default-format": {"output_compression": 80},
    "input-data-url": {"input_images": [DATA_URL], "input_fidelity": "high"},
    "input-https-url": {
        "input_images": ["https://images.example.com/ref-1.png"],
        "size": "1024x1536",
    },
    "input-fidelity-auto": {"input_images": [DATA_URL], "input_fidelity": "auto"},
    "prompt-at-apiframe-limit": {"prompt": ("a paper boat on a rainy street " * 65)[:2000]},
}
EXTRA = [
    ImageRequest.model_validate({"id": f"extra-{name}", "prompt": "a paper boat", **fields})
    for name, fields in EXTRA_FIELDS.items()
]


class BuildsBodies(Provider, Protocol):
    """Both adapter families expose the body they would send, for exactly these checks."""

    def body(self, request: ImageRequest) -> dict[str, Any]: ...


def schema(provider: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / f"{provider}.json").read_text())
    if provider == "aimlapi":
        # The OpenAPI leaves additionalProperties open, but the page introduces the schema as
        # the one "which lists all available parameters" of this model: a field outside it is
        # at best ignored by AI/ML API, and in our body it can only mean adapter drift. So the
        # verbatim file stays untouched and the closed set is applied here.
        loaded = {**loaded, "additionalProperties": False}
    return loaded


def validator(provider: str) -> Draft202012Validator:
    return Draft202012Validator(schema(provider), format_checker=FormatChecker())


def one_request(adapter: Provider, request: ImageRequest) -> ImageRequest:
    """The request a split provider is sent (the pipeline buys a line in parts of at most this)."""
    if request.n <= adapter.max_images_per_request:
        return request
    return request.model_copy(update={"n": adapter.max_images_per_request})


def body_of(adapter: Provider, request: ImageRequest) -> dict[str, Any]:
    return cast(BuildsBodies, adapter).body(request)


def schema_errors(provider: str, body: dict[str, Any]) -> list[str]:
    errors = validator(provider).iter_errors(body)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}" for e in errors]


def request(**fields: Any) -> ImageRequest:
    return ImageRequest.model_validate({"prompt": "a paper boat", **fields})


@pytest.fixture(scope="module")
def offline() -> Iterator[dict[str, Provider]]:
    """Adapters as ``plan`` builds them: no key, no network, for validate/body/estimate."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    adapters = {name: build(name, settings) for name in PROVIDERS}
    yield adapters
    for adapter in adapters.values():
        adapter.close()


# -- the schemas themselves ---------------------------------------------------------------------


def test_every_registered_provider_has_a_request_schema() -> None:
    registered = set(names()) - {"simulator"}
    assert registered == set(PROVIDER_NAMES) == {*PROVIDERS, "openai-batch"}
    # openai-batch's is a line of its input file, whose body is openai's (test_openai_batch)
    assert {path.stem for path in SCHEMAS.glob("*.json")} == registered


@pytest.mark.parametrize("provider", PROVIDERS)
def test_request_schema_is_a_valid_json_schema(provider: str) -> None:
    Draft202012Validator.check_schema(schema(provider))


def test_aimlapi_schema_is_the_request_body_of_the_openapi_in_its_docs_verbatim() -> None:
    if not AIMLAPI_SEED.exists():
        pytest.skip(f"the AI/ML API docs copy {AIMLAPI_SEED} is not on this machine")
    text = AIMLAPI_SEED.read_text()
    start = text.index('{"openapi"')
    spec = json.JSONDecoder().raw_decode(text, start)[0]
    operation = spec["paths"]["/v1/images/generations"]["post"]
    documented = operation["requestBody"]["content"]["application/json"]["schema"]
    assert json.loads((SCHEMAS / "aimlapi.json").read_text()) == documented


@pytest.mark.parametrize(
    ("provider", "body"),
    [
        ("apiframe", {"model": "gpt-image-1.5", "prompt": "x", "gptImageParams": {"n": 2}}),
        ("apiframe", {"model": "gpt-image-1.5", "prompt": "x", "size": "1024x1024"}),
        ("openai", {"model": "gpt-image-1.5", "prompt": "x", "response_format": "url"}),
        ("aimlapi", {"model": "openai/gpt-image-1-5", "prompt": "x", "quality": "auto"}),
        ("aimlapi", {"model": "openai/gpt-image-1-5", "prompt": "x", "n": 2}),
        ("omixa", {"model": "gpt-image-1.5", "prompt": "x", "input_images": [DATA_URL]}),
        ("oxen", {"model": "gpt-image-1-5", "prompt": "x", "size": "1024x1024"}),
        ("oxen", {"model": "gpt-image-1-5", "prompt": "x", "input_fidelity": "auto"}),
        ("oxen", {"model": "gpt-image-1-5", "prompt": "x", "moderation": "low"}),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_request_schema_rejects_what_the_docs_rule_out(provider: str, body: dict[str, Any]) -> None:
    assert schema_errors(provider, body), "the schema is too loose to catch adapter drift"


# -- request bodies ------------------------------------------------------------------------------


def body_cases() -> Iterator[Any]:
    for provider in PROVIDERS:
        for line in [*CATALOG, *EXTRA]:
            yield pytest.param(provider, line, id=f"{provider}-{line.line_id}")


@pytest.mark.parametrize(("provider", "line"), list(body_cases()))
def test_adapter_body_matches_the_provider_documented_schema(
    offline: dict[str, Provider], provider: str, line: ImageRequest
) -> None:
    adapter = offline[provider]
    problems = adapter.validate(line)
    if problems:
        pytest.skip(f"{provider} rejects this line: {problems}")
    body = body_of(adapter, one_request(adapter, line))
    json.dumps(body)  # what goes on the wire
    assert schema_errors(provider, body) == []


@pytest.mark.parametrize("line", EXTRA, ids=lambda line: line.line_id)
def test_each_extra_line_is_accepted_by_some_provider(
    offline: dict[str, Provider], line: ImageRequest
) -> None:
    """Otherwise its body case would be skipped everywhere and check nothing."""
    assert any(not offline[p].validate(line) for p in PROVIDERS)


# -- validate() ----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_catalog_line_is_accepted(offline: dict[str, Provider], provider: str) -> None:
    rejected = {line.line_id: offline[provider].validate(line) for line in CATALOG}
    assert {k: v for k, v in rejected.items() if v} == {}


def reject(provider: str, fields: dict[str, Any], field: str, source: str) -> Any:
    shown = [str(v) if len(str(v)) <= 16 else type(v).__name__ for v in fields.values()]
    name = "-".join([provider, field, *shown])
    return pytest.param(provider, fields, field, source, id=name)


REJECTS = [
    # provider, manifest fields, the field validate() must name, where the docs rule it out
    reject("apiframe", {"prompt": "x" * 2001}, "prompt", "docs/providers.md: 1-2000 chars"),
    reject("apiframe", {"output_compression": 80}, "output_compression", "seed 001 table"),
    reject("apiframe", {"input_fidelity": "auto"}, "input_fidelity", "seed 001: low, high"),
    reject("apiframe", {"moderation": "low"}, "moderation", "seed 001 table"),
    reject("apiframe", {"model": "gpt-image-1"}, "model", "§1.3: no gpt-image-1 on v2"),
    reject("openai", {"input_images": ["https://x.example/a.png"]}, "input_images", "§2.1"),
    reject("openai", {"input_fidelity": "high"}, "input_fidelity", "§2.1 table"),
    reject(
        "openai",
        {"background": "transparent", "output_format": "jpeg"},
        "background",
        "§2.1: transparent needs png or webp",
    ),
    reject(
        "openai",
        {"output_compression": 50, "output_format": "png"},
        "output_compression",
        "§2.1: output_compression is jpeg/webp only",
    ),
    reject("aimlapi", {"quality": "auto"}, "quality", "OpenAPI enum: low, high, medium"),
    reject("aimlapi", {"size": "auto"}, "size", "OpenAPI enum: three fixed sizes"),
    reject("aimlapi", {"input_images": [DATA_URL]}, "input_images", "not in the OpenAPI"),
    reject("aimlapi", {"input_fidelity": "low"}, "input_fidelity", "not in the OpenAPI"),
    reject(
        "aimlapi",
        {"background": "transparent", "output_format": "jpeg"},
        "background",
        "OpenAPI: transparent needs png or webp",
    ),
    reject("omixa", {"output_compression": 80}, "output_compression", "seed 002 table"),
    reject(
        "omixa",
        {"input_images": ["https://x.example/a.png"]},
        "input_images",
        "seed 002: inline data URLs",
    ),
    reject("oxen", {"moderation": "low"}, "moderation", "seed 000 table"),
    reject("oxen", {"input_fidelity": "auto"}, "input_fidelity", "seed 000 prose: low, high"),
    reject("oxen", {"output_compression": 90}, "output_compression", "seed 000 table"),
    reject(
        "oxen",
        {"background": "transparent", "output_format": "jpeg"},
        "background",
        "transparent needs png or webp",
    ),
    reject("oxen", {"provider_params": {"seed": 1}}, "provider_params", "seed 000 table"),
    *[
        reject(p, {"model": "gpt-image-1"}, "model", "set up for gpt-image-1.5")
        for p in SYNC
        if p != "openai"
    ],
    reject("openai", {"model": "dall-e-3"}, "model", "issue 18: GPT image models only"),
    reject("openai", {"model": "gpt-image-2", "size": "1000x1000"}, "size", "multiples of 16"),
    reject("apiframe", {"model": "gpt-image-2", "size": "2048x1152"}, "size", "aspect ratios"),
]


@pytest.mark.parametrize(("provider", "fields", "field", "source"), REJECTS)
def test_validate_names_the_field_the_provider_does_not_accept(
    offline: dict[str, Provider], provider: str, fields: dict[str, Any], field: str, source: str
) -> None:
    problems = offline[provider].validate(request(**fields))
    assert field in [name for name, _ in problems], f"{source}: got {problems}"
    assert all(reason for _, reason in problems)


# -- over real HTTP against the simulator -------------------------------------------------------


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.1, sync_latency_s=0.05)) as sim:
        yield sim


@pytest.fixture
def sim(simulator: Simulator) -> Iterator[Simulator]:
    """The shared simulator, as fresh as a new one: state reset and config restored after."""
    original = simulator.config
    simulator.reset()
    yield simulator
    simulator.update(
        **{
            f.name: getattr(original, f.name)
            for f in dataclasses.fields(original)
            if f.name not in ("host", "port")
        }
    )
    simulator.reset()


@pytest.fixture(scope="module")
def downloads() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture
def connect(sim: Simulator) -> Iterator[Callable[..., Provider]]:
    """``connect(provider, key=...)``: an adapter made by ``create`` that talks to ``sim``."""
    made: list[Provider] = []

    def make(provider: str, key: str | None = None) -> Provider:
        overrides: dict[str, Any] = {
            f"{provider}_api_key": SecretStr(key or GOOD_KEYS[provider]),
            f"{provider}_base_url": sim.url_for(provider),
        }
        settings = Settings(_env_file=None, **overrides)  # type: ignore[call-arg]
        adapter = create(provider, settings)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


def wait_for(adapter: Provider, outcome: SubmitOutcome) -> Finished:
    """A sync outcome as is; an async job polled (short sleeps) until it ends, at most ~10 s."""
    if isinstance(outcome, Finished):
        return outcome
    assert isinstance(outcome, Submitted)
    deadline = time.monotonic() + POLL_DEADLINE_S
    while True:
        polled = adapter.poll(outcome.job_id)
        if isinstance(polled, Finished):
            return polled
        assert isinstance(polled, Pending)
        assert polled.status in ("QUEUED", "PROCESSING")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {outcome.job_id} still {polled.status} after 10 s")
        time.sleep(0.05)


HTTP_LINES = ["sku-1003-knife", "sku-1005-kettle", "sku-2002-vase", "sku-4004-charger"]
"""1536x1024 jpeg; 1024x1536 png n=2; 1024x1536 webp; 1024x1024 webp."""


@pytest.mark.parametrize("line_id", HTTP_LINES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_catalog_line_yields_images_of_the_requested_size_format_and_price(
    sim: Simulator,
    connect: Callable[..., Provider],
    downloads: httpx.Client,
    provider: str,
    line_id: str,
) -> None:
    line = next(line for line in CATALOG if line.line_id == line_id)
    adapter = connect(provider)
    assert adapter.validate(line) == []
    artifacts: list[Artifact] = []
    while len(artifacts) < line.n:  # bought in parts where the provider caps n, as the pipeline
        part = line.model_copy(
            update={"n": min(adapter.max_images_per_request, line.n - len(artifacts))}
        )
        outcome = adapter.submit(part, f"{line_id}-part-{len(artifacts)}")
        if provider == "apiframe":
            assert isinstance(outcome, Submitted)
        else:
            assert isinstance(outcome, Finished)
        finished = wait_for(adapter, outcome)
        assert len(finished.artifacts) == part.n
        if provider in REPORTS_COST:
            assert finished.credits == pytest.approx(adapter.estimate(part))
        else:
            assert finished.credits is None
        artifacts.extend(finished.artifacts)

    width, height = DIMENSIONS[str(line.size)]
    for artifact in artifacts:
        image = fetch(
            downloads,
            artifact,
            max_bytes=MAX_BYTES,
            expected_format=line.output_format,
            trusted_hosts=LOCAL,
        )
        assert (image.width, image.height, image.extension) == (width, height, line.output_format)
    assert len({a.url or a.data for a in artifacts}) == line.n, "each image is its own"
    ledger = sim.ledger()
    assert ledger["credits_charged"][provider] == pytest.approx(adapter.estimate(line))


def test_apiframe_result_given_as_a_bare_url_string_is_downloaded_too(
    sim: Simulator, connect: Callable[..., Provider], downloads: httpx.Client
) -> None:
    """docs/providers.md, "APIFrame: jobs and results": the older docs give ``result`` as one
    URL string, not ``{images}``."""
    sim.update(result_shape="string")
    adapter = connect("apiframe")
    line = request(size="1536x1024", output_format="png", quality="medium")
    finished = wait_for(adapter, adapter.submit(line, "string-1"))
    assert finished.credits == adapter.estimate(line) == 9
    [artifact] = finished.artifacts
    image = fetch(downloads, artifact, max_bytes=MAX_BYTES, trusted_hosts=LOCAL)
    assert (image.width, image.height, image.extension) == (1536, 1024, "png")


POLICY_PROMPT = "a paper boat [[policy]]"


@pytest.mark.parametrize("provider", SYNC)
def test_policy_refusal_at_a_sync_provider_is_a_permanent_content_policy_error(
    sim: Simulator, connect: Callable[..., Provider], provider: str
) -> None:
    adapter = connect(provider)
    with pytest.raises(PermanentProviderError) as raised:
        adapter.submit(request(prompt=POLICY_PROMPT), "policy-1")
    assert raised.value.type == "content_policy"
    assert not raised.value.retryable
    assert sim.ledger()["submits"] == 0, "a refused prompt is not billed"


def test_policy_failure_at_apiframe_is_a_non_retryable_job_failure_at_poll(
    sim: Simulator, connect: Callable[..., Provider]
) -> None:
    adapter = connect("apiframe")
    outcome = adapter.submit(request(prompt=POLICY_PROMPT), "policy-1")
    assert isinstance(outcome, Submitted)
    with pytest.raises(JobFailed) as raised:
        wait_for(adapter, outcome)
    assert raised.value.type == "content_policy"
    assert raised.value.retryable is False
    assert sim.ledger()["jobs"][0]["credit_cost"] == 0, "FAILED jobs are refunded"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_exhausted_credits_stop_the_batch(
    sim: Simulator, connect: Callable[..., Provider], provider: str
) -> None:
    sim.update(credits=0)
    with pytest.raises(BatchStop) as raised:
        connect(provider).submit(request(), "credits-1")
    assert raised.value.type == "insufficient_credits"
    assert sim.ledger()["submits"] == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_refused_api_key_stops_the_batch_as_an_auth_error(
    sim: Simulator, connect: Callable[..., Provider], provider: str
) -> None:
    with pytest.raises(BatchStop) as raised:
        connect(provider, key=BAD_KEYS[provider]).submit(request(), "auth-1")
    assert raised.value.type == "auth"
    assert raised.value.status == 401


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rate_limited_submit_is_transient_with_the_retry_after_the_provider_sent(
    sim: Simulator, connect: Callable[..., Provider], provider: str
) -> None:
    sim.update(faults=Faults(error_429=1.0))
    with pytest.raises(TransientProviderError) as raised:
        connect(provider).submit(request(), "rate-1")
    assert not isinstance(raised.value, AmbiguousSubmit), "a 429 bought nothing"
    assert raised.value.status == 429
    assert raised.value.retry_after == pytest.approx(1.0)
    assert sim.ledger()["submits"] == 0


def test_rate_limited_apiframe_poll_is_transient_with_retry_after(
    sim: Simulator, connect: Callable[..., Provider]
) -> None:
    adapter = connect("apiframe")
    outcome = adapter.submit(request(), "rate-poll-1")
    assert isinstance(outcome, Submitted)
    sim.update(faults=Faults(error_429=1.0))
    with pytest.raises(TransientProviderError) as raised:
        adapter.poll(outcome.job_id)
    assert raised.value.retry_after == pytest.approx(1.0)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_connection_dropped_after_accept_is_ambiguous_and_the_job_was_billed(
    sim: Simulator, connect: Callable[..., Provider], provider: str
) -> None:
    sim.update(faults=Faults(drop_after_accept=1.0))
    adapter = connect(provider)
    line = request(quality="low")
    with pytest.raises(AmbiguousSubmit):
        adapter.submit(line, "drop-1")
    ledger = sim.ledger()
    assert ledger["submits"] == 1
    [job] = ledger["jobs"]
    assert job["dropped"] is True
    assert ledger["credits_charged"][provider] == pytest.approx(adapter.estimate(line))


def test_a_process_loads_the_ca_bundle_once_however_many_providers_it_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Loading the CA bundle costs ~45 ms; a run builds a client per provider before its first
    # submit (and the workers one each, and one for downloads)
    built: list[object] = []
    real = httpx.create_ssl_context

    def counted(*args: Any, **kwargs: Any) -> Any:
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(httpx, "create_ssl_context", counted)
    http.tls.cache_clear()
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    adapters = [build(name, settings) for name in ("apiframe", "openai", "omixa")]
    for adapter in adapters:
        adapter.close()
    assert len(built) == 1
