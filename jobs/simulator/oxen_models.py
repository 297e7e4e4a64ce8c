"""Oxen's model catalog (``GET /api/ai/models/:id``): model objects with their request schema.

The Oxen dialect validates each generate call against the very ``json_request_schema`` it
serves (compiled by ``validation.from_json_schema``), so what the simulator accepts and what
it tells clients cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from jobs.simulator.validation import Check, from_json_schema

GPT_IMAGE_1_5 = "gpt-image-1-5"

GPT_IMAGE_1_5_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$comment": (
        "seed 000: the parameter table (prompt, input_image, output_format, size) and the"
        " prose (adjustable quality, input fidelity, background auto/transparent/opaque);"
        " quality and input_fidelity take OpenAI's gpt-image values; model, response_format,"
        " n and target_namespace are the endpoint's own (docs/providers.md, Oxen)"
    ),
    "type": "object",
    "required": ["model", "prompt"],
    "additionalProperties": False,
    "properties": {
        "model": {"type": "string", "const": GPT_IMAGE_1_5},
        "prompt": {
            "type": "string",
            "minLength": 1,
            "description": "Text description of what you want to generate, or the instruction"
            " on how to edit the given image.",
        },
        "input_image": {
            "type": "array",
            "description": "Input images to transform or use as reference (image URLs).",
            "items": {"type": "string", "pattern": "^(https?://|data:)"},
        },
        "output_format": {"type": "string", "enum": ["webp", "jpeg", "png"], "default": "png"},
        "size": {
            "type": "string",
            "enum": ["auto", "square", "portrait", "landscape"],
            "default": "auto",
            "description": "portrait (1024x1536), landscape (1536x1024), or auto (1024x1024).",
        },
        "quality": {
            "type": "string",
            "enum": ["auto", "low", "medium", "high"],
            "default": "auto",
        },
        "input_fidelity": {
            "type": "string",
            "enum": ["low", "high"],
            "default": "low",
            "description": "How closely to keep the input images' details (edits only).",
        },
        "background": {
            "type": "string",
            "enum": ["auto", "transparent", "opaque"],
            "default": "auto",
        },
        "response_format": {"type": "string", "enum": ["url", "b64_json"], "default": "url"},
        "n": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
        "target_namespace": {"type": "string", "minLength": 1},
    },
}

MODELS: dict[str, dict[str, Any]] = {
    GPT_IMAGE_1_5: {
        "id": GPT_IMAGE_1_5,
        "name": "GPT Image 1.5",
        "developer": "OpenAI",
        "modality": "image",
        "description": (
            "GPT Image 1.5 is an image generation model that excels in generating high-fidelity"
            " images with strong prompt adherence, with image-to-image editing and adjustable"
            " quality, input fidelity, and background (auto, transparent, opaque)."
        ),
        "json_request_schema": GPT_IMAGE_1_5_SCHEMA,
    }
}
"""Everything but ``json_request_schema`` is the simulator's own guess at the object's shape."""

REQUEST_CHECK: Check = from_json_schema(GPT_IMAGE_1_5_SCHEMA)
"""What ``POST /api/ai/images/generate`` accepts: exactly the schema served above."""
