"""report.html: the contact sheet, failures and totals a reviewer opens instead of the images.

The unit tests read the page as HTML; the browser tests open it in a real headless Chromium,
served over HTTP from a local folder and from S3 (SeaweedFS), as a reviewer would.
"""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image, ImageDraw, ImageFont

from jobs.output.previews import store_preview
from jobs.output.report import write_report
from jobs.output.rows import ImageRef, ResultRow, RowError
from jobs.settings import Settings
from jobs.storage import LocalStore, Store, open_store
from tests import servers
from tests.runtime_support import record_reads
from tests.servers import S3Server

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Dialog, Page

BATCH = "b1"
SUMMARY: dict[str, Any] = {
    "batch_id": BATCH,
    "credit_unit": "credits",
    "started_at": "2026-11-23T08:41:00Z",
    "finished_at": "2026-11-23T08:47:41Z",
}
HOSTILE_SCRIPT = "</script><script>alert(1)</script>"
HOSTILE_IMG = '<img src=x onerror="alert(2)">'
HOSTILE_PROVIDER = '"><img src=x onerror=alert(3)>'

# --- test data: real images from Pillow -------------------------------------------------------


@functools.cache
def picture(fmt: str, size: tuple[int, int], color: tuple[int, int, int], alpha: bool) -> bytes:
    """A product-like picture: a shape on a transparent or a graded background, with a label."""
    width, height = size
    mode = "RGBA" if alpha else "RGB"
    background = (0, 0, 0, 0) if alpha else (235, 238, 242)
    image = Image.new(mode, size, background)
    draw = ImageDraw.Draw(image)
    if not alpha:
        for y in range(0, height, 8):
            shade = 250 - y * 60 // height
            draw.rectangle((0, y, width, y + 8), fill=(shade, shade, shade + 4))
    draw.rounded_rectangle(
        (width // 5, height // 5, width * 4 // 5, height * 4 // 5),
        radius=min(size) // 8,
        fill=color,
    )
    font = ImageFont.load_default(size=min(size) // 9)
    draw.text((width // 2, height // 2), f"{width}x{height}", fill="white", font=font, anchor="mm")
    out = io.BytesIO()
    image.save(out, fmt.upper())
    return out.getvalue()


def stored_image(
    store: Store,
    line_id: str,
    k: int,
    fmt: str,
    size: tuple[int, int],
    color: tuple[int, int, int],
    *,
    alpha: bool = False,
) -> ImageRef:
    data = picture(fmt, size, color, alpha)
    key = f"{BATCH}/images/{line_id}/{k}.{fmt}"
    digest = hashlib.sha256(data).hexdigest()
    store.put_new(key, data, f"image/{fmt}", digest)
    return ImageRef(
        uri=store.uri(key),
        sha256=digest,
        bytes=len(data),
        content_type=f"image/{fmt}",
        width=size[0],
        height=size[1],
    )


def build_batch(store: Store) -> list[ResultRow]:
    """Four succeeded lines on three providers (PNG and WebP with alpha, JPEG; all three sizes),
    one rejected and two failed lines with hostile prompts and reasons."""

    def ok(
        line: int, line_id: str, provider: str, credits: float, images: list[ImageRef]
    ) -> ResultRow:
        return ResultRow(
            line=line,
            id=line_id,
            status="succeeded",
            prompt=f"Studio photo of {line_id}",
            model="gpt-image-1.5",
            provider=provider,
            job_id=f"job-{line}",
            attempts=1,
            credits=credits,
            images=images,
            metadata={"sku": line_id.removeprefix("sku-"), "category": "home"},
        )

    square, wide, tall = (1024, 1024), (1536, 1024), (1024, 1536)
    return [
        ok(1, "sku-mug", "apiframe", 24,
           [stored_image(store, "sku-mug", 0, "png", square, (37, 99, 235), alpha=True)]),
        ok(2, "sku-lamp", "openai", 0.266, [
            stored_image(store, "sku-lamp", 0, "jpeg", wide, (217, 119, 6)),
            stored_image(store, "sku-lamp", 1, "jpeg", wide, (22, 163, 74)),
        ]),
        ok(3, "sku-poster", "apiframe", 9,
           [stored_image(store, "sku-poster", 0, "webp", tall, (190, 24, 93), alpha=True)]),
        ResultRow(
            line=4, id=None, status="rejected", prompt=HOSTILE_IMG,
            error=RowError(type="rejected", message="unknown field 'qualty' <b>x</b>",
                           retryable=False),
        ),
        ResultRow(
            line=5, id="sku-knife", status="failed", prompt=HOSTILE_SCRIPT, provider="openai",
            attempts=1, error=RowError(type="content_policy", message=f"blocked: {HOSTILE_SCRIPT}",
                                       retryable=False),
        ),
        ResultRow(
            line=6, id="sku-rug", status="failed", prompt='a "quoted" & <b>bold</b> rug',
            provider="apiframe", attempts=3,
            error=RowError(type="timeout", message="no result after 1800 s", retryable=True),
        ),
        ok(7, "sku-vase", "aimlapi", 88.4,
           [stored_image(store, "sku-vase", 0, "webp", square, (124, 58, 237))]),
    ]  # fmt: skip


IMAGES = 5
CARDS = IMAGES + 3  # one card per image, and one per failed or rejected line without images
COUNTS = {"succeeded": 4, "failed": 2, "rejected": 1}


# --- reading the page ------------------------------------------------------------------------

VOID = {"meta", "link", "img", "input", "br", "hr", "source"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    parent: Element | None
    text: str = ""
    classes: set[str] = field(default_factory=set)


class Parsed(HTMLParser):
    """The page as a flat list of elements, each with its text and parent."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(source)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        parent = self._open[-1] if self._open else None
        element = Element(tag, values, parent, classes=set(values.get("class", "").split()))
        self.elements.append(element)
        if tag not in VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, -1, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data

    def find(
        self, tag: str, cls: str | None = None, inside: Element | None = None
    ) -> list[Element]:
        return [
            e
            for e in self.elements
            if e.tag == tag and (cls is None or cls in e.classes) and _within(e, inside)
        ]

    def text(self, tag: str, cls: str | None = None, inside: Element | None = None) -> list[str]:
        return [" ".join(e.text.split()) for e in self.find(tag, cls, inside)]


def _within(element: Element, ancestor: Element | None) -> bool:
    parent = element.parent
    while ancestor is not None and parent is not None and parent is not ancestor:
        parent = parent.parent
    return ancestor is None or parent is ancestor


def report(tmp_path: Path, **kwargs: Any) -> tuple[LocalStore, Parsed]:
    store = LocalStore(str(tmp_path))
    uri = write_report(store, BATCH, build_batch(store), SUMMARY, **kwargs)
    assert uri == str(tmp_path.resolve() / BATCH / "report.html")
    return store, Parsed(Path(uri).read_text(encoding="utf-8"))


def cards_of(page: Parsed) -> list[Element]:
    return page.find("figure", "card")


# --- unit tests ------------------------------------------------------------------------------


def test_hostile_prompts_and_reasons_render_as_text(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    rows = [
        *build_batch(store),
        ResultRow(line=8, id="x", status="failed", provider=HOSTILE_PROVIDER,
                  metadata={HOSTILE_IMG: HOSTILE_SCRIPT}),
    ]  # fmt: skip
    page = Parsed(Path(write_report(store, BATCH, rows, SUMMARY)).read_text())

    scripts = page.find("script")
    assert len(scripts) == 1 and "alert" not in scripts[0].text
    assert not [e for e in page.elements if any(name.startswith("on") for name in e.attrs)]
    assert all(img.attrs["src"].startswith("report/thumbs/") for img in page.find("img"))
    prompts = page.text("td", "prompt")
    assert HOSTILE_SCRIPT in prompts and HOSTILE_IMG in prompts
    assert 'a "quoted" & <b>bold</b> rug' in prompts
    assert "content_policy blocked: " + HOSTILE_SCRIPT in page.text("td")
    assert "unknown field 'qualty' <b>x</b>" in " ".join(page.text("td"))
    # the provider name comes back whole from attributes, so the filter still matches it
    assert HOSTILE_PROVIDER in {e.attrs.get("value") for e in page.find("input")}
    assert HOSTILE_PROVIDER in {e.attrs.get("data-provider") for e in cards_of(page)}
    assert any(HOSTILE_SCRIPT in e.text for e in page.find("span", "md"))


def test_counts_by_status_and_credits_per_unit(tmp_path: Path) -> None:
    _, page = report(tmp_path)
    assert page.text("div", "tile") == [
        "7 lines", "4 succeeded", "2 failed", "1 rejected"
    ]  # fmt: skip
    (table,) = page.find("table", "cost")
    (body,) = page.find("tbody", inside=table)
    cost = [page.text("td", inside=tr) for tr in page.find("tr", inside=body)]
    assert cost == [
        ["aimlapi", "1", "88.4", "credits"],
        ["apiframe", "3", "33", "credits"],
        ["openai", "2", "0.266", "USD"],
    ]
    (total,) = page.text("tfoot")
    # An APIFrame credit is not an AI/ML API credit: they are never added together
    assert total == "total: 0.266 USD · 88.4 aimlapi credits · 33 apiframe credits"
    assert "took 0:06:41" in page.text("header")[0]


def test_units_come_from_the_caller_then_the_summary_then_the_table(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    rows = [
        *build_batch(store),
        ResultRow(line=8, id="m", status="succeeded", provider="mystery", credits=2),
    ]
    summary = {
        **SUMMARY,
        "credit_units": {"apiframe": "tokens"},
        "by_provider": {"openai": {"credits": 0.266, "unit": "EUR"}, "apiframe": {"unit": "x"}},
    }
    uri = write_report(store, BATCH, rows, summary, units={"aimlapi": "EUR"})
    (total,) = Parsed(Path(uri).read_text()).text("tfoot")
    assert total == "total: 88.666 EUR · 33 apiframe tokens · 2 mystery unknown unit"


def test_time_taken_is_unknown_without_both_timestamps(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    summary = {"started_at": "2026-11-23T08:41:00Z", "finished_at": "not a time"}
    uri = write_report(store, BATCH, build_batch(store), summary)
    assert "time taken unknown" in Parsed(Path(uri).read_text()).text("header")[0]


def test_thumbnails_sit_beside_the_report_keep_aspect_and_alpha_and_link_the_images(
    tmp_path: Path,
) -> None:
    _, page = report(tmp_path)
    batch_dir = tmp_path / BATCH
    assert (batch_dir / "report.html").stat().st_size < 60_000
    assert "data:image" not in (batch_dir / "report.html").read_text()

    expected = {
        "report/thumbs/sku-mug-0.webp": ("images/sku-mug/0.png", (320, 320), "RGBA"),
        "report/thumbs/sku-lamp-0.webp": ("images/sku-lamp/0.jpeg", (320, 213), "RGB"),
        "report/thumbs/sku-lamp-1.webp": ("images/sku-lamp/1.jpeg", (320, 213), "RGB"),
        "report/thumbs/sku-poster-0.webp": ("images/sku-poster/0.webp", (213, 320), "RGBA"),
        "report/thumbs/sku-vase-0.webp": ("images/sku-vase/0.webp", (320, 320), "RGB"),
    }
    found = {}
    for img in page.find("img"):
        link = img.parent
        assert link is not None and link.tag == "a"
        assert (batch_dir / link.attrs["href"]).is_file()
        with Image.open(batch_dir / img.attrs["src"]) as thumb:
            assert thumb.format == "WEBP"
            assert (img.attrs["width"], img.attrs["height"]) == tuple(map(str, thumb.size))
            found[img.attrs["src"]] = (link.attrs["href"], thumb.size, thumb.mode)
            if thumb.mode == "RGBA":
                assert thumb.getpixel((2, 2))[3] == 0  # type: ignore[index]  # still see-through
    assert found == expected
    assert sorted(p.name for p in (batch_dir / "report" / "thumbs").iterdir()) == sorted(
        Path(src).name for src in expected
    )


def test_max_thumbnails_caps_the_previews_and_says_how_many_are_not_shown(
    tmp_path: Path,
) -> None:
    _, page = report(tmp_path, max_thumbnails=2)
    assert [img.attrs["src"] for img in page.find("img")] == [
        "report/thumbs/sku-mug-0.webp",
        "report/thumbs/sku-lamp-0.webp",
    ]
    assert len(list((tmp_path / BATCH / "report" / "thumbs").iterdir())) == 2
    assert "3 of 5 images are not shown" in " ".join(page.text("p", "note"))
    assert len(page.find("td", "prompt")) == 3  # every failure is still listed


def test_a_missing_or_undecodable_image_gets_a_placeholder(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    rows = build_batch(store)
    (tmp_path / BATCH / "images" / "sku-mug" / "0.png").unlink()
    store.put(f"{BATCH}/images/sku-poster/0.webp", b"RIFF\x00\x00not really webp", "image/webp")

    page = Parsed(Path(write_report(store, BATCH, rows, SUMMARY)).read_text())
    assert len(page.find("img")) == IMAGES - 2
    placeholders = {
        page.text("span", "id", inside=card)[0]: (
            page.text("span", "why", inside=card),
            [a.attrs["href"] for a in page.find("a", inside=card)],
        )
        for card in cards_of(page)
        if page.find("span", "why", inside=card)
    }
    assert placeholders == {
        "sku-mug": (["no preview: image is missing"], []),
        "sku-poster": (
            ["no preview: not a decodable image (UnidentifiedImageError)"],
            ["images/sku-poster/0.webp"],
        ),
        "sku-knife": (["content_policy: blocked: " + HOSTILE_SCRIPT], []),
        "sku-rug": (["timeout: no result after 1800 s"], []),
        "(no id)": (["rejected: unknown field 'qualty' <b>x</b>"], []),
    }
    assert "2 images have no preview" in " ".join(page.text("p", "note"))


def test_bad_row_content_never_fails_the_report(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    odd = ImageRef(uri="nowhere", sha256="", bytes=0, content_type="text/plain", width=0, height=0)
    png = ImageRef(uri="x.png", sha256="", bytes=0, content_type="image/png", width=1, height=1)
    rows = [
        ResultRow.model_construct(line=1, id="../../etc", status="succeeded", images=[png],
                                  credits=float("nan"), metadata={"a": object()}),
        ResultRow.model_construct(line=2, id=None, status="succeeded", images=[png]),
        ResultRow.model_construct(line=3, id="ok", status="weird", images=[odd], credits="9"),
        ResultRow(line=4, id="s", status="failed", prompt="lone \ud800 surrogate", error=None),
        ResultRow.model_construct(line=5, id="t", status="failed", images=[42]),
    ]  # fmt: skip
    page = Parsed(Path(write_report(store, BATCH, rows, {"started_at": 5})).read_text())
    assert page.text("div", "tile") == [
        "5 lines", "2 succeeded", "2 failed", "0 rejected", "1 weird"
    ]  # fmt: skip
    assert page.text("span", "why") == [
        "no preview: no usable line id",
        "no preview: no usable line id",
        "no preview: unknown image type",
        "no reason recorded",
        "this line could not be shown (AttributeError)",
    ]
    assert "lone ? surrogate" in page.text("td", "prompt")
    assert page.text("tfoot") == ["total: 0"]
    assert not (tmp_path / "etc").exists()


def test_a_preview_made_while_the_batch_ran_is_linked_without_reading_the_image(
    tmp_path: Path,
) -> None:
    # Given a batch whose store step already made the mug's preview
    store = LocalStore(str(tmp_path))
    rows = build_batch(store)
    mug = (tmp_path / BATCH / "images" / "sku-mug" / "0.png").read_bytes()
    assert store_preview(store, BATCH, "sku-mug", 0, mug)
    made = (tmp_path / BATCH / "report" / "thumbs" / "sku-mug-0.webp").read_bytes()
    read = record_reads(store)
    # When the report is written
    uri = write_report(store, BATCH, rows, SUMMARY)
    # Then the mug's image was never read again, its preview is the one made earlier, and the
    # page gives it the preview's own size and transparency
    assert f"{BATCH}/images/sku-mug/0.png" not in read
    assert f"{BATCH}/images/sku-lamp/0.jpeg" in read  # no preview yet: made now
    assert (tmp_path / BATCH / "report" / "thumbs" / "sku-mug-0.webp").read_bytes() == made
    page = Parsed(Path(uri).read_text(encoding="utf-8"))
    mug_img = next(i for i in page.find("img") if i.attrs["src"].endswith("sku-mug-0.webp"))
    assert (mug_img.attrs["width"], mug_img.attrs["height"]) == ("320", "320")
    assert mug_img.parent is not None and "alpha" in mug_img.parent.classes


def test_an_unreadable_stored_preview_is_made_again_from_the_image(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    rows = build_batch(store)
    store.put(f"{BATCH}/report/thumbs/sku-mug-0.webp", b"RIFF-garbage", "image/webp")

    uri = write_report(store, BATCH, rows, SUMMARY)

    with Image.open(tmp_path / BATCH / "report" / "thumbs" / "sku-mug-0.webp") as thumb:
        assert thumb.format == "WEBP" and thumb.size == (320, 320)
    page = Parsed(Path(uri).read_text(encoding="utf-8"))
    assert any(img.attrs["src"].endswith("sku-mug-0.webp") for img in page.find("img"))


def test_rows_are_streamed_one_preview_at_a_time(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    rows = [row for row in build_batch(store) if row.images]
    thumbs = tmp_path / BATCH / "report" / "thumbs"

    def one_by_one() -> Iterator[ResultRow]:
        for done, row in enumerate(rows):
            made = len(list(thumbs.iterdir())) if thumbs.is_dir() else 0
            assert made == sum(len(r.images) for r in rows[:done])
            yield row

    write_report(store, BATCH, one_by_one(), SUMMARY)
    assert len(list(thumbs.iterdir())) == IMAGES


def test_report_on_s3_sits_next_to_the_results_with_its_content_types(
    aws_env: S3Server, s3_bucket: str
) -> None:
    store = open_store(f"s3://{s3_bucket}/prefix", Settings(_env_file=None))  # type: ignore[call-arg]
    rows = build_batch(store)
    uri = write_report(store, BATCH, rows, SUMMARY)
    assert write_report(store, BATCH, rows, SUMMARY) == uri  # a rebuild replaces it
    assert uri == f"s3://{s3_bucket}/prefix/{BATCH}/report.html"

    client = aws_env.client
    head = client.head_object(Bucket=s3_bucket, Key=f"prefix/{BATCH}/report.html")
    assert head["ContentType"] == "text/html; charset=utf-8"
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix=f"prefix/{BATCH}/report/thumbs/")
    keys = sorted(item["Key"].removeprefix(f"prefix/{BATCH}/") for item in listed["Contents"])
    data = store.get(f"{BATCH}/report.html")
    assert data is not None
    assert keys == sorted(img.attrs["src"] for img in Parsed(data.decode()).find("img"))
    for key in keys:
        thumb = client.head_object(Bucket=s3_bucket, Key=f"prefix/{BATCH}/{key}")
        assert thumb["ContentType"] == "image/webp"


# --- in a real browser -----------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_COPY = Path("/tmp/imagebatch-report.png")


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """Debian's Chromium driven by Playwright, with a fresh profile; never a downloaded browser."""
    if not Path(CHROMIUM).is_file():
        servers.unavailable(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        servers.unavailable("playwright not installed (pip install -e '.[dev]')")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield context
        finally:
            context.close()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def http_server(handler: Callable[..., BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="report-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def s3_handler(s3: S3Server, bucket: str, prefix: str) -> type[BaseHTTPRequestHandler]:
    """Serves the objects under ``prefix`` with their stored Content-Type, as a bucket would."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            key = prefix + unquote(urlsplit(self.path).path)
            try:
                found = s3.client.get_object(Bucket=bucket, Key=key)
            except s3.client.exceptions.NoSuchKey:
                self.send_error(404)
                return
            body = found["Body"].read()
            self.send_response(200)
            self.send_header("Content-Type", found["ContentType"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@dataclass
class Watched:
    """Everything that went wrong while a page was open."""

    errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("requestfailed", lambda r: self.failed.append(r.url))
        page.on("response", lambda r: None if r.ok else self.failed.append(f"{r.status} {r.url}"))
        page.on("dialog", self.dismiss)

    def dismiss(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def open_report(context: BrowserContext, url: str) -> tuple[Page, Watched]:
    """Open the page, scroll every lazy thumbnail into view and wait until all have loaded."""
    page = context.new_page()
    watched = Watched()
    watched.attach(page)
    page.goto(url, wait_until="load")
    for img in page.locator("img").all():
        img.scroll_into_view_if_needed()
    page.wait_for_function(
        "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)", timeout=15_000
    )
    page.wait_for_load_state("networkidle")
    page.evaluate("window.scrollTo(0, 0)")
    return page, watched


def check_in_browser(page: Page, watched: Watched) -> None:
    """What a reviewer sees: every thumbnail, the right counts, and filters that work."""
    assert page.locator("img").count() == IMAGES
    assert (
        page.evaluate("Array.from(document.images).filter(i => i.naturalWidth > 0).length")
        == IMAGES
    )
    for status, count in COUNTS.items():
        assert page.locator(f".tile.s-{status} b").inner_text() == str(count)
    cards, rows = page.locator(".card:visible"), page.locator(".failures tbody tr:visible")
    assert (cards.count(), rows.count()) == (CARDS, 3)

    page.get_by_label("succeeded (4)").uncheck()
    assert (cards.count(), rows.count()) == (3, 3)
    assert page.locator("#shown").inner_text() == "3"
    assert {c.get_attribute("data-status") for c in cards.all()} == {"failed", "rejected"}
    page.get_by_label("openai (2)").uncheck()
    assert (cards.count(), rows.count()) == (2, 2)
    assert (
        HOSTILE_SCRIPT not in page.locator(".failures tbody tr:visible .prompt").all_inner_texts()
    )
    page.get_by_label("succeeded (4)").check()
    assert {c.get_attribute("data-provider") for c in cards.all()} == {"apiframe", "aimlapi", ""}
    assert cards.count() == 5
    page.get_by_label("openai (2)").check()
    assert (cards.count(), page.locator("#shown").inner_text()) == (CARDS, str(CARDS))

    assert HOSTILE_SCRIPT in page.locator(".failures .prompt").all_inner_texts()
    assert (watched.errors, watched.failed, watched.dialogs) == ([], [], [])


def test_report_in_chromium_from_a_local_folder(chromium: BrowserContext, tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = LocalStore(str(out))
    write_report(store, BATCH, build_batch(store), SUMMARY)
    handler = functools.partial(_Quiet, directory=str(out))
    with http_server(handler) as base:
        page, watched = open_report(chromium, f"{base}/{BATCH}/report.html")
        check_in_browser(page, watched)
        screenshot = tmp_path / "report.png"
        page.screenshot(path=str(screenshot), full_page=True)
        page.close()
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    with Image.open(screenshot) as shot:
        assert shot.width == 1280 and shot.height > 800

    page, watched = open_report(chromium, (out / BATCH / "report.html").as_uri())
    assert page.locator("img").count() == IMAGES
    assert (watched.errors, watched.failed, watched.dialogs) == ([], [], [])
    page.close()


def test_report_in_chromium_from_s3(
    chromium: BrowserContext, aws_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = open_store(f"s3://{s3_bucket}/prefix", Settings(_env_file=None))  # type: ignore[call-arg]
    write_report(store, BATCH, build_batch(store), SUMMARY)
    with http_server(s3_handler(aws_env, s3_bucket, "prefix")) as base:
        page, watched = open_report(chromium, f"{base}/{BATCH}/report.html")
        check_in_browser(page, watched)
        page.screenshot(path=str(tmp_path / "report-s3.png"), full_page=True)
        page.close()
