"""Durable file store for received instances.

A file is either absent or complete: it is written to a temporary file in its final directory, flushed
and fsync'ed, renamed into place and the directory fsync'ed, so a crash or power loss never leaves a
partial instance under its final name. Paths are relative to the store root
(``<study uid>/<series uid>/<sop uid>.dcm``) so the root can move.

Everything here is patient data, so it is the node's own whatever the umask: files are created 0600
(``mkstemp``) and the directories the store creates 0700 (:func:`private_directory`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import ConfigurationError, StorageError

LOGGER = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TEMP_PREFIX = ".incoming-"
INCOMING_DIR = ".incoming"
_WRITE_SLICE = 64 * 1024
_DIRECT_ALIGNMENT = 4096  # offsets, lengths and buffer addresses of O_DIRECT writes (covers 512 B sectors)
_DIRECT_SLICE = 1024 * 1024
PRIVATE_DIRECTORY_MODE = 0o700
_DURABLE_KEPT = 16384  # directories known durable, remembered per file store (about 2 MB)


@dataclass(frozen=True)
class StoredFile:
    """What the store wrote: path relative to the root, content hash and size."""

    relative_path: str
    sha256: str
    size_bytes: int


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Relative path of an instance; UIDs are validated so they cannot escape the root."""
    for uid in (study_uid, series_uid, sop_uid):
        if not _UID.match(uid) or len(uid) > 64:
            raise ValueError("not a valid DICOM UID")
    return f"{study_uid}/{series_uid}/{sop_uid}.dcm"


class StagedFile:
    """A complete, fsync'ed temporary file waiting to be renamed to its final name."""

    def __init__(self, store: FileStore, temp: Path, target: Path, stored: StoredFile) -> None:
        self._store = store
        self._temp: Path | None = temp
        self._target = target
        self.stored = stored

    def publish(self) -> None:
        """Rename into place and make the rename durable."""
        self.rename()
        self.sync_directory()

    def rename(self, relative_path: str | None = None) -> None:
        """Give the file its final name (or ``relative_path``); durable only after :meth:`sync_directory`.

        Split from the fsync so the rename can happen inside a database transaction while the slower
        directory fsync runs after the commit, outside the database's write lock.
        """
        if self._temp is None:
            raise RuntimeError("staged file already published or discarded")
        if relative_path is not None:
            self._target = self._store.path(relative_path)
        try:
            os.replace(self._temp, self._target)
            self._temp = None
        except OSError as exc:
            self.discard()
            raise StorageError(f"cannot write to the file store ({exc.strerror or type(exc).__name__})") from exc

    def sync_directory(self) -> None:
        """fsync the directory holding the new name, and the names of its directories up to the root
        (:meth:`FileStore.sync_parents`)."""
        if not self._store.fsync:
            return
        try:
            _fsync_dir(self._target.parent)
            self._store.sync_parents(self._target.parent)
        except OSError as exc:
            raise StorageError(f"cannot sync the file store ({exc.strerror or type(exc).__name__})") from exc

    def discard(self) -> None:
        if self._temp is not None:
            _unlink_quietly(self._temp)
            self._temp = None


class FileStore:
    """Atomic, fsync'ed writes below ``root``, refused when free space drops under ``min_free_bytes``."""

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0,
                 direct_io: bool = False) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self._direct_buffers = threading.local()
        private_directory(self.root)
        # Temporaries live in one folder on the same file system (rename stays atomic), so start-up
        # clean-up lists one directory instead of walking every study.
        self.incoming = self.root / INCOMING_DIR
        private_directory(self.incoming)
        self._hashers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sha256")
        # Directories below the root whose own names are known durable (their parents fsync'ed since they
        # were made), with every directory above them: see sync_parents.
        self._durable: set[Path] = set()
        self._durable_lock = threading.Lock()

    def path(self, relative_path: str) -> Path:
        """Absolute path of a stored file (rejects paths that would leave the root)."""
        candidate = (self.root / relative_path).resolve()
        if not candidate.is_relative_to(self.root):
            raise ValueError("path escapes the file store")
        return candidate

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_free_space(self, incoming_bytes: int = 0) -> None:
        """Raise :class:`StorageError` if writing ``incoming_bytes`` would go below the reserve."""
        try:
            free = self.free_bytes()
        except OSError as exc:
            raise StorageError("cannot determine free space of the file store") from exc
        if free - incoming_bytes < self.min_free_bytes:
            raise StorageError(
                f"file store below its free-space reserve ({free} bytes free, {self.min_free_bytes} reserved)"
            )

    def write(self, relative_path: str, chunks: Iterable[bytes | memoryview]) -> StoredFile:
        """Write ``chunks`` atomically to ``relative_path`` (replacing an existing file) and hash them."""
        staged = self.stage(relative_path, chunks)
        staged.publish()
        return staged.stored

    def stage(self, relative_path: str, chunks: Iterable[bytes | memoryview]) -> StagedFile:
        """Write and fsync ``chunks`` to a temporary file beside ``relative_path``; publish it later.

        Lets the caller do its database work between the durable write and the rename, and drop the
        temporary (``discard``) if that work finds the file is not wanted after all.
        """
        target = self.path(relative_path)
        chunk_list = list(chunks)
        size = sum(len(c) for c in chunk_list)
        self.check_free_space(size)
        # Hash on a pooled thread while this one writes: both release the GIL on large buffers.
        digest = self._hashers.submit(_sha256, chunk_list)
        temp: Path | None = None
        try:
            self._forget(private_directory(target.parent))
            fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".tmp", dir=self.incoming)
            temp = Path(temp_name)
            try:
                if not (self.direct_io and self._write_direct(fd, chunk_list, size)):
                    for chunk in chunk_list:
                        _write_in_slices(fd, chunk)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            sha256 = digest.result()
        except OSError as exc:
            digest.result()
            if temp is not None:
                _unlink_quietly(temp)
            raise StorageError(f"cannot write to the file store ({exc.strerror or type(exc).__name__})") from exc
        return StagedFile(self, temp, target, StoredFile(relative_path, sha256, size))

    def sync_parents(self, directory: Path) -> None:
        """Make the name of ``directory`` and of each directory above it (below the root) durable: fsync
        the parent of each one not yet known so. Whoever made a directory is not the only one to fsync its
        parent: two associations storing into one new series at once, the one that found the directories
        made fsync'ed only its file's name and was acknowledged before the other had fsync'ed the
        directories' (review); nor was a directory a failed write made ever fsync'ed by the retry."""
        chain: list[Path] = []
        current = directory
        with self._durable_lock:
            while current != self.root and current.is_relative_to(self.root) and current not in self._durable:
                chain.append(current)
                current = current.parent
        for path in reversed(chain):  # from the top: a directory known durable has a durable chain above
            _fsync_dir(path.parent)
            with self._durable_lock:
                if len(self._durable) >= _DURABLE_KEPT:
                    self._durable.clear()  # only costs fsyncs again
                self._durable.add(path)

    def _forget(self, created: list[Path]) -> None:
        """Directories just made (again: one removed by hand meanwhile) are not durable, nor below them."""
        if not created:
            return
        with self._durable_lock:
            self._durable = {path for path in self._durable
                             if not any(path.is_relative_to(made) for made in created)}

    def _write_direct(self, fd: int, chunks: list[bytes | memoryview], size: int) -> bool:
        """Write ``chunks`` past the page cache (``O_DIRECT``); ``False`` if the file system refuses it.

        A buffered write copies each received file into newly allocated page-cache pages. On the virtual
        machine this was measured on, that copy was the largest single CPU cost of a received instance
        (perf: a sixth of all CPU with four JPEG 2000 senders, at about 1 GB/s). Here the bytes go from
        one reused, page-aligned buffer per thread to the disk. The last block is padded and the file
        truncated back to ``size``. Later readers (the pipeline) read from the disk instead of the cache.
        """
        try:
            _set_flags(fd, _get_flags(fd) | os.O_DIRECT)
        except OSError as exc:
            return self._direct_refused(exc)
        buffer = self._direct_buffer()
        view = memoryview(buffer)
        try:
            filled = 0
            for chunk in chunks:
                source = memoryview(chunk).cast("B")
                taken = 0
                while taken < len(source):
                    step = min(len(source) - taken, _DIRECT_SLICE - filled)
                    view[filled : filled + step] = source[taken : taken + step]
                    filled += step
                    taken += step
                    if filled == _DIRECT_SLICE:
                        _write_all(fd, view[:filled])
                        filled = 0
                source.release()
            if filled:
                padded = -(-filled // _DIRECT_ALIGNMENT) * _DIRECT_ALIGNMENT
                view[filled:padded] = bytes(padded - filled)
                _write_all(fd, view[:padded])
            os.ftruncate(fd, size)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            os.ftruncate(fd, 0)  # nothing direct was kept; the buffered path starts again
            _set_flags(fd, _get_flags(fd) & ~os.O_DIRECT)
            os.lseek(fd, 0, os.SEEK_SET)
            return self._direct_refused(exc)
        finally:
            view.release()
        return True  # O_DIRECT stays set: the caller only fsyncs and closes the descriptor

    def _direct_buffer(self) -> mmap.mmap:
        buffer: mmap.mmap | None = getattr(self._direct_buffers, "buffer", None)
        if buffer is None:
            buffer = mmap.mmap(-1, _DIRECT_SLICE)  # anonymous mappings are page-aligned
            self._direct_buffers.buffer = buffer
        return buffer

    def _direct_refused(self, exc: OSError) -> bool:
        LOGGER.info("file store does not take direct I/O (%s): writing through the page cache",
                    exc.strerror or type(exc).__name__)
        self.direct_io = False
        return False

    def close(self) -> None:
        self._hashers.shutdown(wait=True)

    def delete(self, relative_path: str) -> None:
        """Remove a stored file (used to undo a write whose database commit failed)."""
        target = self.path(relative_path)
        _unlink_quietly(target)
        if self.fsync:
            try:
                _fsync_dir(target.parent)
            except OSError as exc:
                LOGGER.warning("could not fsync directory after delete: %s", exc.strerror)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a crash mid-write (called at start-up)."""
        removed = 0
        for stale in self.incoming.glob(f"{_TEMP_PREFIX}*.tmp"):
            _unlink_quietly(stale)
            removed += 1
        if removed:
            LOGGER.info("removed %d incomplete temporary files from the file store", removed)
        return removed


def private_directory(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents readable by the node's user only (0700 under any
    umask; Path.mkdir gives ``mode`` to the last one only) and return those created (their parents need
    an fsync too). Existing directories are left as they are: an administrator may have opened one to a
    group on purpose."""
    missing: list[Path] = []
    current = directory.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(mode=PRIVATE_DIRECTORY_MODE, exist_ok=True)
    return missing


def _write_in_slices(fd: int, chunk: bytes | memoryview) -> None:
    """Write ``chunk`` in cache-sized slices.

    One 7 MB ``write()`` costs ~19 ms of kernel copying here, 64 KiB slices of it ~3 ms: the copy into
    the page cache stays within the CPU caches.
    """
    view = memoryview(chunk).cast("B")
    try:
        for offset in range(0, len(view), _WRITE_SLICE):
            _write_all(fd, view[offset : offset + _WRITE_SLICE])
    finally:
        view.release()


def _get_flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _set_flags(fd: int, flags: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _write_all(fd: int, view: memoryview) -> None:
    offset = 0
    while offset < len(view):
        offset += os.write(fd, view[offset:])


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of a file, read in pieces (a received image can be hundreds of megabytes); None when
    it cannot be read."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _sha256(chunks: list[bytes | memoryview]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make the names in ``directory`` durable: a file created, renamed or removed in it."""
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        LOGGER.debug("nothing to remove at a file-store path")
    except OSError as exc:
        LOGGER.warning("could not remove a file-store file: %s", exc.strerror)


def kept_value(path: Path, make: Callable[[], str], valid: Callable[[str], bool], what: str) -> str:
    """The one-line value kept in ``path``, made by ``make`` the first time and kept readable by the node's
    user only (0600): an installation's identity or key, backed up with ``node.data_dir``. Concurrent
    first calls agree: the value is linked into place once, and the loser reads the winner's. A file that
    does not hold a ``valid`` value stops the node with what to do (``what`` says what it should hold)."""
    try:
        kept = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        kept = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path} cannot be read ({type(exc).__name__})") from exc
    if valid(kept):
        return kept
    if kept:
        raise ConfigurationError(f"{path} does not hold {what}; restore it from the backup, or remove it to "
                                 "make a new one")
    made = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        private_directory(path.parent)
        descriptor = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(make() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(made, path)  # fails if another process or thread made it first: theirs stands
        except FileExistsError:
            pass
        finally:
            made.unlink()
        _fsync_dir(path.parent)  # the name too survives a power cut: a second value would be a new identity
        return path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConfigurationError(
            f"{path} cannot be made ({exc.strerror or type(exc).__name__}): node.data_dir must be writable "
            "by the node's user"
        ) from exc
