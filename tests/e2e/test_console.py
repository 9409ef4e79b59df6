"""The console in headless Chromium: log in, dashboard, search, details, upload, admin, logout.

Every page is saved as a 1366x768 screenshot in tests/out/screenshots/ and must not scroll sideways.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests import peers
from tests.e2e.conftest import ADMIN, RADIOLOGIST, SCREENSHOTS, RunningConsole
from tests.web.test_upload import chest_like_png, radiograph_png

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def shoot(page: Any, name: str) -> None:
    """Save the viewport as the radiologist sees it and check nothing is cut off sideways."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    widths = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert widths[0] <= widths[1], f"{name} scrolls horizontally: {widths}"


def log_in(page: Any, url: str, username: str, password: str) -> None:
    """An anonymous visit is sent to the login page; after logging in the user lands on the dashboard."""
    page.goto(f"{url}/")
    assert page.url.startswith(f"{url}/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")


def add_destination_and_echo(page: Any, url: str, title: str, port: int) -> None:
    """An admin registers a PACS on the AE page and its echo test succeeds."""
    page.goto(f"{url}/admin/aes")
    page.fill("#ae_title", title)
    page.fill("#host", "127.0.0.1")
    page.fill("#port", str(port))
    page.click("#add button[type=submit]")
    page.wait_for_url("**/admin/aes?notice=ae-added")
    page.click(f"button[data-echo='{title}']")
    page.wait_for_selector("#echo-result")
    assert "succeeded" in page.inner_text("#echo-result")


def test_radiologist_logs_in_searches_reads_a_study_and_logs_out(page: Any, console: RunningConsole) -> None:
    page.goto(f"{console.url}/login")
    shoot(page, "01-login")
    before = console.analysed_today()
    log_in(page, console.url, *RADIOLOGIST)
    shown = page.inner_text("#stat-analysed")
    assert shown in {str(before), str(console.analysed_today())}  # a run may cross midnight here
    assert "DICOM nodes" not in page.inner_text("nav")  # no admin menu for radiologists
    shoot(page, "02-dashboard")

    page.click("nav >> text=Results")
    page.wait_for_url(f"{console.url}/results")
    assert page.locator("tbody tr").count() == 6
    shoot(page, "03-results")
    page.fill("#patient", "P-200")
    page.click("form[role=search] button[type=submit]")
    page.wait_for_url("**/results?patient=P-200*")
    rows = page.locator("tbody tr")
    assert rows.count() == 2
    assert "SMITH, JOHN" in rows.first.inner_text() and "ARCHIVE: dead" in rows.first.inner_text()
    shoot(page, "04-results-search")

    rows.first.locator("a.rowlink").click()
    page.wait_for_url(f"{console.url}/results/{console.study_ids['pneumonia']}?back=*")
    assert page.inner_text("[id^='finding-label-']").lower() == "pneumonia"
    assert "84.0 %" in page.inner_text(".verdict")
    assert page.locator("button:has-text('Resend')").count() == 0
    shoot(page, "05-study")

    page.goto(f"{console.url}/results/{console.study_ids['skipped']}")
    assert "not a chest image" in page.inner_text(".msg.warn")
    # Its pixel file is gone from the store: the page says so instead of a broken image icon.
    assert "image file is missing on the node" in page.inner_text(".viewer .placeholder")
    shoot(page, "06-study-skipped")

    page.click("header button:has-text('Log out')")
    page.wait_for_url(f"{console.url}/login")
    page.goto(f"{console.url}/results")
    assert page.url.startswith(f"{console.url}/login")  # the session is gone


def test_upload_png_and_dicom(page: Any, console: RunningConsole) -> None:
    log_in(page, console.url, *RADIOLOGIST)
    page.goto(f"{console.url}/upload")
    shoot(page, "07-upload")
    page.set_input_files(
        "#file", files=[{"name": "chest.png", "mimeType": "image/png", "buffer": chest_like_png()}]
    )
    page.click("form[action='/upload'] button[type=submit]")
    page.wait_for_url("**/upload/*")
    assert page.evaluate("document.querySelector('#upload-image').naturalWidth") == 640
    shoot(page, "08-upload-png")
    rg1 = peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    page.set_input_files(
        "#file", files=[{"name": "RG1_UNCI.dcm", "mimeType": "application/dicom", "buffer": rg1}]
    )
    page.click("form[action='/upload'] button[type=submit]")
    page.wait_for_url("**/upload/*")
    assert "9RG1" in page.inner_text("#result")
    shoot(page, "09-upload-dicom")


def test_classify_and_save_the_report(page: Any, console: RunningConsole) -> None:
    log_in(page, console.url, *RADIOLOGIST)
    for name, data, mime in (
        ("chest.png", radiograph_png(), "image/png"),
        ("RG1_UNCI.dcm", peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes(), "application/dicom"),
    ):
        page.goto(f"{console.url}/upload")
        page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])
        page.click("form[action='/upload'] button[type=submit]")
        page.wait_for_url("**/upload/*")
        if page.locator("#adult-chest").count():  # a picture: its user confirms an adult's chest
            shoot(page, "10-upload-picture")
            page.check("#adult-chest")
        page.click("#classify")
        page.wait_for_selector("#finding-label", timeout=120_000)
        label = page.inner_text("#finding-label")
        shoot(page, f"10-classified-{name.split('.')[0].lower()}")
        with page.expect_download() as info:
            page.click("#save-report")
        pdf = open(info.value.path(), "rb").read()
        assert pdf.startswith(b"%PDF")
        text = subprocess.run(
            [peers.executable("pdftotext"), "-", "-"], input=pdf, capture_output=True, check=True
        ).stdout
        assert label.lower().encode() in text.lower()


def test_radiologist_gets_403_on_admin_pages(page: Any, console: RunningConsole) -> None:
    log_in(page, console.url, *RADIOLOGIST)
    for path in ("/admin/aes", "/admin/users", "/admin/audit", "/admin/settings"):
        response = page.goto(f"{console.url}{path}")
        assert response.status == 403, path
        assert "Not permitted" in page.inner_text("main")
    shoot(page, "11-forbidden")


def test_admin_pages_and_destination_crud(page: Any, console: RunningConsole) -> None:
    log_in(page, console.url, *ADMIN)
    page.goto(f"{console.url}/admin/aes")
    page.select_option("#role", "destination")
    page.fill("#ae_title", "NEWPACS")
    page.fill("#host", "127.0.0.1")
    page.fill("#port", "11112")
    page.fill("#description", "Reading-room PACS")
    page.click("#add button[type=submit]")
    page.wait_for_url("**/admin/aes?notice=ae-added")
    assert "NEWPACS" in page.inner_text("main")
    shoot(page, "12-admin-aes")
    page.click("a.rowlink:has-text('NEWPACS')")
    page.wait_for_url("**/admin/aes/*")
    shoot(page, "13-admin-ae-edit")
    page.goto(f"{console.url}/admin/users")
    shoot(page, "14-admin-users")
    page.goto(f"{console.url}/admin/audit")
    assert "ae.add" in page.inner_text("main")
    shoot(page, "15-admin-audit")
    page.goto(f"{console.url}/admin/settings")
    shoot(page, "16-admin-settings")
    page.goto(f"{console.url}/results/{console.study_ids['pneumonia']}")
    assert page.locator("button:has-text('Resend')").count() == 4
    shoot(page, "17-study-admin")


def test_admin_adds_a_destination_and_the_echo_test_succeeds(
    page: Any,
    console: RunningConsole,
    storescp: tuple[str, int],
) -> None:
    title, port = storescp
    log_in(page, console.url, *ADMIN)
    add_destination_and_echo(page, console.url, title, port)
    shoot(page, "18-admin-echo")


def test_a_study_image_refused_for_a_busy_console_or_an_ended_session_says_so(
    page: Any, console: RunningConsole
) -> None:
    """An image answered 503 (the console busy with other images) or sent to the login page (the session
    ended) said "file missing or not displayable": a fault of the node's files, which it was not."""
    log_in(page, console.url, *RADIOLOGIST)
    study = f"{console.url}/results/{console.study_ids['pneumonia']}"
    busy = {"Retry-After": "10", "Content-Type": "text/html"}
    page.route("**/instances/*/image.png", lambda route: route.fulfill(status=503, headers=busy, body="busy"))
    page.goto(study)
    note = page.locator(".viewer .placeholder")
    note.wait_for()
    assert "busy" in note.inner_text() and "missing" not in note.inner_text()

    # busy once, then served: the image is shown after all
    answered: list[int] = []

    def once_busy(route: Any) -> None:
        answered.append(503 if not answered else 200)
        if answered[-1] == 503:
            route.fulfill(status=503, headers=busy, body="busy")
        else:
            route.continue_()

    page.unroute("**/instances/*/image.png")
    page.route("**/instances/*/image.png", once_busy)
    page.goto(study)
    page.wait_for_function("() => document.querySelector('.viewer img:not(.overlay)')?.naturalWidth > 0")
    assert page.locator(".viewer .placeholder").count() == 0

    # a file that is really gone still says so
    page.unroute("**/instances/*/image.png")
    page.route("**/instances/*/image.png", lambda route: route.fulfill(status=404, body="gone"))
    page.goto(study)
    note.wait_for()
    assert "file missing or not displayable" in note.inner_text()

    # the session ends between the page and its image: the image request is sent to the login page
    def session_ended(route: Any) -> None:
        page.context.clear_cookies()
        route.continue_()

    page.unroute("**/instances/*/image.png")
    page.route("**/instances/*/image.png", session_ended)
    page.goto(study)
    note.wait_for()
    assert "session has ended" in note.inner_text() and "missing" not in note.inner_text()
