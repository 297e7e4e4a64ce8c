"""``report.html``: one page to review a finished batch instead of opening hundreds of files.

The page sits at ``BATCH/report.html`` with its previews at ``BATCH/report/thumbs/ID-K.webp``.
Every link is relative, so the page works opened as a local file, served over HTTP from the
output folder, or served from the S3 prefix; it loads no script, font or style from anywhere.
Rows are streamed once into temp files and one image is decoded at a time (JPEGs already
shrunk while decoding), so memory does not grow with the batch. Everything a manifest or a
provider wrote is escaped; ``jobs.output.report_page`` makes the page around the cards.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from jobs.errors import StorageError
from jobs.manifest.request import EXTENSIONS, ID_PATTERN
from jobs.output import parts
from jobs.output.layout import image_key
from jobs.output.previews import ThumbnailError, make_thumbnail, stored_preview, thumbnail_key
from jobs.output.report_page import (
    Cost,
    Totals,
    amount,
    css_status,
    cut,
    esc,
    page_bottom,
    page_middle,
    page_top,
    text_of,
)
from jobs.output.rows import ImageRef, ResultRow
from jobs.registry import REGISTRY
from jobs.storage import Store

UNKNOWN_UNIT = "unknown unit"
"""The unit of a provider nobody told us about: kept apart, never added to a known unit."""
PROMPT_CHARS = 1000
"""Prompts are cut to this in the page; results.jsonl has them whole."""


def report_key(batch: str) -> str:
    return f"{batch}/report.html"


def write_report(
    store: Store,
    batch: str,
    rows: Iterable[ResultRow],
    summary: Mapping[str, Any],
    *,
    max_thumbnails: int = 200,
    max_failures: int = 5000,
    units: Mapping[str, str] | None = None,
) -> str:
    """Write ``BATCH/report.html`` and its thumbnails; return the report's URI.

    Args:
        store: the batch's output store; images are read from and previews written to it.
        batch: the batch id (the key prefix under the store).
        rows: the result rows, in manifest order; read once.
        summary: the batch's ``summary.json`` (times, ``credit_units``/``by_provider``).
        max_thumbnails: images beyond this many get no preview (the page says how many).
        max_failures: failed and rejected lines listed beyond this many are only counted.
        units: provider -> billing unit; overrides the summary and the built-in table.

    Raises:
        StorageError: the page itself could not be written. A bad row, a missing or
            undecodable image never raises: it shows as a placeholder.
    """
    unit_of = _units(summary, units)
    sheet = _Sheet(store, batch, max(0, max_thumbnails), max(0, max_failures))
    with tempfile.TemporaryDirectory(prefix="imagebatch-report-") as tmp:
        cards, failures, page = (Path(tmp, name) for name in ("cards", "failures", "page"))
        with _text(cards) as cards_out, _text(failures) as failures_out:
            for row in rows:
                sheet.add(row, unit_of, cards_out, failures_out)
        with _text(page) as out:
            out.write(page_top(batch, summary, sheet.totals))
            _copy(cards, out)
            out.write(page_middle(sheet.totals))
            _copy(failures, out)
            out.write(page_bottom())
        store.put_file(report_key(batch), str(page), "text/html; charset=utf-8")
    return store.uri(report_key(batch))


def _units(summary: Mapping[str, Any], given: Mapping[str, str] | None) -> dict[str, str]:
    """Provider -> unit: ``given``, then the summary's ``credit_units`` and ``by_provider``,
    then the built-in table; later sources never override earlier ones."""
    units = {k: str(v) for k, v in (given or {}).items()}
    declared = summary.get("credit_units")
    if isinstance(declared, Mapping):
        for provider, unit in declared.items():
            units.setdefault(str(provider), str(unit))
    by_provider = summary.get("by_provider")
    if isinstance(by_provider, Mapping):
        for provider, entry in by_provider.items():
            if isinstance(entry, Mapping):
                unit = entry.get("unit", entry.get("credit_unit"))
                if isinstance(unit, str) and unit:
                    units.setdefault(str(provider), unit)
    for provider, unit in ((s.name, s.credit_unit) for s in REGISTRY.values()):
        units.setdefault(provider, unit)
    return units


# --- rows ------------------------------------------------------------------------------------


class _Sheet:
    """Turns rows into cards and failure-table rows, making each preview as it goes."""

    def __init__(self, store: Store, batch: str, max_thumbnails: int, max_failures: int) -> None:
        self.store = store
        self.batch = batch
        self.max_thumbnails = max_thumbnails
        self.max_failures = max_failures
        self.totals = Totals(thumbnail_cap=max_thumbnails)

    def add(
        self, row: ResultRow, unit_of: Mapping[str, str], cards: IO[str], failures: IO[str]
    ) -> None:
        totals = self.totals
        totals.lines += 1
        status = text_of(row.status)
        totals.by_status[status] = totals.by_status.get(status, 0) + 1
        provider = text_of(row.provider)
        cost = totals.by_provider.setdefault(provider, Cost(unit_of.get(provider, UNKNOWN_UNIT)))
        cost.lines += 1
        credits = _number(row.credits)
        cost.credits += credits
        try:
            card, failure = self._render(row, status, provider, credits, cost.unit)
        except Exception as exc:  # noqa: BLE001 - one odd row must not cost the whole page
            card, failure = _broken_card(row, status, provider, exc), ""
            totals.cards += 1
        cards.write(card)
        failures.write(failure)

    def _render(
        self, row: ResultRow, status: str, provider: str, credits: float, unit: str
    ) -> tuple[str, str]:
        facts = _Facts(row, status, provider, f"{amount(credits)} {unit}")
        failure = ""
        if status != "succeeded":
            if self.totals.failures_listed < self.max_failures:
                self.totals.failures_listed += 1
                failure = _failure_row(facts)
            else:
                self.totals.failures_not_listed += 1
        images = list(row.images or ())
        if images:
            return "".join(self._image_card(facts, k, im) for k, im in enumerate(images)), failure
        if failure:
            self.totals.cards += 1
            return _failure_card(facts), failure
        return "", failure

    def _image_card(self, facts: _Facts, k: int, image: ImageRef) -> str:
        self.totals.images += 1
        if self.totals.thumbnails + self.totals.placeholders >= self.max_thumbnails:
            self.totals.images_not_shown += 1
            return ""
        self.totals.cards += 1
        line_id, extension = facts.row.id, _extension(image)
        if line_id is None or not ID_PATTERN.fullmatch(line_id) or set(line_id) == {"."}:
            return self._placeholder(facts, k, image, "no usable line id", link=None)
        if extension is None:
            return self._placeholder(facts, k, image, "unknown image type", link=None)
        link = f"images/{quote(line_id)}/{k}.{extension}"
        key = thumbnail_key(self.batch, line_id, k)
        thumb = stored_preview(self.store, key)
        if thumb is None:
            try:
                data = self.store.get(image_key(self.batch, line_id, k, extension))
            except StorageError as exc:
                return self._placeholder(facts, k, image, f"could not be read: {exc}", link=None)
            if data is None:
                return self._placeholder(facts, k, image, "image is missing", link=None)
            try:
                thumb = make_thumbnail(data)
            except ThumbnailError as exc:
                return self._placeholder(facts, k, image, str(exc), link=link)
            try:
                self.store.put(key, thumb.data, "image/webp")
            except StorageError as exc:
                why = f"preview not written: {exc}"
                return self._placeholder(facts, k, image, why, link=link)
        self.totals.thumbnails += 1
        src = f"report/thumbs/{quote(line_id)}-{k}.webp"
        alpha = " alpha" if thumb.alpha else ""
        picture = (
            f'<a class="pic{alpha}" href="{esc(link)}" target="_blank" rel="noopener">'
            f'<img src="{esc(src)}" width="{thumb.width}" height="{thumb.height}" '
            f'loading="lazy" decoding="async" alt="{esc(facts.label)} image {k}"></a>'
        )
        return _card(facts, picture, _image_caption(facts, k, image))

    def _placeholder(
        self, facts: _Facts, k: int, image: ImageRef, why: str, link: str | None
    ) -> str:
        self.totals.placeholders += 1
        inner = f'<span class="why">no preview: {esc(why)}</span>'
        if link is not None:
            inner += f'<a href="{esc(link)}" target="_blank" rel="noopener">open image</a>'
        return _card(facts, f'<div class="pic none">{inner}</div>', _image_caption(facts, k, image))


@dataclass
class _Facts:
    """What every card of one row shows, escaped where it is used."""

    row: ResultRow
    status: str
    provider: str
    cost: str

    @property
    def line_id(self) -> str:
        return text_of(self.row.id) or "(no id)"

    @property
    def label(self) -> str:
        return f"line {self.row.line} {self.line_id}"

    @property
    def heading(self) -> str:
        """``#LINE ID``, escaped: how every caption starts."""
        return f'<b>#{esc(text_of(self.row.line))}</b> <span class="id">{esc(self.line_id)}</span>'

    @property
    def reason(self) -> str:
        error = self.row.error
        if error is None:
            return "no reason recorded"
        return f"{text_of(error.type)}: {text_of(error.message)}"

    @property
    def hover(self) -> str:
        row = self.row
        parts = [
            f"#{row.line} {self.line_id} - {self.status}",
            f"provider: {self.provider or '(none)'} - model: {text_of(row.model)}",
            f"job: {text_of(row.job_id) or '-'} - attempts: {row.attempts} - {self.cost}",
            f"prompt: {cut(text_of(row.prompt), 400)}",
        ]
        return "\n".join(parts)


def _card(facts: _Facts, picture: str, caption: str) -> str:
    return (
        f'<figure class="card s-{esc(css_status(facts.status))}" data-status="{esc(facts.status)}" '
        f'data-provider="{esc(facts.provider)}" title="{esc(facts.hover)}">{picture}'
        f"<figcaption>{caption}</figcaption></figure>\n"
    )


def _image_caption(facts: _Facts, k: int, image: ImageRef) -> str:
    row = facts.row
    count = f" · {k + 1}/{len(row.images)}" if len(row.images) > 1 else ""
    details = [facts.provider or "(none)", f"{image.width}×{image.height}"]
    if k == 0:  # the line's cost, once: on every image it would read as a price per image
        details.append(facts.cost)
    return (
        f"{facts.heading}{count}"
        f'<span class="meta">{esc(" · ".join(details))}</span>{_metadata(row.metadata)}'
    )


def _failure_card(facts: _Facts) -> str:
    picture = f'<div class="pic none"><span class="why">{esc(cut(facts.reason, 160))}</span></div>'
    row = facts.row
    caption = (
        f"{facts.heading}"
        f'<span class="meta">{esc(facts.status)} · {esc(facts.provider or "(none)")}</span>'
        f"{_metadata(row.metadata)}"
    )
    return _card(facts, picture, caption)


def _failure_row(facts: _Facts) -> str:
    row, error = facts.row, facts.row.error
    kind = text_of(error.type) if error else "-"
    message = text_of(error.message) if error else "no reason recorded"
    return (
        f'<tr data-status="{esc(facts.status)}" data-provider="{esc(facts.provider)}">'
        f'<td class="num">{esc(text_of(row.line))}</td><td class="id">{esc(facts.line_id)}</td>'
        f'<td><span class="badge s-{esc(css_status(facts.status))}">{esc(facts.status)}</span></td>'
        f"<td>{esc(facts.provider or '(none)')}</td>"
        f"<td><code>{esc(kind)}</code> {esc(cut(message, PROMPT_CHARS))}</td>"
        f'<td class="prompt">{esc(cut(text_of(row.prompt), PROMPT_CHARS))}</td></tr>\n'
    )


def _broken_card(row: ResultRow, status: str, provider: str, exc: Exception) -> str:
    return (
        f'<figure class="card s-{esc(css_status(status))}" data-status="{esc(status)}" '
        f'data-provider="{esc(provider)}"><div class="pic none"><span class="why">this line '
        f"could not be shown ({esc(type(exc).__name__)})</span></div><figcaption><b>#"
        f"{esc(text_of(getattr(row, 'line', '?')))}</b></figcaption></figure>\n"
    )


def _metadata(metadata: object, items: int = 4) -> str:
    """The first few metadata fields (SKU, category, ...) as ``key=value``, cut short."""
    if not isinstance(metadata, Mapping) or not metadata:
        return ""
    shown = []
    for key, value in itertools.islice(metadata.items(), items):
        text = value if isinstance(value, str) else _json(value)
        shown.append(f"{cut(text_of(key), 30)}={cut(text, 40)}")
    more = " …" if len(metadata) > items else ""
    return f'<span class="md">{esc(" · ".join(shown))}{more}</span>'


# --- small helpers --------------------------------------------------------------------------


def _json(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return "…"


def _number(value: object) -> float:
    """A row's credits as a finite float; anything else counts as nothing billed."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0


def _extension(image: ImageRef) -> str | None:
    """The stored file's extension: the URI's, else the one its Content-Type implies."""
    suffix = text_of(image.uri).rsplit(".", 1)[-1].lower()
    if suffix in EXTENSIONS.values():
        return suffix
    return EXTENSIONS.get(text_of(image.content_type).lower())


def _text(path: Path) -> IO[str]:
    # errors="replace": a lone surrogate in a prompt becomes "?" instead of failing the page
    return open(path, "w", encoding="utf-8", errors="replace")


def _copy(path: Path, out: IO[str]) -> None:
    with open(path, encoding="utf-8") as source:
        shutil.copyfileobj(source, out)


def rebuild(store: Store, batch: str, summary: Mapping[str, Any], *, previews: int) -> str:
    """``report.html`` from what the store holds: the rows of the batch's part files, in
    manifest order (finalize and ``imagebatch report`` both call this)."""
    rows = (ResultRow.model_validate_json(row) for _, row in parts.rows_in_order(store, batch))
    return write_report(store, batch, rows, summary, max_thumbnails=previews)
