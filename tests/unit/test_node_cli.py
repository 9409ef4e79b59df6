"""The ``cxr-node`` commands answer an operator's mistake with one line and exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from dicom_node import cli


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
