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


def _packages(line: str) -> set[str]:
    return {word for word in line.split() if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", word)}


def test_every_install_path_installs_the_fonts_the_pdf_reports_use() -> None:
    """reporting.typeface draws names in scripts its bundled DejaVu subset lacks (CJK, Arabic, Hebrew, Thai
    …) with Debian's fonts; `make run` and the container install them, and the operator guide's production
    install did not: there, such names printed as boxes in every PDF."""
    make = re.search(r"^APT_FONTS := (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert make is not None
    fonts = _packages(make.group(1))
    container = (ROOT / "deploy" / "container" / "Containerfile").read_text()
    assert fonts <= _packages(container.split("apt-get install", 1)[1].split("&&", 1)[0].replace("\\", " "))
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    install = guide.split("## 2. Install", 1)[1].split("\n## ", 1)[0]
    joined = re.sub(r"\\\n", " ", re.sub(r"#[^\n]*", "", install))  # continued lines, comments gone
    apt = re.search(r"^sudo apt-get install (.*)$", joined, re.MULTILINE)
    assert apt is not None
    assert fonts <= _packages(apt.group(1)), fonts - _packages(apt.group(1))
