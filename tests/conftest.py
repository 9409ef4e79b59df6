"""Shared test configuration: the peer policy and common fixtures."""

from __future__ import annotations

import os

import pytest

from tests import peers


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-peers",
        action="store_true",
        default=False,
        help="fail (instead of skip) when a real peer such as DCMTK, Orthanc or PostgreSQL is missing",
    )


def pytest_configure(config: pytest.Config) -> None:
    peers.REQUIRE_PEERS = bool(config.getoption("--require-peers")) or os.environ.get(
        "CXR_REQUIRE_PEERS", ""
    ) in ("1", "true")
