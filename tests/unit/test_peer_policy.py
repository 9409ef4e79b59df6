"""The peer policy: a missing DCMTK/Orthanc/PostgreSQL skips locally and fails in CI."""

from __future__ import annotations

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
