"""The provider-neutral image request (one manifest line) and the result row it ends as."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Size = Literal["auto", "1024x1024", "1536x1024", "1024x1536"]
Quality = Literal["auto", "low", "medium", "high"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["auto", "transparent", "opaque"]
InputFidelity = Literal["auto", "low", "high"]
Moderation = Literal["auto", "low"]
Status = Literal["succeeded", "failed", "rejected"]

DEFAULT_MODEL = "gpt-image-1.5"
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {v: k for k, v in CONTENT_TYPES.items()} | {"image/jpg": "jpeg"}


class ImageRequest(BaseModel):
    """One validated manifest line. Unknown fields are errors: a typo must not buy a wrong image."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: str = Field(min_length=1, max_length=32000)
    id: str | None = None
    model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=200)
    provider: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: Size | None = None
    quality: Quality | None = None
    output_format: OutputFormat | None = None
    background: Background | None = None
    input_images: list[str] | None = Field(default=None, max_length=16)
    input_fidelity: InputFidelity | None = None
    moderation: Moderation | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    provider_params: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        return value

    @field_validator("id")
    @classmethod
    def _id_is_a_safe_key(cls, value: str | None) -> str | None:
        # The id becomes part of an S3 key / file path: ASCII letters, digits and -_. only,
        # so no ../, no slashes or backslashes, no control or look-alike characters.
        if value is None:
            return None
        if not ID_PATTERN.fullmatch(value) or set(value) == {"."}:
            raise ValueError(
                "id must be 1-128 ASCII letters, digits, '-', '_' or '.' (and not only dots)"
            )
        return value

    @field_validator("input_images")
    @classmethod
    def _input_images_are_urls(cls, value: list[str] | None) -> list[str] | None:
        for url in value or []:
            if not url.startswith(("https://", "http://", "data:image/")):
                raise ValueError(f"input_images entry {url[:60]!r} is not an http(s) or data URL")
        return value

    @property
    def line_id(self) -> str:
        """The given id, or one derived from the content so re-runs find the same line."""
        if self.id is not None:
            return self.id
        content = self.model_dump(exclude={"id"}, exclude_none=True)
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return f"line-{digest[:16]}"

    @property
    def extension(self) -> str:
        return self.output_format or "png"


class ImageRef(BaseModel):
    """One stored image, as the result row describes it."""

    uri: str
    sha256: str
    bytes: int
    content_type: str
    width: int
    height: int


class RowError(BaseModel):
    type: str
    message: str
    retryable: bool


class ResultRow(BaseModel):
    """One row of results.jsonl: exactly one per counted manifest line."""

    line: int
    id: str | None
    status: Status
    prompt: str | None = None
    model: str | None = None
    provider: str | None = None
    job_id: str | None = None
    attempts: int = 0
    credits: float = 0
    images: list[ImageRef] = Field(default_factory=list)
    error: RowError | None = None
    metadata: dict[str, Any] | None = None
    submitted_at: str | None = None
    completed_at: str | None = None
