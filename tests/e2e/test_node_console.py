"""Acceptance: the console of a node started as the README starts it (``python -m dicom_node serve``,
i.e. ``cxr-node serve``), driven by headless Chromium, with results delivered to a DCMTK storescp.

Needs the node, classifier, reporting and pipeline packages; it runs once the lead has merged them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import peers
from tests.e2e.test_console import add_destination_and_echo, log_in, shoot
from tests.node_process import NodeProcess, configured_node, wait_until
from tests.web.test_upload import radiograph_png

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.interop,
    pytest.mark.slow,
]

ADMIN = ("admin", "node-steel-orchid")
RADIOLOGIST = ("dr.jones", "node-radiologist-pw")


def _add_user(node: NodeProcess, username: str, role: str, password: str) -> None:
    """``cxr-node user add`` as the README tells the operator, the password on stdin."""
    done = node.cli(
        "user", "add", "--username", username, "--role", role, "--password-stdin", input=password + "\n"
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def node(
    tmp_path: Path, model_path: Path, storescp: tuple[str, int]
) -> Iterator[NodeProcess]:
    title, _ = storescp
    web_port = peers.free_port()
    process = configured_node(
        tmp_path / "node",
        model_path=model_path,
        callers=[],
        destinations=[],
        extra={
            "web": {"enabled": True, "host": "127.0.0.1", "port": web_port},
            "pipeline": {"heatmap": True, "fixed_destinations": [title]},
        },
    )
    assert process.cli("db", "upgrade").returncode == 0  # the install step: users go into this database
    _add_user(process, ADMIN[0], "admin", ADMIN[1])
    _add_user(process, RADIOLOGIST[0], "radiologist", RADIOLOGIST[1])
    process.start()
    # The node reports healthy on its metrics port before the console has bound its own port.
    assert wait_until(lambda: _answers(f"{process.web_url}/login"), timeout=120), "console did not start"
    try:
        yield process
    finally:
        process.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _upload(page: Any, url: str, name: str, data: bytes, mime: str) -> str:
    page.goto(f"{url}/upload")
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])
    page.click("form[action='/upload'] button[type=submit]")
    page.wait_for_url("**/upload/*")
    if page.locator("#adult-chest").count():  # a picture: its user confirms an adult's chest
        page.check("#adult-chest")
    page.click("#classify")
    page.wait_for_selector("#finding-label", timeout=120_000)
    label: str = page.inner_text("#finding-label")
    with page.expect_download() as info:
        page.click("#save-report")
    pdf = Path(info.value.path()).read_bytes()
    assert pdf.startswith(b"%PDF")
    text = subprocess.run(
        [peers.executable("pdftotext"), "-", "-"], input=pdf, capture_output=True, check=True
    ).stdout
    assert label.lower().encode() in text.lower()
    return label


def test_console_of_a_running_node(node: Any, browser: Any, storescp: tuple[str, int]) -> None:

    url = node.web_url
    title, port = storescp
    context = browser.new_context(viewport={"width": 1366, "height": 768}, accept_downloads=True)
    page = context.new_page()
    try:
        # An admin adds the PACS as a destination and tests it.
        log_in(page, url, *ADMIN)
        add_destination_and_echo(page, url, title, port)
        shoot(page, "node-01-admin-echo")
        page.click("header button:has-text('Log out')")
        page.wait_for_url(f"{url}/login")

        # A radiologist classifies a PNG and RG1, saves both reports, and stores RG1 in the node.
        log_in(page, url, *RADIOLOGIST)
        assert page.goto(f"{url}/admin/users").status == 403
        _upload(page, url, "chest.png", radiograph_png(), "image/png")
        rg1 = peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes()
        label = _upload(page, url, "RG1_UNCI.dcm", rg1, "application/dicom")
        shoot(page, "node-02-upload-classified")
        page.click("#store")
        page.wait_for_url("**/results/*")
        study_url = page.url.split("?")[0]

        def analysed() -> bool:
            page.goto(study_url)
            return page.locator(".badge.state-analysed").count() > 0

        assert wait_until(analysed, timeout=120, interval=1.0), "the stored upload was not analysed"
        assert page.inner_text("[id^='finding-label-']").lower() == label.lower()

        def delivered() -> bool:
            page.goto(study_url)
            states = page.locator("#deliveries .badge").all_inner_texts()
            return bool(states) and all(s == "Delivered" for s in states)

        assert wait_until(delivered, timeout=120, interval=1.0), "results did not reach the PACS"
        shoot(page, "node-03-study")
        with page.expect_download() as info:
            page.click("text=Download PDF report")
        assert Path(info.value.path()).read_bytes().startswith(b"%PDF")

        # Search by patient ID finds it.
        page.goto(f"{url}/results")
        page.fill("#patient", "9RG1")
        page.click("form[role=search] button[type=submit]")
        page.wait_for_url("**/results?patient=9RG1*")
        assert page.locator("tbody tr a.rowlink").count() == 1
        shoot(page, "node-04-search")

        page.click("header button:has-text('Log out')")
        page.wait_for_url(f"{url}/login")
        page.goto(f"{url}/results")
        assert page.url.startswith(f"{url}/login")
    finally:
        context.close()
