"""File store: atomic, hashed, confined to its root, refusing below the free-space reserve."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import mmap
import os
from pathlib import Path

import pytest

from dicom_node.errors import StorageError
from dicom_node.store import files
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


def _resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (mincore), to tell a direct write from a buffered one."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    size = path.stat().st_size
    page = mmap.PAGESIZE
    # A private writable mapping only so ctypes can take its address; no page is touched.
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE,
                                              prot=mmap.PROT_READ | mmap.PROT_WRITE) as mapped:
        buffer = (ctypes.c_char * 1).from_buffer(mapped)
        vector = (ctypes.c_ubyte * (-(-size // page)))()
        result = libc.mincore(ctypes.c_void_p(ctypes.addressof(buffer)), ctypes.c_size_t(size), vector)
        del buffer
    assert result == 0, os.strerror(ctypes.get_errno())
    return sum(flag & 1 for flag in vector)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 1024 * 1024 - 132, 1024 * 1024 + 1, 4_300_123])
def test_direct_io_writes_exactly_the_bytes_at_every_size(tmp_path: Path, size: int) -> None:
    store = FileStore(tmp_path, direct_io=True)
    chunks: list[bytes | memoryview] = [os.urandom(132), memoryview(bytearray(os.urandom(size)))]
    stored = store.write("a/b.dcm", chunks)
    expected = b"".join(bytes(chunk) for chunk in chunks)
    assert store.path("a/b.dcm").read_bytes() == expected
    assert stored.size_bytes == len(expected)
    assert stored.sha256 == hashlib.sha256(expected).hexdigest()
    assert store.direct_io  # this file system took O_DIRECT


def test_direct_io_bypasses_the_page_cache(tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    direct = FileStore(tmp_path / "direct", direct_io=True)
    buffered = FileStore(tmp_path / "buffered", direct_io=False)
    direct.write("a.dcm", [data])
    buffered.write("a.dcm", [data])
    assert _resident_pages(buffered.path("a.dcm")) > 256  # the buffered copy sits in the cache
    assert _resident_pages(direct.path("a.dcm")) == 0


def test_a_file_system_refusing_direct_io_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(_fd: int, _flags: int) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    store = FileStore(tmp_path, direct_io=True)
    monkeypatch.setattr(files, "_set_flags", refuse)
    with caplog.at_level(logging.INFO, logger="dicom_node.store.files"):
        stored = store.write("a/b.dcm", [b"x" * 5000])
    assert store.path("a/b.dcm").read_bytes() == b"x" * 5000 and stored.size_bytes == 5000
    assert not store.direct_io
    assert "does not take direct I/O" in caplog.text


def test_a_failed_direct_write_leaves_no_temporary_and_no_open_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(_fd: int, _view: memoryview) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = FileStore(tmp_path, direct_io=True)
    store.write("warm.dcm", [b"x"])  # the thread's buffer and the hash pool exist before counting
    descriptors = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(files, "_write_all", disk_full)
    with pytest.raises(StorageError):
        store.write("a/b.dcm", [os.urandom(3 * 1024 * 1024)])
    assert list(store.incoming.iterdir()) == []
    assert not store.path("a/b.dcm").exists()
    assert len(os.listdir("/proc/self/fd")) == descriptors


def test_what_the_store_creates_only_the_node_can_read_under_any_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # the usual login umask: new directories 755, new files 644
    try:
        store = FileStore(tmp_path / "data" / "instances")
        rel = instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
        store.write(rel, [b"patient data"])
    finally:
        os.umask(previous)
    created = [tmp_path / "data", tmp_path / "data" / "instances", store.incoming,
               store.path("1.2.3"), store.path("1.2.3/1.2.3.4")]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in created} == {
        path.name: "0o700" for path in created
    }
    assert oct(store.path(rel).stat().st_mode & 0o777) == "0o600"


def test_an_existing_directory_keeps_the_mode_its_administrator_gave_it(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o750)
    FileStore(root).write("a/b.dcm", [b"x"])
    assert oct(root.stat().st_mode & 0o777) == "0o750"
    assert oct((root / "a").stat().st_mode & 0o777) == "0o700"


def _recorded_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    synced: list[Path] = []
    real = files._fsync_dir

    def record(directory: Path) -> None:
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(files, "_fsync_dir", record)
    return synced


def test_a_file_stored_beside_another_writers_new_directories_is_durable_before_it_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two associations storing into the same new series at once: the first made its study and series
    directories, the second found them there and fsync'ed only the series directory. Acknowledged before
    the first had fsync'ed the parents, the second's file was lost with them in a power cut (review)."""
    store = FileStore(tmp_path / "root")
    synced = _recorded_fsyncs(monkeypatch)
    first = store.stage(instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5"), [b"first"])
    second = store.stage(instance_path("1.2.3", "1.2.3.4", "1.2.3.4.6"), [b"second"])
    second.publish()  # the second is acknowledged while the first has not yet published
    series = store.path("1.2.3/1.2.3.4")
    assert set(synced) == {series, series.parent, store.root}  # its name, the series' and the study's
    synced.clear()
    first.publish()
    assert series in synced


def test_a_directory_left_by_a_failed_write_is_made_durable_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first attempt that made the series' directories and then failed (its rows refused) left them
    never fsync'ed, and the sender's retry, finding them, made only its own name durable (review)."""
    store = FileStore(tmp_path / "root")
    synced = _recorded_fsyncs(monkeypatch)
    store.stage(instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5"), [b"refused"]).discard()
    store.write(instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5"), [b"retried"])
    series = store.path("1.2.3/1.2.3.4")
    assert set(synced) == {series, series.parent, store.root}
    synced.clear()
    store.write(instance_path("1.2.3", "1.2.3.4", "1.2.3.4.6"), [b"next"])
    assert synced == [series]  # once durable, a directory's parents are not fsync'ed again
