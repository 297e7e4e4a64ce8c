"""Oxen.ai: ``POST /api/ai/images/generate``, answers with ``images[]`` (not ``data[]``).

Oxen names sizes (square, landscape, portrait) and describes each model's request in a JSON
Schema (``GET /api/ai/models/:id`` → ``json_request_schema``). The adapter reads it once,
lazily, and checks every line's body against it, so a field or value Oxen would refuse is
rejected before anything is spent; when the schema cannot be read, it checks against the
fields Oxen's model page names instead. Oxen's docs show one image per call, so the pipeline
splits ``n``. No cost is reported.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

import httpx
import jsonschema

from jobs.manifest.request import ImageRequest
from jobs.providers.openai_style import SyncImageAPI, common_fields
from jobs.settings import ProviderConfig

log = logging.getLogger(__name__)
MODEL_IDS = {"gpt-image-1.5": "gpt-image-1-5"}
MODEL = "gpt-image-1-5"
SIZES = {"auto": "auto", "1024x1024": "square", "1536x1024": "landscape", "1024x1536": "portrait"}
MANIFEST_FIELDS = {"input_image": "input_images"}
"""Body fields named differently in the manifest; the rest are spelled the same."""
MANIFEST_VALUES = {"size": {v: k for k, v in SIZES.items()}}
ADAPTER_FIELDS = ("model", "response_format")
"""Always sent by the adapter itself; checked only when the schema describes them."""
SCHEMA_TIMEOUT = httpx.Timeout(10.0, connect=5.0)

FALLBACK_SCHEMA: dict[str, Any] = {
    "$comment": "what seed 000 names for gpt-image-1-5, used when the live schema is unreadable",
    "type": "object",
    "required": ["prompt"],
    "additionalProperties": False,
    "properties": {
        "model": {"const": MODEL},
        "prompt": {"type": "string", "minLength": 1},
        "input_image": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "output_format": {"enum": ["webp", "jpeg", "png"]},
        "size": {"enum": ["auto", "square", "portrait", "landscape"]},
        "quality": {"enum": ["auto", "low", "medium", "high"]},
        "input_fidelity": {"enum": ["low", "high"]},
        "background": {"enum": ["auto", "transparent", "opaque"]},
        "n": {"type": "integer", "minimum": 1},
        "response_format": {"enum": ["url", "b64_json"]},
    },
}


class Oxen(SyncImageAPI):
    path: ClassVar[str] = "/api/ai/images/generate"
    max_images_per_request: ClassVar[int] = 1
    unsupported: ClassVar[tuple[str, ...]] = ("moderation", "output_compression")

    def __init__(self, config: ProviderConfig, client: httpx.Client | None = None) -> None:
        super().__init__(config, client)
        self._schema_lock = threading.Lock()
        self._validator: Any = None
        self.schema_source: str | None = None
        """``provider`` once the live schema is in use, ``fallback`` when it could not be read."""

    def body(self, request: ImageRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL_IDS.get(request.model, request.model),
            "prompt": request.prompt,
            "response_format": "url",
            **common_fields(request, "output_format", "quality", "background", "input_fidelity"),
        }
        if request.size is not None:
            body["size"] = SIZES[request.size]
        if request.input_images:
            body["input_image"] = list(request.input_images)
        return {**body, **(request.provider_params or {})}

    def items(self, body: dict[str, Any]) -> list[Any]:
        items = body.get("images")
        return items if isinstance(items, list) else []

    # -- validation against Oxen's own schema --------------------------------------------------

    def extra_problems(self, request: ImageRequest) -> list[tuple[str, str]]:
        if request.model != "gpt-image-1.5":
            return []  # already refused by the base class; the schema would only repeat it
        validator = self.request_validator()
        body = self.body(request)
        described = validator.schema.get("properties", {})
        for name in ADAPTER_FIELDS:
            if name not in described and name not in (request.provider_params or {}):
                body.pop(name, None)
        problems: list[tuple[str, str]] = []
        for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
            for problem in self._describe(error, request):
                if problem not in problems:
                    problems.append(problem)
        return problems

    def request_validator(self) -> Any:
        """The ``jsonschema`` validator of gpt-image-1-5's request, loaded on first use."""
        if self._validator is None:
            with self._schema_lock:
                if self._validator is None:
                    schema, self.schema_source = self._load_schema()
                    self._validator = jsonschema.Draft202012Validator(schema)
        return self._validator

    def _load_schema(self) -> tuple[dict[str, Any], str]:
        """Oxen's schema for the model, or the fallback; never raises, never logs the key."""
        if self.config.api_key is None:
            return FALLBACK_SCHEMA, "fallback"  # plan without a key: no network
        problem = None
        try:
            response = self.client.get(
                f"{self.base_url}/api/ai/models/{MODEL}",
                headers={"Authorization": f"Bearer {self.config.api_key.get_secret_value()}"},
                timeout=SCHEMA_TIMEOUT,
            )
            schema = _schema_of(response)
            if schema is not None:
                return schema, "provider"
            problem = f"HTTP {response.status_code} without a usable schema"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            problem = type(exc).__name__
        log.warning(
            "%s: cannot read the %s request schema (%s); checking lines against the fields "
            "its model page names",
            self.name,
            MODEL,
            problem,
        )
        return FALLBACK_SCHEMA, "fallback"

    def _describe(self, error: Any, request: ImageRequest) -> list[tuple[str, str]]:
        """One schema error as (field, reason), naming the manifest field it came from.

        A key set through ``provider_params`` is reported as ``provider_params`` and named
        ``provider_params.<key>`` with Oxen's own values; any other key by its manifest name,
        with values in manifest terms (``size`` 1024x1024, not ``square``).
        """
        who = f"Oxen's {MODEL}"
        passed = request.provider_params or {}
        nested = bool(error.absolute_path)
        if error.validator == "additionalProperties" and not nested:
            known = error.schema.get("properties", {})
            extra = [key for key in error.instance if key not in known]
            return [(self._field(key, passed), f"{who} has no {key} parameter") for key in extra]
        if error.validator == "required" and not nested:
            missing = [key for key in error.validator_value if key not in error.instance]
            return [(self._field(key, passed), f"{who} requires {key}") for key in missing]
        key = str(error.absolute_path[0]) if nested else "body"
        field = self._field(key, passed)
        name = f"provider_params.{key}" if key in passed else field
        if error.validator in ("enum", "const"):
            allowed = (
                error.validator_value if error.validator == "enum" else [error.validator_value]
            )
            names = {} if key in passed else MANIFEST_VALUES.get(key, {})
            shown = ", ".join(str(names.get(value, value)) for value in allowed)
            return [(field, f"{who} accepts {name} {shown}")]
        detail = f"{error.validator} {error.validator_value}"
        return [(field, f"{who} does not accept this {name} ({detail})")]

    @staticmethod
    def _field(key: str, passed: dict[str, Any]) -> str:
        if key in passed:
            return "provider_params"
        return MANIFEST_FIELDS.get(key, key)


def _schema_of(response: httpx.Response) -> dict[str, Any] | None:
    """``json_request_schema`` (or ``request_schema``) of a 200 model object, if it is valid."""
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    for container in (body, body.get("model"), body.get("data")):
        if not isinstance(container, dict):
            continue
        schema = container.get("json_request_schema", container.get("request_schema"))
        if isinstance(schema, dict) and schema.get("type", "object") == "object":
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError:
                return None
            return schema
    return None
