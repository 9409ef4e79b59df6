"""Fixtures for the console tests: the real app on a temporary SQLite database, real users."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import users
from dicom_node.settings import Settings
from dicom_node.store.db import make_engine, make_session_factory, session_scope, upgrade
from dicom_node.store.models import UserRole
from dicom_node.web import create_app
from tests import peers

ADMIN = ("alice", "admin-password-1")
RADIOLOGIST = ("rob", "rob-reads-films-1")


@pytest.fixture(autouse=True, scope="session")
def fast_password_hashing() -> Iterator[None]:
    """Still argon2id, with low cost parameters: these tests check behaviour, not hashing strength
    (the default parameters cost about a second per hash on a loaded machine)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(users, "_HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        yield


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(node={"data_dir": tmp_path / "var", "name": "Test CXR node"}, web={"port": 0})


@pytest.fixture
def classifying_app(settings: Settings, factory: sessionmaker[Session], model_path: Path) -> FastAPI:
    """The console with a loadable model."""
    settings = settings.model_copy(
        update={"pipeline": settings.pipeline.model_copy(update={"model_path": model_path})}
    )
    return create_app(settings, factory)


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def app(settings: Settings, factory: sessionmaker[Session]) -> FastAPI:
    return create_app(settings, factory)


@pytest.fixture
def accounts(factory: sessionmaker[Session]) -> dict[str, int]:
    with session_scope(factory) as session:
        admin = users.create_user(session, ADMIN[0], ADMIN[1], UserRole.ADMIN, "test")
        rad = users.create_user(session, RADIOLOGIST[0], RADIOLOGIST[1], UserRole.RADIOLOGIST, "test")
        return {"admin": admin.id, "radiologist": rad.id}


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as c:
        yield c


def form_csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "page has no CSRF field"
    return match.group(1)


def login(client: TestClient, username: str, password: str) -> str:
    """Log in through the login form like a browser; returns the session's CSRF token."""
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": form_csrf(page.text), "next": "/"},
    )
    assert response.status_code == 303, response.text
    return str(client.get("/api/session").json()["csrf_token"])


@pytest.fixture
def admin_client(client: TestClient, accounts: dict[str, int]) -> tuple[TestClient, str]:
    return client, login(client, *ADMIN)


@pytest.fixture
def rad_client(client: TestClient, accounts: dict[str, int]) -> tuple[TestClient, str]:
    return client, login(client, *RADIOLOGIST)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """DCMTK storescp as a PACS stand-in on a free loopback port; stopped by PID."""
    exe = peers.executable("storescp")
    port = peers.free_port()
    out = tmp_path / "storescp"
    out.mkdir()
    with peers.serving([exe, "--aetitle", "TESTPACS", "--output-directory", str(out), str(port)], port):
        yield "TESTPACS", port
