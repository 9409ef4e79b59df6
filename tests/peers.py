"""Finding the real peers (DCMTK, dicom3tools, Orthanc, PostgreSQL, Chromium) for the tests.

Locally a missing peer skips the test that needs it; in CI (``CI=true`` or ``--require-peers``) it fails.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

REQUIRE_PEERS = False  # set by conftest: --require-peers, CXR_REQUIRE_PEERS=1 or CI=true


def missing(reason: str) -> None:
    """Skip, or fail when peers are required."""
    if REQUIRE_PEERS:
        pytest.fail(f"required peer missing: {reason}", pytrace=False)
    pytest.skip(reason)


def executable(name: str, *candidates: str) -> str:
    """Path of a peer executable (``name`` on PATH or one of ``candidates``)."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in candidates:
        if Path(candidate).is_file():
            return candidate
    missing(f"{name} not installed (Debian package needed; `make test` installs it)")
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pydicom_data_file(name: str) -> Path:
    """A file from the PyPI package pydicom-data (e.g. ``RG1_UNCI.dcm``)."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        missing("pydicom not installed")
        raise
    path = get_testdata_file(name, download=False)
    if path is None:
        missing(f"{name} not available: install the PyPI package pydicom-data")
        raise AssertionError("unreachable")
    return Path(str(path))
