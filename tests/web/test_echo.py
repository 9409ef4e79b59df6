"""The C-ECHO "test" button against a real DCMTK storescp (needs the node helper's dicom_node.scu)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.store.db import session_scope
from dicom_node.store.models import RemoteAe
from tests import peers
from tests.web.conftest import requires_module

pytestmark = [pytest.mark.interop]


def wait_for_port(port: int, process: subprocess.Popen[bytes], deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("storescp exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("storescp did not listen in time")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """DCMTK storescp as a PACS stand-in on a free loopback port; stopped by PID."""
    exe = peers.executable("storescp")
    port = peers.free_port()
    out = tmp_path / "storescp"
    out.mkdir()
    process = subprocess.Popen(
        [exe, "--aetitle", "TESTPACS", "--output-directory", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield "TESTPACS", port
    finally:
        process.terminate()
        process.wait(timeout=10)


@requires_module("dicom_node.scu", "node helper")
def test_echo_button_reaches_storescp(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session], storescp: tuple[str, int]
) -> None:
    client, csrf = admin_client
    title, port = storescp
    client.post(
        "/admin/aes",
        data={
            "csrf_token": csrf,
            "role": "destination",
            "ae_title": title,
            "host": "127.0.0.1",
            "port": str(port),
            "enabled": "1",
        },
    )
    with session_scope(factory) as s:
        ae_id = s.scalars(select(RemoteAe.id)).one()
    page = client.post(f"/admin/aes/{ae_id}/echo", data={"csrf_token": csrf}).text
    assert (
        'class="msg ok"' in page and f"C-ECHO to {title} at 127.0.0.1:{port} succeeded (status 0x0000" in page
    )
    api = client.post(f"/api/admin/aes/{ae_id}/echo", headers={"X-CSRF-Token": csrf}).json()
    assert api["ok"] is True
