"""The ``cxr-node`` commands answer an operator's mistake with one line and exit code 2, never a traceback, and
keep to the node's settings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node import cli
from tests.node_datasets import make_cr, write
from tests.pipeline.storepeer import StorePeer


@pytest.mark.usefixtures("cli_env", "restore_logging")
@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["127.0.0.1", "70000", "PACS"], "port must be 1-65535, not 70000"),
        (["127.0.0.1", "0", "PACS"], "port must be 1-65535, not 0"),
        (["127.0.0.1", "104", "A_TITLE_OF_17_CHR"], "AE title must be 1-16 printable ASCII characters"),
        (["127.0.0.1", "104", "PA\\CS"], "AE title must be 1-16 printable ASCII characters"),
        (["127.0.0.1", "104", "PACS", "--calling-aet", "CXR\tNODE"], "AE title must be 1-16 printable"),
        (["pacs..hospital", "104", "PACS"], "is not an IP address or a host name"),
    ],
)
def test_echo_refuses_an_impossible_peer_in_one_line(
    capsys: pytest.CaptureFixture[str], arguments: list[str], said: str
) -> None:
    with pytest.raises(SystemExit) as ended:
        cli.main(["echo", *arguments])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and said in err
    assert "Traceback" not in err and "uncaught" not in err and "File \"" not in err


@pytest.mark.usefixtures("restore_logging")
def test_send_waits_for_a_response_as_long_as_dicom_dimse_timeout_says(
    cli_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cxr-node send`` waited a fixed 60 s for each C-STORE response whatever ``dicom.dimse_timeout``
    said; the node's outbox keeps to the setting, and so does the command now."""
    slow = StorePeer(delay=4.0).start()
    try:
        cli_env.setenv("CXR_NODE__DICOM__DIMSE_TIMEOUT", "1")
        assert cli.main(["db", "upgrade"]) == 0
        assert cli.main(["ae", "add", "--role", "destination", "--aet", "SLOW", "--host", "127.0.0.1",
                         "--port", str(slow.port)]) == 0
        image = write(make_cr(), tmp_path / "cr.dcm")
        started = time.monotonic()
        code = cli.main(["send", str(image), "--to", "SLOW"])
        waited = time.monotonic() - started
    finally:
        slow.stop()
    assert code == 2 and "error: no C-STORE response" in capsys.readouterr().err
    assert waited < 3.5, f"waited {waited:.1f} s for a response dicom.dimse_timeout gives 1 s"
