"""The durable parts of a node built from its settings: once by the node process, once by each of its
listener processes (:mod:`dicom_node.listeners`)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

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
