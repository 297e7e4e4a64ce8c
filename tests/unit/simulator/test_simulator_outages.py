"""One provider of several misbehaving while the others serve: per-provider overrides, outages
(503s, refused connections on a provider's own port) and quotas, as routing tests need them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from jobs.simulator import Simulator, SimulatorConfig

KEY = "afk_outage_key"
TOKEN = "sk-outage"
PATHS = {
    "openai": ("/v1/images/generations", {"model": "gpt-image-1.5"}),
    "aimlapi": ("/v1/images/generations", {"model": "openai/gpt-image-1-5"}),
    "omixa": ("/api/v1/images/generations", {"model": "gpt-image-1.5"}),
    "oxen": ("/api/ai/images/generate", {"model": "gpt-image-1-5"}),
}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.2, sync_latency_s=0.02)) as simulator:
        yield simulator


@pytest.fixture
def dedicated() -> Iterator[Simulator]:
    config = SimulatorConfig(latency_s=0.2, sync_latency_s=0.02, dedicated_ports=True)
    with Simulator(config) as simulator:
        yield simulator


def generate(sim: Simulator, provider: str, timeout: float = 5, **body: Any) -> httpx.Response:
    """One paid call: an APIFrame submit, or a synchronous generation."""
    if provider == "apiframe":
        return httpx.post(
            sim.url_for("apiframe") + "/v2/images/generate",
            json={"model": "gpt-image-1.5", "prompt": "a bonsai", **body},
            headers={"X-API-Key": KEY},
            timeout=timeout,
        )
    path, fields = PATHS[provider]
    return httpx.post(
        sim.url_for(provider) + path,
        json={**fields, "prompt": "a bonsai", **body},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=timeout,
    )


def configure(sim: Simulator, changes: dict[str, Any]) -> dict[str, Any]:
    """``POST /_sim/config``, as a test harness in another process would."""
    response = httpx.post(f"{sim.base_url}/_sim/config", json=changes, timeout=5)
    assert response.status_code == 200, response.text
    config: dict[str, Any] = response.json()
    return config


# -- overrides ----------------------------------------------------------------------------------


def test_outage_503_takes_down_one_provider_in_its_own_envelope(sim: Simulator) -> None:
    configure(sim, {"providers": {"omixa": {"outage": "503"}}})
    down = generate(sim, "omixa")
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "no_route_available"
    assert generate(sim, "openai").status_code == 200
    assert generate(sim, "apiframe").status_code == 202
    configure(sim, {"providers": {"omixa": {"outage": None}}})
    assert generate(sim, "omixa").status_code == 200
    assert [j["provider"] for j in sim.ledger()["jobs"]] == ["openai", "apiframe", "omixa"]


@pytest.mark.parametrize(
    ("provider", "status", "code"),
    [
        ("openai", 429, "insufficient_quota"),
        ("omixa", 402, "insufficient_balance"),
        ("aimlapi", 402, "insufficient_quota"),
    ],
)
def test_max_images_gives_the_out_of_credit_answer_after_n_images(
    sim: Simulator, provider: str, status: int, code: str
) -> None:
    sim.update(providers={provider: {"max_images": 2}})
    assert [generate(sim, provider).status_code for _ in range(2)] == [200, 200]
    refused = generate(sim, provider)
    assert (refused.status_code, refused.json()["error"]["code"]) == (status, code)
    other = "oxen" if provider != "oxen" else "openai"
    assert generate(sim, other).status_code == 200, "the other providers keep working"
    assert sim.ledger()["submits"] == 3


def test_apiframe_max_images_answers_402_with_the_credits_left(sim: Simulator) -> None:
    sim.update(providers={"apiframe": {"max_images": 3}})
    assert generate(sim, "apiframe", gptImageParams={"number_of_images": 2}).status_code == 202
    refused = generate(sim, "apiframe", gptImageParams={"number_of_images": 2})
    assert refused.status_code == 402
    body = refused.json()
    assert body["error"] == "Insufficient credits"
    assert body["creditsRequired"] == 48 and body["creditsAvailable"] == 24
    assert generate(sim, "apiframe").status_code == 202, "one image still fits"
    assert generate(sim, "apiframe").status_code == 402


def test_failed_refunded_jobs_do_not_count_toward_max_images(sim: Simulator) -> None:
    sim.update(providers={"apiframe": {"max_images": 1, "latency_s": 0.05}})
    assert generate(sim, "apiframe", prompt="[[policy]] a poster").status_code == 202
    time.sleep(0.1)
    assert generate(sim, "apiframe").status_code == 202


def test_overrides_replace_the_global_limits_for_their_provider_only(sim: Simulator) -> None:
    sim.update(
        rate_limit_burst=1,
        providers={"apiframe": {"max_in_flight": 1}, "oxen": {"rate_limit_rps": 0.5}},
    )
    assert generate(sim, "apiframe").status_code == 202
    busy = generate(sim, "apiframe", prompt="another")
    assert busy.json() == {"error": "Too many concurrent jobs (limit 1)"}
    assert [generate(sim, "oxen").status_code for _ in range(2)] == [200, 429]
    assert [generate(sim, "openai").status_code for _ in range(2)] == [200, 200]
    assert sim.ledger()["rate_limited_by_provider"] == {
        "apiframe": {"concurrency": 1, "rate": 0, "read_rate": 0, "fault": 0},
        "oxen": {"concurrency": 0, "rate": 1, "read_rate": 0, "fault": 0},
    }


def test_latency_and_credit_overrides_apply_to_their_provider(sim: Simulator) -> None:
    sim.update(credits=1000, providers={"apiframe": {"latency_s": 0.05, "credits": 30}})
    assert generate(sim, "apiframe").status_code == 202
    assert generate(sim, "apiframe").status_code == 402, "30 credits pay for one auto image"
    me = httpx.get(sim.url_for("apiframe") + "/v2/me", headers={"X-API-Key": KEY}, timeout=5)
    assert me.json()["team"]["credits"] == 6
    assert generate(sim, "openai").status_code == 200
    ledger = sim.ledger()
    assert [j["duration_s"] for j in ledger["jobs"]] == [0.05, 0.02]
    assert ledger["credits_remaining"]["openai"] > 999


def test_extra_latency_slows_every_answer_of_one_provider(sim: Simulator) -> None:
    sim.update(providers={"omixa": {"extra_latency_s": 0.3}})
    started = time.monotonic()
    assert generate(sim, "omixa", model="nope").status_code == 422
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert generate(sim, "openai").status_code == 200
    assert time.monotonic() - started < 0.3


def test_partial_runtime_updates_change_only_the_named_fields(sim: Simulator) -> None:
    sim.update(providers={"omixa": {"max_images": 5, "extra_latency_s": 0.01}})
    config = configure(sim, {"providers": {"omixa": {"outage": "503"}}})
    assert (
        config["providers"]["omixa"] | {"max_images": 5, "outage": "503"}
        == (config["providers"]["omixa"])
    )
    assert sim.config.providers["omixa"].extra_latency_s == 0.01
    assert generate(sim, "omixa").status_code == 503
    configure(sim, {"providers": {"openai": {"sync_latency_s": 0.05}}})
    config = configure(sim, {"providers": {"omixa": {"outage": None}}})
    assert config["providers"]["omixa"]["outage"] is None
    assert config["providers"]["omixa"]["max_images"] == 5
    assert config["providers"]["openai"]["sync_latency_s"] == 0.05
    assert generate(sim, "omixa").status_code == 200
    assert set(configure(sim, {"providers": {"omixa": None}})["providers"]) == {"openai"}
    assert configure(sim, {"providers": {}})["providers"] == {}, "a restored config clears all"
    configure(sim, {"providers": {"openai": {"sync_latency_s": 0.05}}})
    for bad in (
        {"providers": {"bfl": {"outage": "503"}}},
        {"providers": {"omixa": {"outage": "down"}}},
        {"providers": {"omixa": {"max_images": 1.5}}},
        {"providers": ["omixa"]},
    ):
        response = httpx.post(f"{sim.base_url}/_sim/config", json=bad, timeout=5)
        assert response.status_code == 400, bad
    assert set(sim.config.providers) == {"openai"}


# -- refused connections ------------------------------------------------------------------------


def test_refuse_without_dedicated_ports_hangs_up_without_an_answer(sim: Simulator) -> None:
    sim.update(providers={"omixa": {"outage": "refuse"}})
    with pytest.raises(httpx.RemoteProtocolError):
        generate(sim, "omixa")
    assert generate(sim, "openai").status_code == 200
    ledger = sim.ledger()
    assert ledger["submits"] == 1 and "omixa" not in ledger["credits_charged"]


def test_dedicated_ports_serve_each_provider_alone(dedicated: Simulator) -> None:
    ports = {httpx.URL(dedicated.url_for(p)).port for p in ("apiframe", *PATHS)}
    assert len(ports) == 5 and httpx.URL(dedicated.base_url).port not in ports
    assert dedicated.url_for("omixa").endswith("/omixa")
    assert generate(dedicated, "omixa").status_code == 200
    on_the_wrong_port = httpx.post(
        dedicated.url_for("apiframe") + "/omixa/api/v1/images/generations",
        json={"model": "gpt-image-1.5", "prompt": "x"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert on_the_wrong_port.status_code == 404
    assert httpx.get(dedicated.url_for("oxen") + "/_sim/health").status_code == 404
    main = httpx.get(f"{dedicated.base_url}/_sim/health")
    assert main.json() == {"status": "ok"}, "the main port still serves everything"
    urls = httpx.get(f"{dedicated.base_url}/_sim/urls").json()
    assert urls == {p: dedicated.url_for(p) for p in ("apiframe", *PATHS)}


def test_result_urls_work_from_the_port_the_client_used(dedicated: Simulator) -> None:
    base = dedicated.url_for("apiframe")
    job_id = generate(dedicated, "apiframe", gptImageParams={"quality": "low"}).json()["jobId"]
    deadline = time.monotonic() + 3
    while (job := httpx.get(f"{base}/v2/jobs/{job_id}", headers={"X-API-Key": KEY}).json())[
        "status"
    ] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (url,) = job["result"]["images"]
    assert url.startswith(base + "/cdn/images/")
    assert httpx.get(url).status_code == 200
    aiml = generate(dedicated, "aimlapi").json()["data"][0]["url"]
    assert aiml.startswith(dedicated.url_for("aimlapi").removesuffix("/aimlapi"))
    assert httpx.get(aiml).status_code == 200
    elsewhere = url.replace(base, dedicated.url_for("aimlapi").removesuffix("/aimlapi"))
    assert httpx.get(elsewhere).status_code == 404, "a port serves its own provider's images"


def test_refuse_with_dedicated_ports_is_a_refused_connection_until_cleared(
    dedicated: Simulator,
) -> None:
    url = dedicated.url_for("omixa")
    configure(dedicated, {"providers": {"omixa": {"outage": "refuse"}}})
    with pytest.raises(httpx.ConnectError):
        generate(dedicated, "omixa")
    assert generate(dedicated, "openai").status_code == 200
    assert generate(dedicated, "apiframe").status_code == 202
    configure(dedicated, {"providers": {"omixa": {"outage": None}}})
    assert dedicated.url_for("omixa") == url
    assert generate(dedicated, "omixa").status_code == 200


def test_refuse_cuts_the_connections_already_open(dedicated: Simulator) -> None:
    dedicated.update(providers={"omixa": {"sync_latency_s": 1.0}})
    outcome: list[BaseException | int] = []

    def call() -> None:
        try:
            outcome.append(generate(dedicated, "omixa").status_code)
        except httpx.TransportError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)
    dedicated.update(providers={"omixa": {"outage": "refuse"}})
    caller.join()
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.TransportError), outcome


def test_a_provider_refused_from_the_start_gets_its_port_when_cleared() -> None:
    config = SimulatorConfig.from_mapping(
        {
            "dedicated_ports": True,
            "sync_latency_s": 0.02,
            "providers": {"oxen": {"outage": "refuse"}},
        }
    )
    with Simulator(config) as simulator:
        with pytest.raises(httpx.ConnectError):
            generate(simulator, "oxen")
        simulator.update(providers={"oxen": {"outage": None}})
        assert generate(simulator, "oxen").status_code == 200
        with pytest.raises(ValueError, match="cannot change while"):
            simulator.update(dedicated_ports=False)
