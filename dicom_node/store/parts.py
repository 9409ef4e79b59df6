"""The durable parts of a node built from its settings: once by the node process, once by each of its
listener processes (:mod:`dicom_node.listeners`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import ConfigurationError
from dicom_node.settings import Settings
from dicom_node.store import db
from dicom_node.store.files import FileStore


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
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database and database != ":memory:" \
            and not database.startswith("file:") and not Path(database).is_file():
        raise ConfigurationError(
            f"no node database at {database}: run this command with the node's configuration "
            "(--config FILE or CXR_NODE_CONFIG, and the service's environment, e.g. its database URL); "
            "`cxr-node db upgrade` or the first `cxr-node serve` creates the database"
        )
    engine = db.make_engine(settings.database_url, echo=settings.database.echo)
    db.upgrade(engine)
    return db.make_session_factory(engine)
