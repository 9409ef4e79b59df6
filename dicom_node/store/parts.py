"""The durable parts of a node built from its settings: once by the node process, once by each of its
listener processes (:mod:`dicom_node.listeners`)."""

from __future__ import annotations

import os
import pwd
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import ConfigurationError
from dicom_node.settings import Settings
from dicom_node.store import db
from dicom_node.store.files import FileStore, private_directory
from dicom_node.terminal import say


@dataclass(frozen=True)
class StoreParts:
    engine: Engine
    session_factory: sessionmaker[Session]
    file_store: FileStore

    def close(self) -> None:
        self.file_store.close()
        self.engine.dispose()


def open_store(settings: Settings) -> StoreParts:
    """Engine, session factory and file store as the settings describe them (no migration is run)."""
    prepare_directories(settings)
    engine = db.make_engine(settings.database_url, echo=settings.database.echo)
    storage = settings.storage
    file_store = FileStore(
        settings.storage_dir, fsync=storage.fsync, min_free_bytes=storage.min_free_bytes,
        direct_io=storage.direct_io,
    )
    return StoreParts(engine, db.make_session_factory(engine), file_store)


def command_sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the node's database for an administration command (``ae``, ``user``, ``resend``).

    An SQLite database that does not exist is refused rather than created: the command was then run
    without the node's configuration (a relative ``./var`` in another directory, or without the
    service's environment that names the PostgreSQL database), and an AE title or user added there
    would never reach the running node."""
    url = make_url(settings.database_url)
    if (database := db.sqlite_file(url)) is not None and not database.is_file():
        raise ConfigurationError(
            f"no node database at {database}: run this command with the node's configuration "
            "(--config FILE or CXR_NODE_CONFIG, and the service's environment, e.g. its database URL); "
            "`cxr-node db upgrade` or the first `cxr-node serve` creates the database"
        )
    # Which database the command reads and changes, on stderr: run in another directory that has a
    # ./var of its own, "added caller FOO" went to that database without a word (review).
    say(f"database: {db.describe_url(url)}", err=True)
    engine = db.make_engine(settings.database_url, echo=settings.database.echo)
    db.upgrade(engine)
    return db.make_session_factory(engine)


def prepare_directories(settings: Settings) -> None:
    """Create the node's directories (0700, see :func:`private_directory`) and check that it can write in
    them: a :class:`ConfigurationError` naming the directory, its setting and the operating system's reason
    otherwise. An OSError's own text is withheld from the log (it could quote a file of a patient), so
    without this the node stopped with "uncaught PermissionError … in mkdir" and no path; a configured
    directory is no patient data."""
    storage_setting = "storage.directory" if settings.storage.directory is not None else "node.data_dir"
    for what, directory, setting in (
        ("data directory", settings.node.data_dir.resolve(), "node.data_dir"),
        ("storage directory", settings.storage_dir, storage_setting),
        ("results directory", settings.results_dir, "node.data_dir"),
    ):
        _writable_directory(directory, f"the {what} {directory} ({setting})")


def _writable_directory(directory: Path, named: str) -> None:
    try:
        private_directory(directory)
    except OSError as exc:
        where = f" at {exc.filename}" if exc.filename and Path(str(exc.filename)) != directory else ""
        raise ConfigurationError(f"{named} cannot be created: {_reason(exc)}{where}") from exc
    if not directory.is_dir():
        raise ConfigurationError(f"{named} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cxr-node-write-test-", dir=directory)
    except OSError as exc:
        raise ConfigurationError(
            f"{named} is not writable by the node's user {_user()}: {_reason(exc)}"
        ) from exc
    os.close(fd)
    os.unlink(probe)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a container's numeric user without a passwd entry
        return str(os.geteuid())
