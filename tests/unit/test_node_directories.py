"""``cxr-node serve`` with a data, storage or results directory it cannot create or write: one line
naming it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from dicom_node.cli import main as cli_main

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("restore_logging")]


def _serve(capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(["serve"])
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: "), err  # one line, no traceback
    return code, err.removeprefix("error: ").rstrip("\n")


def test_a_data_directory_that_cannot_be_created_is_named(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """It stopped with CRITICAL "uncaught PermissionError … in mkdir: Operation not permitted", no path."""
    blocked = tmp_path / "srv"

    def refuse(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", str(self))

    cli_env.setenv("CXR_NODE__NODE__DATA_DIR", str(blocked / "cxr"))
    cli_env.setattr(Path, "mkdir", refuse)  # what a confined service (systemd ProtectSystem=) meets
    assert _serve(capsys) == (
        2, f"the data directory {blocked / 'cxr'} (node.data_dir) cannot be created: Operation not permitted "
           f"at {blocked}",
    )


def test_a_directory_in_the_way_of_a_file_is_named(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "results").write_bytes(b"")  # a file where the results directory goes
    assert _serve(capsys) == (2, f"the results directory {tmp_path / 'var' / 'results'} (node.data_dir) "
                                 "is not a directory")

    storage = tmp_path / "var" / "results" / "instances"
    cli_env.setenv("CXR_NODE__STORAGE__DIRECTORY", str(storage))
    assert _serve(capsys) == (
        2, f"the storage directory {storage} (storage.directory) cannot be created: Not a directory"
    )


def test_a_storage_directory_the_node_cannot_write_is_named(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """/sys takes no new files, for root too (read-only in a container, sysfs refuses them anyway)."""
    cli_env.setenv("CXR_NODE__STORAGE__DIRECTORY", "/sys")
    code, message = _serve(capsys)
    assert code == 2
    assert message.startswith(
        "the storage directory /sys (storage.directory) is not writable by the node's user "
    )
    assert message.endswith((": Permission denied", ": Read-only file system"))
