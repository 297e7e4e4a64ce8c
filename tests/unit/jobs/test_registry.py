"""The provider registry is the one place a provider is added (issue 8, item 3): walking
``REGISTRY``, every entry must come with everything the rest of the code derives from it —
settings, prices, a unit, a simulator surface the simulator really serves, a request schema
the tests check bodies against, and an adapter satisfying ``jobs.providers.base.Provider``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator
from pydantic import SecretStr

from jobs.manifest.request import ImageRequest, Quality
from jobs.providers import adapter_class, build, build_adapter
from jobs.providers.base import Finished, Submitted
from jobs.registry import REGISTRY, SPECS, ProviderSpec
from jobs.settings import PROVIDER_NAMES, Settings
from jobs.simulator import Simulator, SimulatorConfig
from jobs.simulator.dialects import DIALECTS
from tests.harness import SCHEMAS
from worker.cli import main
from worker.observability import logs

SURFACES = frozenset({"apiframe"} | {dialect.provider for dialect in DIALECTS})
"""What the simulator serves: APIFrame at its root and each synchronous dialect."""
FIELDS = ("api_key", "base_url", "max_in_flight", "requests_per_second", "timeout_s")
ENVIRONMENT = {
    "BASE_URL": "http://127.0.0.1:4999/x",
    "API_KEY": "afk_from_the_environment",
    "MAX_IN_FLIGHT": "7",
    "REQUESTS_PER_SECOND": "3.5",
    "TIMEOUT_S": "12.5",
    "EXPECTED_LATENCY_S": "4.25",
}

every_spec = pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_every_provider_name_is_unique_and_indexes_its_spec() -> None:
    assert len({spec.name for spec in SPECS}) == len(SPECS)
    assert all(REGISTRY[spec.name] is spec for spec in SPECS)


def test_exactly_one_entry_is_the_built_in_simulator_and_it_is_no_vendor() -> None:
    (builtin,) = (spec for spec in SPECS if spec.builtin_simulator)

    assert builtin.name == "simulator" and builtin.base_url == ""
    assert builtin.default_api_key is not None  # it runs with no key to set
    assert tuple(spec.name for spec in SPECS if not spec.builtin_simulator) == PROVIDER_NAMES


@every_spec
def test_every_provider_has_its_settings_with_the_spec_s_defaults(spec: ProviderSpec) -> None:
    fields = Settings.model_fields
    defaults = {
        "base_url": spec.base_url,
        "max_in_flight": spec.max_in_flight,
        "requests_per_second": spec.requests_per_second,
        "timeout_s": spec.timeout_s,
        "expected_latency_s": spec.expected_latency_s,
    }

    for name, default in defaults.items():
        assert f"{spec.field}_{name}" in fields, name
        assert fields[f"{spec.field}_{name}"].default == default, name
    key = fields[f"{spec.field}_api_key"].default
    if spec.default_api_key is None:
        assert key is None
    else:
        assert isinstance(key, SecretStr) and key.get_secret_value() == spec.default_api_key
    config = settings().provider_config(spec.name)
    assert (config.max_in_flight, config.requests_per_second) == (
        spec.max_in_flight,
        spec.requests_per_second,
    )


@every_spec
def test_every_provider_setting_is_read_from_the_environment(
    spec: ProviderSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    for suffix, value in ENVIRONMENT.items():
        monkeypatch.setenv(f"IMAGEBATCH_{spec.field.upper()}_{suffix}", value)

    config = settings().provider_config(spec.name)

    assert config.base_url == ENVIRONMENT["BASE_URL"]
    assert config.api_key is not None
    assert config.api_key.get_secret_value() == ENVIRONMENT["API_KEY"]
    assert config.max_in_flight == 7
    assert (config.requests_per_second, config.timeout_s) == (3.5, 12.5)
    assert config.expected_latency_s == 4.25


@every_spec
def test_a_provider_billing_in_credits_has_a_usd_rate_setting(
    spec: ProviderSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"usd_per_credit_{spec.field}"
    if spec.credit_unit == "USD":
        assert name not in Settings.model_fields
        assert settings().usd_per_credit(spec.name) is None
        return
    assert Settings.model_fields[name].default is None
    monkeypatch.setenv(f"IMAGEBATCH_USD_PER_CREDIT_{spec.field.upper()}", "0.002")

    assert settings().usd_per_credit(spec.name) == 0.002
    assert settings().usd_rates()[spec.name] == 0.002


@every_spec
def test_every_provider_prices_every_quality_a_line_may_ask_for(spec: ProviderSpec) -> None:
    prices = spec.prices
    adapter = build(spec.name, settings())
    try:
        assert prices.default_quality in prices.per_image  # a line that names no quality
        assert all(price > 0 for price in prices.per_image.values())
        for quality in get_args(Quality):
            line = ImageRequest(prompt="a paper boat", quality=quality)
            refused = any(field == "quality" for field, _ in adapter.validate(line))
            assert quality in prices.per_image or refused, quality
            if not refused:
                assert adapter.estimate(line) == prices.per_image[quality]
    finally:
        adapter.close()


@every_spec
def test_every_provider_has_a_unit_its_adapter_bills_in(spec: ProviderSpec) -> None:
    adapter = build(spec.name, settings())
    try:
        assert spec.credit_unit in ("credits", "USD")
        assert adapter.credit_unit == spec.credit_unit
    finally:
        adapter.close()


@every_spec
def test_every_provider_has_a_request_schema_for_its_bodies(spec: ProviderSpec) -> None:
    name = "apiframe" if spec.builtin_simulator else spec.name
    path = SCHEMAS / f"{name}.json"

    assert path.is_file(), f"tests/schemas/{name}.json"
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)


def test_the_built_in_simulator_sends_bodies_apiframe_s_schema_accepts() -> None:
    adapter = build("simulator", settings(simulator_base_url="http://127.0.0.1:9"))
    try:
        body = adapter.body(ImageRequest(prompt="a paper boat", size="1536x1024", n=2))  # type: ignore[attr-defined]
    finally:
        adapter.close()
    schema = json.loads((SCHEMAS / "apiframe.json").read_text())

    assert list(Draft202012Validator(schema).iter_errors(body)) == []


@every_spec
def test_every_adapter_class_resolves_and_satisfies_the_provider_protocol(
    spec: ProviderSpec,
) -> None:
    cls = adapter_class(spec)

    for flag in ("polled", "webhooks", "idempotent_submit"):
        assert isinstance(getattr(cls, flag), bool), flag
    assert isinstance(cls.max_images_per_request, int) and cls.max_images_per_request >= 1
    assert isinstance(cls.credit_unit, str)
    for method in ("validate", "estimate", "submit", "poll", "close"):
        assert callable(getattr(cls, method)), method
    assert not cls.webhooks or cls.polled  # a webhook reports on a job that is polled otherwise
    adapter = build_adapter(spec, settings().provider_config(spec.name))
    try:
        assert adapter.name == spec.name
    finally:
        adapter.close()


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.0, sync_latency_s=0.0)) as server:
        yield server


@every_spec
def test_every_provider_s_simulator_surface_is_served_by_the_simulator(
    spec: ProviderSpec, sim: Simulator
) -> None:
    assert spec.simulator_surface in SURFACES
    url = sim.url_for(spec.name)
    assert url == sim.url_for(spec.simulator_surface)
    key = "afk_registry" if spec.simulator_surface == "apiframe" else "sk-registry"
    reach = {f"{spec.field}_base_url": url, f"{spec.field}_api_key": key}
    adapter = build(spec.name, settings(**reach))
    try:
        if spec.group:  # lines go in groups: the surface takes an input file instead
            api = adapter.api  # type: ignore[attr-defined]
            assert api.upload("registry.jsonl", [b"{}\n"], size=3).startswith("file-")
            return
        outcome = adapter.submit(ImageRequest(prompt="a paper boat"), "registry-key-1")
    finally:
        adapter.close()

    assert isinstance(outcome, Submitted if adapter_class(spec).polled else Finished)


# -- the command line lists what the registry holds -------------------------------------------


@pytest.mark.parametrize("command", ["plan", "run", "submit"])
def test_the_provider_option_lists_every_registry_entry(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])

    assert result.exit_code == 0, result.output
    assert ", ".join(REGISTRY) in " ".join(result.output.split())


def test_the_top_level_help_names_every_provider() -> None:
    result = CliRunner().invoke(main, ["--help"])

    assert result.exit_code == 0
    assert all(name in result.output for name in REGISTRY)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """A command run in-process configures logging for a terminal; undo it afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {name: logging.getLogger(name).level for name in (*logs.NOISY, "imagebatch.lines")}
    configured = dict(logs._configured)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, value in named.items():
        logging.getLogger(name).setLevel(value)
    logs._configured.clear()
    logs._configured.update(configured)


@pytest.mark.usefixtures("restored_logging")
def test_an_unknown_provider_is_refused_with_the_registry_s_names(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a paper boat"}\n')

    result = CliRunner().invoke(main, ["plan", str(manifest), "--provider", "dall-e"])

    assert result.exit_code == 2
    assert ", ".join(REGISTRY) in " ".join(result.output.split())
