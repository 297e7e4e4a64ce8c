"""What the HTTP adapters share: the common answers to what ``base.Provider`` asks of a
provider, and the config, client and price table every adapter holds."""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

from jobs.providers.http import KeyGate, check, json_object, make_client, send
from jobs.registry import REGISTRY
from jobs.settings import ProviderConfig


class HTTPAdapter:
    """The base of the adapters that speak HTTP to one provider. Its class attributes are the
    common case (a synchronous API, billed in USD); an adapter sets only where it differs."""

    idempotent_submit: ClassVar[bool] = False
    max_images_per_request: ClassVar[int] = 10
    credit_unit: ClassVar[str] = "USD"
    polled: ClassVar[bool] = False
    webhooks: ClassVar[bool] = False
    gate: KeyGate
    """Set by each adapter: with the provider's free key check where it has one."""

    def __init__(self, config: ProviderConfig, client: httpx.Client | None = None) -> None:
        self.name = config.name
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.client = client or make_client(config)
        self.prices = REGISTRY[config.name].prices

    def post_paid(self, url: str, *, json: Any, headers: dict[str, str]) -> dict[str, Any]:
        """A paid submit: ``json`` POSTed through the key gate, its status classified
        (``check``), its body read as a JSON object (garbage after an accepted submit is
        ambiguous: it may have been billed)."""
        with self.gate.first():
            response = send(self.client, "POST", url, submit=True, json=json, headers=headers)
            check(response, self.name, submit=True)
        return json_object(response, self.name, submit=True)

    def close(self) -> None:
        self.client.close()
