"""Shared test configuration: the peer policy and common fixtures."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.store.db import make_engine, make_session_factory, upgrade
from tests import peers
from tests.pipeline.model import model_for_tests
from tests.postgres_server import PostgresServer, postgres_server

# One policy for every property test: the same cases on every run, so a CI failure reproduces; no example
# database written into the checkout; no deadline, since a shared CI machine is slow at random moments.
# Each test sets only its number of cases (and a health check it must suppress, if any).
settings.register_profile("node", deadline=None, derandomize=True, database=None)
settings.load_profile("node")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-peers",
        action="store_true",
        default=False,
        help="fail (instead of skip) when a real peer such as DCMTK, Orthanc or PostgreSQL is missing",
    )


def pytest_configure(config: pytest.Config) -> None:
    # CI=true is what CI services set: there a skipped peer test would hide a broken set-up.
    peers.REQUIRE_PEERS = bool(config.getoption("--require-peers")) or any(
        os.environ.get(name, "").lower() in ("1", "true") for name in ("CXR_REQUIRE_PEERS", "CI")
    )


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model for classification tests: the shipped default, else a tiny one trained once per session."""
    return model_for_tests(tmp_path_factory.getbasetemp() / "cxr-test-model")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the run; each test makes its own database on it."""
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database on each engine the node runs on: SQLite (the default) and a real PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    migrated = make_engine(url)
    upgrade(migrated)
    yield migrated
    migrated.dispose()


@pytest.fixture
def db(engine: Engine) -> sessionmaker[Session]:
    """Sessions on :func:`engine`'s database."""
    return make_session_factory(engine)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures logging for its process; run in-process, undo that for the tests after it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """An environment for a CLI command run in-process: no CXR_NODE setting of the caller's, the data
    directory in this test's folder, no console and no metrics listener."""
    for name in list(os.environ):
        if name.startswith("CXR_NODE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CXR_NODE__NODE__DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_NODE__WEB__ENABLED", "false")
    monkeypatch.setenv("CXR_NODE__METRICS__ENABLED", "false")
    return monkeypatch


@pytest.fixture(autouse=True)
def _keep_exception_hooks() -> Iterator[None]:
    """The node's logging set-up (``configure_logging``, which CLI commands run in-process) installs its own
    exception hooks; pytest's, which report an exception in a thread, must come back after each test."""
    hooks = sys.excepthook, threading.excepthook
    yield
    sys.excepthook, threading.excepthook = hooks
