"""The deployment files against each other and the node: what one install path gets, the others get too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "deploy" / "systemd" / "cxr-node.service"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"


def _seconds(text: str) -> float:
    """A compose duration ("1m30s", "60s") or a systemd time span of seconds ("60")."""
    if re.fullmatch(r"[0-9.]+", text):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    parts = re.findall(r"([0-9.]+)(h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(number) * units[unit] for number, unit in parts)


def test_compose_gives_the_node_as_long_to_stop_as_the_systemd_unit() -> None:
    """The node's stop waits for its listener processes, listener and pipeline side by side (up to 30 s,
    dicom_node.app.Node.stop), sized for the unit's TimeoutStopSec=60. Compose's default stop_grace_period
    is 10 s: `docker compose down` or a restart then SIGKILLed a node still finishing its DIMSE operations."""
    unit = re.search(r"^TimeoutStopSec=(\S+)$", UNIT.read_text(), re.MULTILINE)
    assert unit is not None
    node = yaml.safe_load(COMPOSE.read_text())["services"]["cxr-node"]
    assert "stop_grace_period" in node, "compose's default of 10 s is shorter than the node's stop"
    assert _seconds(str(node["stop_grace_period"])) >= _seconds(unit.group(1))
