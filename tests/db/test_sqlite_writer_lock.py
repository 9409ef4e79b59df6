"""The SQLite writer lock: write transactions queue across threads and processes and always give it back."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from dicom_node.errors import DatabaseUnavailableError
from dicom_node.store import db

pytestmark = pytest.mark.db

ROWS_PER_WRITER = 40


def _make(path: Path) -> Engine:
    engine = db.make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("create table if not exists t (writer text, n integer, primary key (writer, n))"))
    return engine


def _write_rows(path: str, writer: str) -> None:
    """Each row its own transaction, as the node records one instance per transaction."""
    engine = _make(Path(path))
    try:
        for n in range(ROWS_PER_WRITER):
            with engine.begin() as conn:
                before = conn.execute(text("select count(*) from t")).scalar_one()
                conn.execute(text("insert into t values (:w, :n)"), {"w": writer, "n": n})
                after = conn.execute(text("select count(*) from t")).scalar_one()
                assert after == before + 1  # nobody else wrote inside this transaction
    finally:
        engine.dispose()


def _flock_is_free(lock_path: Path) -> bool:
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return True


def test_threads_and_processes_write_one_database_without_errors(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    _make(path).dispose()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_rows, args=(str(path), f"p{i}")) for i in range(2)]
    for process in processes:
        process.start()
    errors: list[BaseException] = []

    def thread_writer(name: str) -> None:
        try:
            _write_rows(str(path), name)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=thread_writer, args=(f"t{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for process in processes:
        process.join(120)
    assert errors == []
    assert [process.exitcode for process in processes] == [0, 0]
    engine = _make(path)
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from t")).scalar_one() == 5 * ROWS_PER_WRITER
    engine.dispose()


def test_the_lock_is_given_back_after_commit_rollback_and_a_failed_statement(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    engine = _make(path)
    lock_path = path.with_name(path.name + ".writer-lock")
    assert lock_path.exists()
    with engine.begin() as conn:
        conn.execute(text("insert into t values ('a', 1)"))
        assert not _flock_is_free(lock_path)  # held for the whole transaction
    assert _flock_is_free(lock_path)
    with engine.connect() as conn:
        conn.begin()
        conn.execute(text("insert into t values ('a', 2)"))
        conn.rollback()
    assert _flock_is_free(lock_path)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("insert into t values ('a', 1)"))  # primary key violation
    assert _flock_is_free(lock_path)
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from t")).scalar_one() == 1
    engine.dispose()


def test_a_lock_held_elsewhere_times_out_as_database_unavailable(tmp_path: Path) -> None:
    lock = db.SqliteWriterLock(tmp_path / "node.sqlite3", timeout=0.2)
    holder = os.open(lock.path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(DatabaseUnavailableError):
            lock.acquire()
        with pytest.raises(DatabaseUnavailableError):  # the failed attempt left no thread lock behind
            lock.acquire()
    finally:
        os.close(holder)
    lock.acquire()
    lock.release()
    lock.close()


def test_in_memory_sqlite_works_without_a_lock_file(tmp_path: Path) -> None:
    engine = db.make_engine("sqlite://")
    with engine.begin() as conn:
        assert conn.execute(text("select 1")).scalar_one() == 1
    engine.dispose()
    assert list(tmp_path.iterdir()) == []


def test_a_new_database_and_its_journal_files_only_the_node_can_read(tmp_path: Path) -> None:
    """The SQLite file holds patient names and IDs; a login umask (022) would make it world-readable."""
    previous = os.umask(0o022)
    try:
        engine = _make(tmp_path / "var" / "node.sqlite3")
        with engine.begin() as conn:
            conn.execute(text("insert into t values ('w', 1)"))
        names = sorted(path.name for path in (tmp_path / "var").iterdir())
        modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (tmp_path / "var").iterdir()}
        engine.dispose()
    finally:
        os.umask(previous)
    assert names == ["node.sqlite3", "node.sqlite3-shm", "node.sqlite3-wal", "node.sqlite3.writer-lock"]
    assert modes == dict.fromkeys(names, "0o600")
    assert oct((tmp_path / "var").stat().st_mode & 0o777) == "0o700"


def test_an_existing_database_others_can_read_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node.sqlite3"
    _make(path).dispose()
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="dicom_node.store.db"):
        _make(path).dispose()
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # the administrator's choice is kept
    assert "can be read by other users (mode 644)" in caplog.text
