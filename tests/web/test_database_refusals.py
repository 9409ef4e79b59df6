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


def test_an_id_beyond_the_databases_integers_is_invalid_input_naming_it(
    settings: Settings, pg_factory: sessionmaker[Session]
) -> None:
    """The ids are SQL INTEGER columns, 32-bit on PostgreSQL: an id from 2**31 on in a path or a page's
    cursor, which the API's schema allowed up to 2**63 - 1, reached the database, which refused it, and the
    answer blamed "a NUL or other control character" (on SQLite the same request was a 404)."""
    from dicom_node import users
    from dicom_node.store.db import session_scope
    from dicom_node.store.models import UserRole

    with session_scope(pg_factory) as session:
        users.create_user(session, ADMIN[0], ADMIN[1], UserRole.ADMIN, "test")
    big = 2**31
    with TestClient(create_app(settings, pg_factory), follow_redirects=False) as client:
        csrf = login(client, *ADMIN)
        for method, path, name in (
            ("GET", f"/api/results/{big}", "study_id"), ("GET", f"/api/results?before={big}", "before"),
            ("GET", f"/api/admin/audit?after={big}", "after"), ("PATCH", f"/api/admin/users/{big}", "user_id"),
            ("DELETE", f"/api/admin/aes/{big}", "ae_id"), ("POST", f"/api/deliveries/{big}/resend", "delivery_id"),
        ):
            response = client.request(method, path, headers={"X-CSRF-Token": csrf}, json={})
            assert response.status_code == 422, (path, response.status_code)
            assert response.json()["detail"][0]["loc"][-1] == name, (path, response.text)
        assert client.get(f"/api/results/{big - 1}").status_code == 404
        assert client.get(f"/results/1/objects/{big}/object.dcm").status_code == 422
        schema = client.get("/api/openapi.json").json()
        (study_id,) = schema["paths"]["/api/results/{study_id}"]["get"]["parameters"]
        assert study_id["schema"]["maximum"] == big - 1
