"""Values PostgreSQL will not take, sent to the console running on it (review): a NUL character in a
login name, a search or an audit filter was a 500; it is the request's fault, 422."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from dicom_node.store.db import make_engine, make_session_factory, upgrade
from dicom_node.web import create_app
from tests.postgres_server import PostgresServer
from tests.web.conftest import ADMIN, login

pytestmark = [pytest.mark.db]


@pytest.fixture
def pg_factory(pg_server: PostgresServer) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_server.create_database())
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def test_a_nul_character_is_refused_not_a_server_error(
    settings: Settings, pg_factory: sessionmaker[Session]
) -> None:
    from dicom_node import users
    from dicom_node.store.db import session_scope
    from dicom_node.store.models import UserRole

    with session_scope(pg_factory) as session:
        users.create_user(session, ADMIN[0], ADMIN[1], UserRole.ADMIN, "test")
    with TestClient(create_app(settings, pg_factory), follow_redirects=False) as client:
        refused = client.post("/api/session", json={"username": "x\u0000y", "password": "whatever"})
        assert refused.status_code in (401, 422), refused.text
        login(client, *ADMIN)
        for path in ("/api/results?patient=a%00", "/api/results?accession=a%00", "/results?patient=a%00",
                     "/admin/audit?actor=a%00"):
            response = client.get(path)
            assert response.status_code == 422, (path, response.status_code)
            assert "cannot be searched or stored" in response.text
