"""The systemd unit the operator guide installs, checked by systemd's own analyser.

A misspelt directive in a unit file is only a warning ("Unknown key 'ProtectSystm' … ignoring") that an
operator sees in the journal, if at all, and the hardening it was meant to add is silently gone. No
systemd runs as PID 1 here, so the unit is not started; ``systemd-analyze`` reads it as systemd would.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import peers

pytestmark = pytest.mark.interop

UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "cxr-node.service"
INSTALLED = "/opt/cxr-node/bin/cxr-node"  # where the operator guide installs the node


def _analyse(*args: str) -> subprocess.CompletedProcess[str]:
    exe = peers.executable("systemd-analyze")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_systemd_unit_has_no_unknown_directive_and_runs_the_installed_cli(tmp_path: Path) -> None:
    """Every directive is one systemd knows, and the commands it runs are the node's CLI (the venv's
    ``cxr-node`` here, in place of the path the operator guide installs to)."""
    text = UNIT.read_text()
    assert text.count(INSTALLED) == 2  # ExecStartPre (db upgrade) and ExecStart (serve)
    cli = Path(sys.executable).parent / "cxr-node"
    assert cli.is_file(), "the package's console script is not installed"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED, str(cli)))
    checked = _analyse("verify", str(unit))
    assert (checked.returncode, checked.stderr) == (0, "")
    broken = tmp_path / "misspelt.service"  # the check is not blind: a misspelt directive is reported
    broken.write_text(text.replace(INSTALLED, str(cli)).replace("ProtectSystem=", "ProtectSystm="))
    assert "Unknown key 'ProtectSystm'" in _analyse("verify", str(broken)).stderr


def test_the_systemd_units_sandbox_stays_tight() -> None:
    """``systemd-analyze security`` scores what the service may still do (0 = nothing, 10 = all); the
    unit's hardening keeps it "OK" (3.4 on 2026-12-06 with systemd 252; 1.7 with the system call filter,
    ProtectProc and PrivateMounts added the same day), and a lost directive shows."""
    scored = _analyse("security", "--offline=yes", str(UNIT))
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", scored.stdout)
    assert found, scored.stdout + scored.stderr
    assert float(found.group(1)) <= 2.0, scored.stdout
