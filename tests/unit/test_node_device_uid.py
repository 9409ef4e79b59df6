"""The node's Device Observer UID: one per installation, kept with its data, the same for every thread."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from pydicom.uid import UID

from dicom_node.errors import ConfigurationError
from dicom_node.pipeline import DEVICE_UID_FILE, device_uid, node_identity
from dicom_node.settings import Settings

pytestmark = pytest.mark.unit


def test_each_installation_is_its_own_device_whatever_it_is_called(tmp_path: Path) -> None:
    """The UID was derived from the AE title and the node's name: two hospitals that kept the defaults were
    one device in every SR, and renaming the AE title made the node another one (review)."""
    first, second = (Settings(node={"data_dir": tmp_path / name}) for name in ("a", "b"))
    uid = node_identity(first).device_uid
    assert UID(uid).is_valid and uid.startswith("2.25.") and len(uid) <= 64
    assert node_identity(second).device_uid != uid  # same defaults, another installation
    renamed = Settings(node={"data_dir": tmp_path / "a", "name": "Ward 3"}, dicom={"ae_title": "WARD3"})
    assert node_identity(renamed).device_uid == uid  # kept across restarts and renames
    assert (tmp_path / "a" / DEVICE_UID_FILE).read_text().strip() == uid


def test_threads_asking_at_once_for_the_first_time_agree(tmp_path: Path) -> None:
    start = threading.Barrier(8)
    seen: list[str] = []

    def ask() -> None:
        start.wait()
        seen.append(device_uid(tmp_path))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 1 and len(seen) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEVICE_UID_FILE]  # no temporary left


def test_a_damaged_uid_file_stops_the_node_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / DEVICE_UID_FILE).write_text("not a uid\n")
    with pytest.raises(ConfigurationError, match="restore it from the backup, or remove it"):
        device_uid(tmp_path)


def test_a_data_directory_the_node_cannot_write_in_stops_it_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only data directory was an OSError traceback at start (the tests run as root, which writes
    anywhere: the refusal is the operating system's, as it would answer the node's user)."""
    def refused(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refused)
    said = r"cannot be made \(Permission denied\): node.data_dir must be"
    with pytest.raises(ConfigurationError, match=said):
        device_uid(tmp_path)


def test_a_new_uid_is_on_disk_with_its_name_before_it_is_used(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The file was fsync'ed but not the directory its name was linked into: after a power cut the node
    could come back without the name and make a second UID for a device that had already sent SRs."""
    from dicom_node.store import files

    synced: list[Path] = []
    real = files._fsync_dir
    monkeypatch.setattr(files, "_fsync_dir", lambda directory: (synced.append(directory), real(directory)))
    uid = device_uid(tmp_path / "data")
    assert synced == [tmp_path / "data"]
    assert device_uid(tmp_path / "data") == uid and synced == [tmp_path / "data"]  # read, not written again
