"""The peer policy: a missing DCMTK/Orthanc/PostgreSQL skips locally and fails in CI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests import conftest, peers


@dataclass
class _Config:
    require_peers: bool

    def getoption(self, name: str) -> bool:
        assert name == "--require-peers"
        return self.require_peers


@pytest.mark.parametrize(
    ("environment", "flag", "required"),
    [
        ({}, False, False),
        ({"CI": "true"}, False, True),
        ({"CI": "false"}, False, False),
        ({"CXR_REQUIRE_PEERS": "1"}, False, True),
        ({}, True, True),
    ],
)
def test_ci_turns_a_missing_peer_into_a_failure(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], flag: bool, required: bool
) -> None:
    for name in ("CI", "CXR_REQUIRE_PEERS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(peers, "REQUIRE_PEERS", False)

    conftest.pytest_configure(_Config(flag))  # type: ignore[arg-type]

    expected = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(expected, match="storescu not installed"):
        peers.missing("storescu not installed")


def test_a_peer_is_ready_only_on_a_port_of_its_own() -> None:
    """A free port is free only within this run: a run alongside may hold it. The peer started for it
    then fails to bind and exits, and connecting to the port reached the other run's server."""
    with socket.create_server(("127.0.0.1", 0)) as stranger:
        port = stranger.getsockname()[1]
        # a process that holds no socket at all, and lives long enough to be asked
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert peers._listens(process.pid, port) is False
            with pytest.raises(TimeoutError):
                peers.wait_for_port(port, process, timeout=0.5)
        finally:
            process.kill()
            process.wait()
    with socket.create_server(("127.0.0.1", 0)) as own:
        assert peers._listens(os.getpid(), own.getsockname()[1]) is True
