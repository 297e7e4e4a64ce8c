"""The shell of ``report.html``: head and Content-Security-Policy, totals, filters, style, script.

``jobs.output.report`` streams the cards and failure rows between the parts made here. The policy
allows only this module's own style and script (by hash) and images from the page's origin,
so even an escaping mistake could not load or run anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STATUSES = ("succeeded", "failed", "rejected")
CURRENCY = re.compile(r"[A-Z]{3}")
"""A unit that is money (``USD``) adds up across providers; a vendor's credits do not."""


# --- totals ----------------------------------------------------------------------------------


@dataclass
class Cost:
    """What one provider billed, in its own unit."""

    unit: str
    lines: int = 0
    credits: float = 0.0


@dataclass
class Totals:
    """Everything the page's top says, counted while the rows stream past."""

    lines: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    by_provider: dict[str, Cost] = field(default_factory=dict)
    images: int = 0
    thumbnails: int = 0
    placeholders: int = 0
    images_not_shown: int = 0
    thumbnail_cap: int = 0
    cards: int = 0
    failures_listed: int = 0
    failures_not_listed: int = 0

    def billed(self) -> list[tuple[str, Cost]]:
        """Providers by name; lines that never reached one (rejected) only if they cost."""
        return [(p, c) for p, c in sorted(self.by_provider.items()) if p or c.credits]

    def per_unit(self) -> dict[str, float]:
        """Totals that may be added up: a currency (``USD``) across providers, but one
        vendor's credits never with another's (APIFrame and AI/ML API credits differ)."""
        sums: dict[str, float] = {}
        for provider, cost in self.billed():
            unit = cost.unit if CURRENCY.fullmatch(cost.unit) else f"{provider} {cost.unit}"
            sums[unit] = sums.get(unit, 0.0) + cost.credits
        return sums


# --- the page --------------------------------------------------------------------------------


def page_top(batch: str, summary: Mapping[str, Any], totals: Totals) -> str:
    counts = "".join(
        f'<div class="tile s-{esc(css_status(status))}"><b>{count:,}</b> {esc(status)}</div>'
        for status, count in totals.by_status.items()
    )
    costs = "".join(
        f"<tr><td>{esc(provider or '(none)')}</td><td class='num'>{cost.lines:,}</td>"
        f"<td class='num'>{esc(amount(cost.credits))}</td><td>{esc(cost.unit)}</td></tr>"
        for provider, cost in totals.billed()
    )
    per_unit = " · ".join(f"{amount(v)} {u}" for u, v in sorted(totals.per_unit().items()))
    usd = summary.get("usd")
    if isinstance(usd, int | float) and not isinstance(usd, bool) and math.isfinite(usd):
        per_unit += f" (≈ {amount(float(usd))} USD in all, at the configured credit prices)"
    statuses = [*STATUSES, *sorted(set(totals.by_status) - set(STATUSES))]
    status_boxes = "".join(
        _checkbox("status", status, f"{status} ({totals.by_status[status]:,})")
        for status in statuses
    )
    provider_boxes = "".join(
        _checkbox("provider", p, f"{p or '(none)'} ({c.lines:,})")
        for p, c in sorted(totals.by_provider.items())
    )
    title = esc(text_of(summary.get("batch_id")) or batch)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>\n"
        f'<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">\n'
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<meta name='referrer' content='no-referrer'><link rel='icon' href='data:,'>\n"
        f"<title>{title} · imagebatch report</title>\n<style>{_STYLE}</style></head><body>\n"
        f"<header><h1>{title}</h1><p>{totals.lines:,} lines · {totals.images:,} images · "
        f"{_reused(summary)}{_provider_jobs(summary)}{esc(_took(summary))} · "
        f"report made {generated}</p></header>\n"
        f'<section class="totals"><div class="tiles"><div class="tile"><b>{totals.lines:,}</b>'
        f" lines</div>{counts}</div>\n"
        f"<table class='cost'><thead><tr><th>provider</th><th>lines</th><th>billed</th>"
        f"<th>unit</th></tr></thead><tbody>{costs}</tbody>\n"
        f"<tfoot><tr><td colspan='4'>total: {esc(per_unit or '0')}</td></tr></tfoot></table>"
        f"</section>\n"
        f'<section class="filters"><div><span>status</span>{status_boxes}</div>'
        f"<div><span>provider</span>{provider_boxes}</div>"
        f'<p><b id="shown">{totals.cards:,}</b> of {totals.cards:,} cards shown</p></section>\n'
        f"<h2>Contact sheet</h2>{_not_shown(totals)}\n<main class='grid'>\n"
    )


def page_middle(totals: Totals) -> str:
    listed = f"{totals.failures_listed:,} failed or rejected lines"
    more = ""
    if totals.failures_not_listed:
        more = (
            f"<p class='note'>{totals.failures_not_listed:,} more failed or rejected lines "
            f"are not listed here; failed.jsonl and results.jsonl have all of them.</p>"
        )
    empty = "" if totals.failures_listed else "<p class='note'>No line failed.</p>"
    return (
        f"</main>\n<h2>Failures <small>{listed}</small></h2>{more}{empty}\n"
        f"<table class='failures'><thead><tr><th>line</th><th>id</th><th>status</th>"
        f"<th>provider</th><th>reason</th><th>prompt</th></tr></thead><tbody>\n"
    )


def page_bottom() -> str:
    return f"</tbody></table>\n<script>{_SCRIPT}</script>\n</body></html>\n"


def _not_shown(totals: Totals) -> str:
    notes = []
    if totals.images_not_shown:
        notes.append(
            f"{totals.images_not_shown:,} of {totals.images:,} images are not shown (the report "
            f"shows at most {totals.thumbnail_cap:,}); results.jsonl lists all."
        )
    if totals.placeholders:
        notes.append(f"{totals.placeholders:,} images have no preview (see their cards).")
    return "".join(f"<p class='note'>{esc(note)}</p>" for note in notes)


def _checkbox(kind: str, value: str, label: str) -> str:
    return (
        f'<label><input type="checkbox" data-filter="{kind}" value="{esc(value)}" checked> '
        f"{esc(label)}</label>"
    )


def _reused(summary: Mapping[str, Any]) -> str:
    reused = summary.get("reused")
    if not isinstance(reused, int) or isinstance(reused, bool) or reused <= 0:
        return ""
    return f"{reused:,} lines reused from earlier batches (not bought again) · "


def _provider_jobs(summary: Mapping[str, Any]) -> str:
    """The OpenAI batches the batch used (and those refused for the enqueued limit)."""
    used, refused = summary.get("openai_batches"), summary.get("openai_batches_refused")
    if not isinstance(used, int) or isinstance(used, bool) or used <= 0:
        return ""
    text = f"{used:,} OpenAI batch{'es' if used != 1 else ''}"
    if isinstance(refused, int) and not isinstance(refused, bool) and refused > 0:
        text += f" ({refused:,} more refused for the enqueued limit, not billed)"
    return esc(text) + " · "


def _took(summary: Mapping[str, Any]) -> str:
    """The time the batch's runs worked (``elapsed_s``, added up across runs), not the time
    from its first start to its last finalize, which counts the pauses between runs."""
    worked = summary.get("elapsed_s")
    started, finished = _when(summary.get("started_at")), _when(summary.get("finished_at"))
    if isinstance(worked, int | float):
        seconds = max(0, round(worked))
    elif started is None or finished is None:
        return "time taken unknown"
    else:
        seconds = max(0, round((finished - started).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    return f"took {hours}:{rest // 60:02d}:{rest % 60:02d}"


def _when(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- helpers ---------------------------------------------------------------------------------


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def text_of(value: object) -> str:
    return "" if value is None else str(value)


def css_status(status: str) -> str:
    return status if status in STATUSES else "other"


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def amount(value: float) -> str:
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.4f}".rstrip("0")


def _hash(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


_STYLE = """
:root{--ok:#1a7f37;--bad:#cf222e;--rej:#9a6700;--line:#d0d7de;--dim:#57606a;color-scheme:light}
*{box-sizing:border-box}[hidden]{display:none!important}
body{margin:0 auto;max-width:1440px;padding:16px 24px 48px;background:#f6f8fa;color:#1f2328;
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
h1{margin:0;font-size:22px;word-break:break-all}h2{margin:28px 0 8px;font-size:17px}
h2 small{color:var(--dim);font-weight:normal}header p,.note{color:var(--dim);margin:4px 0}
.totals{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start;margin-top:16px}
.tiles{display:flex;gap:8px;flex-wrap:wrap}
.tile{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 14px;
min-width:96px;color:var(--dim)}.tile b{display:block;font-size:22px;color:#1f2328}
.s-succeeded b{color:var(--ok)}.s-failed b{color:var(--bad)}
.s-rejected b{color:var(--rej)}
table{border-collapse:collapse;background:#fff;border:1px solid var(--line)}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
tfoot td{font-weight:600}
.filters{position:sticky;top:0;z-index:1;display:flex;flex-wrap:wrap;gap:8px 24px;
align-items:center;margin-top:16px;padding:8px 12px;background:#fff;
border:1px solid var(--line);border-radius:8px}
.filters span{color:var(--dim);margin-right:6px}.filters label{margin-right:10px;cursor:pointer}
.filters p{margin:0 0 0 auto;color:var(--dim)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{margin:0;background:#fff;border:1px solid var(--line);border-radius:8px;overflow:hidden}
.card.s-failed{border-color:var(--bad)}.card.s-rejected{border-color:var(--rej)}
.pic{display:flex;align-items:center;justify-content:center;aspect-ratio:1;background:#eaeef2}
.pic img{max-width:100%;max-height:100%;width:auto;height:auto;display:block}
.pic.alpha{background:repeating-conic-gradient(#d8dde3 0 25%,#fff 0 50%) 0 0/16px 16px}
.pic.none{flex-direction:column;gap:6px;padding:12px;text-align:center;color:var(--dim);
font-size:12px;word-break:break-word}
.s-failed .pic.none{color:var(--bad)}.s-rejected .pic.none{color:var(--rej)}
figcaption{padding:6px 8px;font-size:12px;line-height:1.35;overflow-wrap:anywhere}
figcaption .meta,figcaption .md{display:block;color:var(--dim)}
.id{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
.badge{border-radius:10px;padding:0 8px;color:#fff;background:var(--dim)}
.badge.s-failed{background:var(--bad)}.badge.s-rejected{background:var(--rej)}
.failures{width:100%}.failures td{font-size:13px}
.failures .prompt{max-width:480px;white-space:pre-wrap;word-break:break-word;color:var(--dim)}
code{font-size:12px;background:#eef1f4;border-radius:4px;padding:0 4px}
"""

_SCRIPT = """
(function () {
  var boxes = document.querySelectorAll("input[data-filter]");
  var shown = document.getElementById("shown");
  function apply() {
    var on = {status: new Set(), provider: new Set()};
    boxes.forEach(function (box) { if (box.checked) on[box.dataset.filter].add(box.value); });
    var cards = 0;
    document.querySelectorAll("[data-status]").forEach(function (el) {
      var keep = on.status.has(el.dataset.status) && on.provider.has(el.dataset.provider);
      el.hidden = !keep;
      if (keep && el.classList.contains("card")) cards += 1;
    });
    shown.textContent = cards.toLocaleString("en-US");
  }
  boxes.forEach(function (box) { box.addEventListener("change", apply); });
  apply();
})();
"""

_CSP = (
    "default-src 'none'; img-src 'self' file: data:; "
    f"style-src 'sha256-{_hash(_STYLE)}'; script-src 'sha256-{_hash(_SCRIPT)}'; "
    "base-uri 'none'; form-action 'none'"
)
