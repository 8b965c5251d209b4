"""Open a report page in headless Chromium (the system's, driven by playwright) and check it as a person
would see it: console errors, failed or outside requests, every figure's drawn size, the decision
table's rows, the load time; a full-page screenshot is written beside it.

Chromium is Debian's package (``/usr/bin/chromium``; ``.ci/run`` installs it); playwright never
downloads a browser here. The flags keep Chromium off the network (this machine refuses outside
connections) and the profile is a fresh folder each time.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import write_with

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1400, "height": 900}  # CSS pixels
FIGURES_JS = """() => Array.from(document.querySelectorAll('img.fig')).map(img => {
  const r = img.getBoundingClientRect();
  return {alt: img.alt, natural: [img.naturalWidth, img.naturalHeight], box: [r.width, r.height],
          complete: img.complete};
})"""
ROWS_JS = (
    """() => Array.from(document.querySelectorAll('#decision-table tbody tr')).map(tr => tr.dataset.step)"""
)


def chromium_path() -> str | None:
    """The system Chromium, or None when it is not installed."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageCheck:
    """What the browser saw."""

    url: str
    bytes: int
    load_seconds: float
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)  # anything but the page itself and data: URIs
    figures: list[dict] = field(default_factory=list)
    decision_rows: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    def empty_figures(self) -> list[str]:
        return [f["alt"] for f in self.figures if min(*f["natural"], *f["box"]) <= 0 or not f["complete"]]

    def summary(self) -> str:
        return (
            f"{self.url}: {self.bytes / 1e6:.2f} MB, loaded in {self.load_seconds:.2f} s, "
            f"{len(self.figures)} figures ({len(self.empty_figures())} empty), "
            f"{len(self.decision_rows)} decision rows, {len(self.console_errors)} console errors, "
            f"{len(self.failed_requests) + len(self.outside_requests)} failed or outside requests; "
            f"screenshot {self.screenshot}"
        )


def open_page(
    page_path: Path,
    screenshot: Path | None = None,
    *,
    full_page: bool = True,
    height: int = VIEWPORT["height"],
    timeout_s: float = 60.0,
) -> PageCheck:
    """Load ``page_path`` (file://) in headless Chromium and report what it saw (see :class:`PageCheck`)."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("no Chromium: install Debian's package (apt-get install -y chromium)")
    page_path = Path(page_path).resolve()
    url = page_path.as_uri()
    check = PageCheck(url, page_path.stat().st_size, 0.0)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=exe,
            headless=True,
            args=list(FLAGS),
            viewport={"width": VIEWPORT["width"], "height": height},
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: check.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: check.console_errors.append(str(e)))
            page.on("requestfailed", lambda r: check.failed_requests.append(f"{r.url[:120]}: {r.failure}"))
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url == url or r.url.startswith("data:")
                    else check.outside_requests.append(r.url[:120])
                ),
            )
            start = time.perf_counter()
            page.goto(url, wait_until="load", timeout=timeout_s * 1000)
            check.load_seconds = time.perf_counter() - start
            check.figures = page.evaluate(FIGURES_JS)
            check.decision_rows = page.evaluate(ROWS_JS)
            check.sections = page.evaluate(
                "() => Array.from(document.querySelectorAll('section')).map(s => s.id)"
            )
            if screenshot is not None:
                shot = page.screenshot(full_page=full_page)
                check.screenshot = write_with(screenshot, lambda p: p.write_bytes(shot))
        finally:
            context.close()
    return check
