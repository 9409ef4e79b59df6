"""File store: atomic, hashed, confined to its root, refusing below the free-space reserve."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dicom_node.errors import StorageError
from dicom_node.store.files import FileStore, instance_path

pytestmark = pytest.mark.unit


def test_write_is_complete_hashed_and_relative(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    rel = instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    stored = store.write(rel, [b"abc", memoryview(b"def")])
    assert stored.relative_path == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert store.path(rel).read_bytes() == b"abcdef"
    assert stored.sha256 == hashlib.sha256(b"abcdef").hexdigest() and stored.size_bytes == 6
    assert [p.name for p in store.path(rel).parent.iterdir()] == ["1.2.3.4.5.dcm"]  # no temporary left


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write("a/b.dcm", [b"old"])
    store.write("a/b.dcm", [b"new"])
    assert store.path("a/b.dcm").read_bytes() == b"new"


@pytest.mark.parametrize("bad", ["1.2.3/../x", "1.2.a", "", "1." * 40 + "1"])
def test_uids_that_could_escape_or_are_invalid_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        instance_path(bad, "1.2", "1.3")


def test_paths_outside_the_root_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileStore(tmp_path / "root").path("../escape.dcm")


def test_below_the_reserve_nothing_is_written(tmp_path: Path) -> None:
    store = FileStore(tmp_path, min_free_bytes=10**18)
    with pytest.raises(StorageError):
        store.write("x/y.dcm", [b"data"])
    assert list(tmp_path.rglob("*.dcm")) == [] and list(tmp_path.rglob("*.tmp")) == []


def test_stale_temporaries_from_a_crash_are_removed(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write("s/kept.dcm", [b"ok"])
    staged = store.stage("s/never-published.dcm", [b"partial"])  # a crash before the rename
    assert staged.stored.size_bytes == 7 and len(list(store.incoming.iterdir())) == 1
    assert store.remove_stale_temporaries() == 1
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["kept.dcm"]
    assert list(store.incoming.iterdir()) == []
