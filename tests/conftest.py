"""Shared test configuration: the peer policy and common fixtures."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests import peers
from tests.pipeline.model import model_for_tests

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


@pytest.fixture(autouse=True)
def _keep_exception_hooks() -> Iterator[None]:
    """The node's logging set-up (``configure_logging``, which CLI commands run in-process) installs its own
    exception hooks; pytest's, which report an exception in a thread, must come back after each test."""
    hooks = sys.excepthook, threading.excepthook
    yield
    sys.excepthook, threading.excepthook = hooks
