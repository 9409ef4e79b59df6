"""WCAG 2.1 A/AA in headless Chromium, with the e2e fixtures' seeded studies: axe-core on every console
page, anonymous and for both roles; and what axe cannot judge: the console used by keyboard alone (every
Tab stop must show where the focus is) and pages that update themselves.

axe-core comes bundled in the PyPI package ``axe-playwright-python`` (its ``axe.min.js``, read from the
installed package: nothing is fetched at run time); the script is evaluated over the DevTools protocol,
which the console's Content-Security-Policy does not block.
"""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import pydicom
import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from dicom_node.store.db import make_engine, make_session_factory, session_scope
from dicom_node.store.models import WebSession
from dicom_node.web.auth import aware
from tests import peers
from tests.e2e.conftest import ADMIN, RADIOLOGIST, SCREENSHOTS, RunningConsole
from tests.e2e.test_console import log_in
from tests.web.test_upload import radiograph_png

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: The axe rules of WCAG 2.0 and 2.1, levels A and AA (axe's tags); best practices are not asked for.
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


def axe_source() -> str:
    try:
        bundle = resources.files("axe_playwright_python").joinpath("axe.min.js")
    except ModuleNotFoundError:
        peers.missing("the Python package axe-playwright-python (bundles axe-core) is not installed")
        raise
    return bundle.read_text(encoding="utf-8")


def axe_violations(page: Any, source: str) -> list[dict[str, Any]]:
    """The WCAG 2.1 A/AA violations axe-core finds on the page as it is shown now."""
    page.evaluate(source)
    results: dict[str, Any] = page.evaluate(
        "(tags) => axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']})",
        WCAG_TAGS,
    )
    violations: list[dict[str, Any]] = results["violations"]
    return violations


def describe(found: dict[str, list[dict[str, Any]]]) -> str:
    """One line per rule and page, then each offending element with axe's own explanation."""
    lines = []
    for name, violations in found.items():
        for v in violations:
            criteria = ", ".join(t for t in v["tags"] if t.startswith("wcag"))
            lines.append(f"{name}: {v['id']} ({v['impact']}, {criteria}) {v['help']}")
            for node in v["nodes"][:5]:
                summary = " ".join(node.get("failureSummary", "").split())
                lines.append(f"    {' '.join(map(str, node['target']))}: {summary[:300]}")
    return "\n".join(lines)


class Audit:
    """Runs axe on each page a test opens and keeps what it found, so one run reports every page."""

    def __init__(self, page: Any, who: str) -> None:
        self.page = page
        self.who = who
        self.source = axe_source()
        self.found: dict[str, list[dict[str, Any]]] = {}
        self.checked: list[str] = []

    def check(self, name: str) -> None:
        self.page.wait_for_load_state("load")
        self.checked.append(name)
        violations = axe_violations(self.page, self.source)
        if violations:
            self.found[name] = violations

    def visit(self, url: str, name: str) -> None:
        self.page.goto(url)
        self.check(name)

    def assert_clean(self) -> None:
        if self.found:
            SCREENSHOTS.parent.mkdir(parents=True, exist_ok=True)
            report = SCREENSHOTS.parent / f"axe-violations-{self.who}.json"
            report.write_text(json.dumps(self.found, indent=1))
            pytest.fail(f"WCAG 2.1 A/AA violations (axe-core) on {len(self.found)} of {len(self.checked)} "
                        f"pages ({self.who}):\n{describe(self.found)}", pytrace=False)


def upload_picture(page: Any, url: str) -> None:
    page.goto(f"{url}/upload")
    page.set_input_files(
        "#file", files=[{"name": "chest.png", "mimeType": "image/png", "buffer": radiograph_png()}]
    )
    page.click("form[action='/upload'] button[type=submit]")
    page.wait_for_url("**/upload/*")


def test_anonymous_pages_pass_axe(page: Any, console: RunningConsole) -> None:
    audit = Audit(page, "anonymous")
    audit.visit(f"{console.url}/login", "login")
    page.fill("#username", "nobody")
    page.fill("#password", "wrong-password")
    page.click("button[type=submit]")
    audit.check("login, wrong password")
    audit.visit(f"{console.url}/no-such-page", "404 anonymous")
    audit.assert_clean()


def test_radiologist_pages_pass_axe(page: Any, console: RunningConsole) -> None:
    audit = Audit(page, "radiologist")
    log_in(page, console.url, *RADIOLOGIST)
    url = console.url
    audit.check("dashboard")
    audit.visit(f"{url}/results", "results")
    audit.visit(f"{url}/results?patient=P-200", "results, searched")
    audit.visit(f"{url}/results?patient=NOBODY", "results, nothing found")
    audit.visit(f"{url}/results/{console.study_ids['pneumonia']}", "study")
    page.click("label.hm-label")  # the heat map shown too: its overlay and legend
    audit.check("study with heat map")
    audit.visit(f"{url}/results/{console.study_ids['skipped']}", "study, skipped")
    audit.visit(f"{url}/upload", "upload")
    upload_picture(page, url)
    audit.check("upload, picture to confirm")
    page.check("#adult-chest")
    page.click("#classify")
    page.wait_for_selector("#finding-label", timeout=120_000)
    audit.check("upload, classified")
    page.goto(f"{url}/upload")
    page.set_input_files("#file", files=[{"name": "x.dcm", "mimeType": "application/dicom", "buffer": b"no"}])
    page.click("form[action='/upload'] button[type=submit]")
    audit.check("upload, refused")
    rg1 = peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    page.goto(f"{url}/upload")
    page.set_input_files("#file", files=[{"name": "rg1.dcm", "mimeType": "application/dicom", "buffer": rg1}])
    page.click("form[action='/upload'] button[type=submit]")
    page.wait_for_url("**/upload/*")
    audit.check("upload, DICOM")
    audit.visit(f"{url}/account/password", "change password")
    page.fill("#current-password", "not-my-password")
    page.fill("#new-password", "a-new-long-passphrase")
    page.fill("#new-password2", "another-long-passphrase")
    page.click("main button[type=submit]")
    audit.check("change password, refused")
    audit.visit(f"{url}/admin/aes", "403 for a radiologist")
    audit.visit(f"{url}/results/999999", "404 study")
    audit.assert_clean()


def test_admin_pages_pass_axe(page: Any, console: RunningConsole) -> None:
    audit = Audit(page, "admin")
    log_in(page, console.url, *ADMIN)
    url = console.url
    audit.check("dashboard (admin)")
    audit.visit(f"{url}/results/{console.study_ids['pneumonia']}", "study (admin, resend)")
    audit.visit(f"{url}/admin/aes", "AE titles, none")
    page.fill("#ae_title", "A11YPACS")
    page.fill("#host", "127.0.0.1")
    page.fill("#port", "104")
    page.click("#add button[type=submit]")
    page.wait_for_url("**/admin/aes?notice=ae-added")
    audit.check("AE titles, one added")
    page.fill("#ae_title", "BAD\\TITLE")
    page.click("#add button[type=submit]")
    audit.check("AE titles, refused")
    page.goto(f"{url}/admin/aes")
    page.click("a.rowlink:has-text('A11YPACS')")
    page.wait_for_url("**/admin/aes/*")
    audit.check("AE edit")
    audit.visit(f"{url}/admin/users", "users")
    page.click("details summary")
    audit.check("users, set password open")
    page.fill("#new-username", "x")
    page.fill("#new-password", "short-pass-1")
    page.fill("#new-password2", "short-pass-2")
    page.click("form[action='/admin/users'] button[type=submit]")
    audit.check("users, refused")
    audit.visit(f"{url}/admin/audit", "audit")
    audit.visit(f"{url}/admin/audit?action=zzz", "audit, nothing found")
    audit.visit(f"{url}/admin/settings", "settings")
    audit.assert_clean()


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
    // (a date field's calendar button has the focus inside the field, and Chromium's own ring)
    ring: (style.outlineStyle !== "none" && parseFloat(style.outlineWidth) > 0) || !e.matches(":focus"),
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


def tab_stops(page: Any, until: str, limit: int = 60) -> list[str]:
    """The text of every Tab stop from the top of the page up to the one with text ``until``."""
    stops: list[str] = []
    while len(stops) < limit:
        stops.append(press_tab(page)["text"])
        if stops[-1] == until:
            return stops
    pytest.fail(f"Tab never reached {until!r}; stops: {stops}")


def test_the_pager_ends_are_no_tab_stops(page: Any, console: RunningConsole) -> None:
    """'‹ Newer' on the first page and 'Older ›' on the last were greyed out for the mouse only: a
    keyboard user still landed on them, and Enter led to an "Invalid input" page (page=0) or past the end."""
    log_in(page, console.url, *RADIOLOGIST)
    page.goto(f"{console.url}/results?per_page=2")
    assert "‹ Newer" not in tab_stops(page, "Older ›")
    page.keyboard.press("Enter")
    page.wait_for_url("**/results?per_page=2&page=2&before=*")  # sought from page 1's last study
    page.goto(f"{console.url}/results?per_page=2&page=3")
    assert "Older ›" not in tab_stops(page, "‹ Newer")
    page.keyboard.press("Tab")
    after = page.evaluate(FOCUSED)
    assert after is None or after["text"] != "Older ›"  # the last stop, or the footer's


def test_upload_classify_and_save_the_report_by_keyboard_alone(page: Any, console: RunningConsole) -> None:
    """The whole upload path with Tab, Space and Enter: file chooser, adult-chest confirmation, Classify,
    the heat-map switch and the PDF report."""
    log_in(page, console.url, *RADIOLOGIST)
    # Playwright catches file choosers only while a listener is on: one from the start, so that the
    # catching is surely on before Space (with expect_file_chooser() alone, 1 run in 5 timed out here).
    page.on("filechooser", lambda _: None)
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


def test_the_dashboard_updates_itself_until_switched_off(page: Any, console: RunningConsole) -> None:
    """The dashboard reloaded every minute by <meta http-equiv=refresh>, with no way to stop it, and each
    reload threw a keyboard or screen-reader user back to the top (WCAG 2.2.1, 2.2.2). It still updates
    itself, but not while the keyboard focus is on something, and its switch turns the updates off."""
    page.clock.install()
    log_in(page, console.url, *RADIOLOGIST)
    reloads: list[str] = []
    page.on("framenavigated", lambda frame: reloads.append(frame.url) if frame == page.main_frame else None)
    with page.expect_navigation(url="**/?auto=1"):
        page.clock.run_for(61_000)
    assert len(reloads) == 1

    tab_to(page, "a.rowlink")  # a keyboard user at work in the list: the update waits
    page.clock.run_for(5 * 60_000)
    assert len(reloads) == 1
    page.evaluate("document.activeElement.blur()")
    with page.expect_navigation(url="**/?auto=1"):
        page.clock.run_for(6_000)
    assert len(reloads) == 2

    assert page.get_by_label("Update every minute").is_checked()
    tab_to(page, "input[data-reload-url]")
    page.keyboard.press("Space")
    page.evaluate("document.activeElement.blur()")
    page.clock.run_for(10 * 60_000)
    assert len(reloads) == 2 and not page.get_by_label("Update every minute").is_checked()
    page.reload()  # the choice holds for this browser tab
    page.clock.run_for(10 * 60_000)
    assert len(reloads) == 3 and not page.get_by_label("Update every minute").is_checked()


def test_the_session_warns_before_it_ends_and_goes_on_when_asked(page: Any, console: RunningConsole) -> None:
    """A session ended without a word after 8 idle hours, or 12 after its login, and took the search or
    form at hand with it (WCAG 2.2.1). Two minutes before, the page now says so; where idleness ends it,
    "Stay logged in" (keyboard focus on it) uses the session again; the login's time limit only warns."""
    log_in(page, console.url, *RADIOLOGIST)
    factory = make_session_factory(make_engine(console.settings.database_url))

    def latest_session(**values: datetime) -> int:
        with session_scope(factory) as s:
            row = s.scalars(select(WebSession).order_by(WebSession.id.desc())).first()
            assert row is not None
            for name, value in values.items():
                setattr(row, name, value)
            return row.id

    pk = latest_session(expires_at=datetime.now(UTC) + timedelta(seconds=124))
    page.goto(f"{console.url}/results?auto=1")  # ?auto=1: not a use, the session stays close to its end
    warning = page.locator("#session-warning")
    expect(warning).to_be_visible(timeout=15_000)
    expect(warning).to_have_text(re.compile(r"Your session ends in [12] minutes? without activity\."))
    expect(warning.get_by_role("button", name="Stay logged in")).to_be_focused()
    page.keyboard.press("Enter")
    expect(warning).to_be_hidden()
    with session_scope(factory) as s:
        row = s.get(WebSession, pk)
        assert row is not None and aware(row.expires_at) > datetime.now(UTC) + timedelta(hours=7)

    limit = timedelta(hours=console.settings.web.session_max_hours)
    latest_session(created_at=datetime.now(UTC) - limit + timedelta(seconds=90))
    page.goto(f"{console.url}/results?auto=1")
    expect(warning).to_be_visible(timeout=15_000)
    expect(warning).to_contain_text("reaches its time limit in")
    expect(warning.get_by_role("button", name="Stay logged in")).to_be_hidden()


HEADER_FITS = """() => {
  const bar = document.querySelector("header").getBoundingClientRect();
  return [...document.querySelectorAll("header a, header button")]
    .filter((e) => { const r = e.getBoundingClientRect();
      return r.top < bar.top || r.bottom > bar.bottom || r.left < bar.left || r.right > bar.right; })
    .map((e) => e.innerText.trim());
}"""


def reflows(page: Any, name: str) -> list[str]:
    """What a page at this width loses: sideways scrolling of the page, header links outside the bar."""
    problems = []
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    if widths[0] > widths[1]:
        problems.append(f"{name}: the page scrolls sideways ({widths[0]} px content in {widths[1]} px)")
    outside = page.evaluate(HEADER_FITS)
    if outside:
        problems.append(f"{name}: header links drawn outside the header bar: {outside}")
    return problems


@pytest.mark.parametrize("width", [320, 683, 1024])
def test_every_page_reflows_without_loss(page: Any, console: RunningConsole, width: int) -> None:
    """WCAG 1.4.10 Reflow and 1.4.4 Resize text: 320 CSS px is 1280 px at 400 % zoom, 683 a 1366 px screen
    at 200 %. The admin's menu needs about 1280 px: below that it ran out of its fixed-height header bar
    (links drawn over the page, white on light grey, or above the window), and the tables made whole pages
    scroll sideways. At 320 px axe-core checks the pages too (the contrast of what moved)."""
    page.set_viewport_size({"width": width, "height": 800})
    audit = Audit(page, f"admin-{width}px")
    url = console.url
    problems = []
    log_in(page, url, *ADMIN)
    pages = [
        ("dashboard", "/"),
        ("results", "/results"),
        ("study", f"/results/{console.study_ids['pneumonia']}"),
        ("study, skipped", f"/results/{console.study_ids['skipped']}"),
        ("upload", "/upload"),
        ("change password", "/account/password"),
        ("AE titles", "/admin/aes"),
        ("users", "/admin/users"),
        ("audit", "/admin/audit"),
        ("settings", "/admin/settings"),
    ]
    for name, path in pages:
        page.goto(f"{url}{path}")
        problems += reflows(page, name)
        if width == 320:
            audit.check(name)
    upload_picture(page, url)
    problems += reflows(page, "upload, picture to confirm")
    page.click("header button:has-text('Log out')")
    page.wait_for_url(f"{url}/login")
    problems += reflows(page, "login")
    assert not problems, "\n".join(problems)
    audit.assert_clean()


def test_a_refused_form_tells_its_fields_and_takes_the_focus(page: Any, console: RunningConsole) -> None:
    """The message of a refused form sat above it, tied to no field: after the page came back a screen
    reader started at the top and the fields were not marked invalid (WCAG 3.3.1, 4.1.3, 1.3.1). The
    message now takes the focus, and the fields it is about are invalid and described by it."""
    page.goto(f"{console.url}/login")
    page.fill("#username", "nobody")
    page.fill("#password", "wrong-password")
    page.keyboard.press("Enter")
    expect(page.locator("#form-error")).to_be_focused()
    for field in ("#username", "#password"):
        expect(page.locator(field)).to_have_attribute("aria-invalid", "true")
        expect(page.locator(field)).to_have_accessible_description("Unknown user or wrong password.")

    log_in(page, console.url, *RADIOLOGIST)
    page.goto(f"{console.url}/account/password")
    page.fill("#current-password", "not-my-password")
    page.fill("#new-password", "a-new-long-passphrase")
    page.fill("#new-password2", "a-new-long-passphrase")
    page.keyboard.press("Enter")
    expect(page.locator("#form-error")).to_be_focused()
    expect(page.locator("#current-password")).to_have_accessible_description("The current password is wrong.")
    expect(page.locator("#new-password")).not_to_have_attribute("aria-invalid", "true")
    page.fill("#current-password", RADIOLOGIST[1])
    page.fill("#new-password", "a-new-long-passphrase")
    page.fill("#new-password2", "another-long-passphrase")
    page.keyboard.press("Enter")
    for field in ("#new-password", "#new-password2"):
        expect(page.locator(field)).to_have_accessible_description("The two new passwords differ.")
    expect(page.locator("#current-password")).not_to_have_attribute("aria-invalid", "true")

    page.goto(f"{console.url}/upload")
    page.set_input_files("#file", files=[{"name": "x.dcm", "mimeType": "application/dicom", "buffer": b"no"}])
    page.click("form[action='/upload'] button[type=submit]")
    expect(page.locator("#form-error")).to_be_focused()
    expect(page.locator("#file")).to_have_attribute("aria-invalid", "true")


def test_the_study_page_says_in_words_what_its_pictures_and_tables_show(
    page: Any, console: RunningConsole
) -> None:
    """What axe passes but a screen-reader user missed: the probabilities had no header to say whose
    they were, the column of Resend buttons had an empty header, the radiograph's text alternative was
    "Radiograph, image 1" and the heat map's said nothing of what it shows (WCAG 1.1.1, 1.3.1, 1.4.1)."""
    log_in(page, console.url, *ADMIN)
    page.goto(f"{console.url}/results/{console.study_ids['pneumonia']}")
    probabilities = page.locator("table.probs")
    for finding in ("Pneumonia", "Normal", "COVID-19"):
        expect(probabilities.get_by_role("rowheader", name=finding)).to_be_visible()
    deliveries = page.get_by_role("region", name="Results sent to PACS")
    expect(deliveries.get_by_role("columnheader", name="Actions")).to_have_count(1)
    expect(page.get_by_role("img", name="Radiograph 1 of 1: CR, PA, CHEST")).to_be_visible()
    page.click("label.hm-label")
    heat_map = page.locator("img.overlay")
    expect(heat_map).to_be_visible()
    expect(heat_map).to_have_accessible_name(
        "Heat map over the radiograph: where the image weighed most in the finding Pneumonia "
        "(red most, then yellow, blue least); strongest in the centre of the image"
    )


SMALL_TARGETS = """() => [...document.querySelectorAll(
    'details > summary, button, .btn, input[type=checkbox], label.hm-label')]
  .filter(el => el.offsetParent !== null && getComputedStyle(el).pointerEvents !== 'none')
  .map(el => ({what: (el.textContent || el.name || el.id).trim().slice(0, 30), box: el.getBoundingClientRect()}))
  .filter(t => t.box.width < 24 || t.box.height < 24)
  .map(t => `${t.what}: ${Math.round(t.box.width)}x${Math.round(t.box.height)}`)"""


def test_controls_are_targets_of_at_least_24_px(page: Any, console: RunningConsole) -> None:
    """WCAG 2.2 2.5.8 Target Size (Minimum): the delivery history's "N attempts" toggles were 78×18 px,
    hard to hit with a mouse in a reading room or a finger on a tablet, and the admin pages' check boxes
    13×13. Buttons, toggles (the heat map's is its label) and check boxes of the study page, the results
    list and the admin pages are at least 24×24 CSS px."""
    log_in(page, console.url, *ADMIN)
    small = []
    for path in (f"/results/{console.study_ids['pneumonia']}", "/results", "/admin/aes", "/admin/users"):
        page.goto(f"{console.url}{path}")
        small += [f"{path}: {target}" for target in page.evaluate(SMALL_TARGETS)]
    assert small == [], "\n".join(small)


def test_a_study_of_long_unbroken_values_reflows_at_320_px(page: Any, console: RunningConsole) -> None:
    """WCAG 1.4.10: a Patient ID of 64 characters (LO), or a family name written without a space, has no
    place to break; the study page's heading and identity line ran 750 px wide, and the whole page
    scrolled sideways at 320 px (400 % zoom). Last in the module: the study it adds is in no other test's
    counts."""
    from tests.web.studies import StudySpec, add_study

    engine = make_engine(console.settings.database_url)
    try:
        study = add_study(make_session_factory(engine), StudySpec(
            "VERYLONGFAMILYNAMEWITHOUTANYSPACEINITATALLFROMTHEREGISTRATION^G", "P" * 64, "ACC4567890123456",
            received_at=datetime.now(UTC) - timedelta(days=400),
        )).study
    finally:
        engine.dispose()
    page.set_viewport_size({"width": 320, "height": 800})
    log_in(page, console.url, *ADMIN)
    problems = []
    for name, path in (("study", f"/results/{study}"), ("results", "/results?patient=" + "P" * 64)):
        page.goto(f"{console.url}{path}")
        problems += reflows(page, name)
    ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    ds.PatientID = "P" * 64
    buffer = io.BytesIO()
    ds.save_as(buffer)
    page.goto(f"{console.url}/upload")
    long_id = {"name": "long.dcm", "mimeType": "application/dicom", "buffer": buffer.getvalue()}
    page.set_input_files("#file", files=[long_id])
    page.click("form.file-drop button[type=submit]")
    page.wait_for_url(re.compile(r".*/upload/[\w-]+$"))
    problems += reflows(page, "upload, DICOM")
    assert not problems, "\n".join(problems)
