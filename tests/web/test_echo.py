"""The C-ECHO "test" button against a real DCMTK storescp (needs the node helper's dicom_node.scu)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.store.db import session_scope
from dicom_node.store.models import RemoteAe
from tests import peers

pytestmark = [pytest.mark.interop]


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


def test_echo_button_says_why_the_pacs_rejected_the_association(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """A wrong AE title: the page said only "association rejected by PACS2X at …"."""
    client, csrf = admin_client
    with peers.dcmqrscp(tmp_path, "PACS2") as port:
        client.post(
            "/admin/aes",
            data={"csrf_token": csrf, "role": "destination", "ae_title": "PACS2X", "host": "127.0.0.1",
                  "port": str(port), "enabled": "1"},
        )
        with session_scope(factory) as s:
            ae_id = s.scalars(select(RemoteAe.id)).one()
        page = client.post(f"/admin/aes/{ae_id}/echo", data={"csrf_token": csrf}).text
    assert (
        f"association rejected by PACS2X at 127.0.0.1:{port} "
        "(permanent; service user: called AE title not recognised)"
    ) in page
