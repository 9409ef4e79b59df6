"""The console used by keyboard alone (WCAG 2.1.1, 2.4.1, 2.4.7), in headless Chromium with the e2e
fixtures' seeded studies: every Tab stop on the way must show where the focus is."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import ADMIN, RADIOLOGIST, RunningConsole
from tests.e2e.test_console import log_in
from tests.web.test_upload import radiograph_png

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


FOCUSED = """() => {
  const e = document.activeElement;
  if (!e || e === document.body) return null;
  // A control drawn by its label (the heat-map switch) shows its focus there.
  const shown = e.labels && e.labels.length && getComputedStyle(e).opacity === "0" ? e.labels[0] : e;
  const style = getComputedStyle(shown);
  const box = shown.getBoundingClientRect();
  return {
    selector: e.tagName.toLowerCase() + (e.id ? "#" + e.id : ""),
    text: (e.innerText || e.getAttribute("aria-label") || "").trim(),
    ring: style.outlineStyle !== "none" && parseFloat(style.outlineWidth) > 0,
    onscreen: box.width > 0 && box.height > 0 && box.bottom > 0 && box.right > 0
      && box.top < innerHeight && box.left < innerWidth,
  };
}"""


def press_tab(page: Any) -> dict[str, Any]:
    """Tab once; what has the focus now, and whether a sighted keyboard user can see where it is."""
    page.keyboard.press("Tab")
    where: dict[str, Any] | None = page.evaluate(FOCUSED)
    assert where is not None, "Tab left the page"
    assert where["onscreen"] and where["ring"], f"focus is not visible on {where}"
    return where


def tab_to(page: Any, selector: str, limit: int = 40) -> None:
    """Tab (only Tab) until ``selector`` has the focus; every stop on the way must show its focus."""
    stops = []
    for _ in range(limit):
        stops.append(press_tab(page)["selector"])
        if page.evaluate("(s) => document.activeElement.matches(s)", selector):
            return
    pytest.fail(f"Tab never reached {selector}; stops: {stops}")


def test_tab_from_page_load_reaches_the_skip_link_then_the_search(page: Any, console: RunningConsole) -> None:
    """Keyboard users had to Tab through the whole menu (10 stops for an admin) on every page: the first
    stop is now a visible skip link, and past it the first field of the page."""
    log_in(page, console.url, *ADMIN)
    page.goto(f"{console.url}/results")
    first = press_tab(page)
    assert first["text"] == "Skip to main content", first
    page.keyboard.press("Enter")
    assert press_tab(page)["selector"] == "input#patient"
    page.keyboard.type("P-200")
    page.keyboard.press("Enter")
    page.wait_for_url("**/results?patient=P-200*")
    assert page.locator("tbody tr").count() == 2


def test_upload_classify_and_save_the_report_by_keyboard_alone(page: Any, console: RunningConsole) -> None:
    """The whole upload path with Tab, Space and Enter: file chooser, adult-chest confirmation, Classify,
    the heat-map switch and the PDF report."""
    log_in(page, console.url, *RADIOLOGIST)
    page.goto(f"{console.url}/upload")
    tab_to(page, "#file")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(
        files=[{"name": "chest.png", "mimeType": "image/png", "buffer": radiograph_png()}]
    )
    tab_to(page, "form[action='/upload'] button[type=submit]")
    page.keyboard.press("Enter")
    page.wait_for_url("**/upload/*")
    tab_to(page, "#adult-chest")
    page.keyboard.press("Space")
    tab_to(page, "#classify")
    page.keyboard.press("Enter")
    page.wait_for_selector("#finding-label", timeout=120_000)
    tab_to(page, ".hm-toggle")
    page.keyboard.press("Space")
    page.wait_for_selector("img.overlay", state="visible")  # the heat map, switched on from the keyboard
    tab_to(page, "#save-report")
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    assert open(download.value.path(), "rb").read().startswith(b"%PDF")
