"""Engine and session factories, and schema migration (Alembic) at start-up."""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import ConfigurationError, DatabaseUnavailableError, NodeError, driver_reason
from dicom_node.store.files import private_directory

LOGGER = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


SQLITE_LOCK_TIMEOUT = 30.0
_FLOCK_POLL_SECONDS = 0.0005


class SqliteWriterLock:
    """Queues the write transactions on one SQLite file, across threads and processes.

    SQLite's own busy handler retries a locked database after sleeps of 1, 2, 5, 10, ... 100 ms. With
    several associations (and the node's listener processes) committing one instance each, waiters
    slept long past the moment the writer finished: profiling put a quarter of the C-STORE handlers'
    time in ``BEGIN IMMEDIATE`` with the machine partly idle. Here threads of a process wait on a
    lock that hands over at once, and one thread per process polls an exclusive ``flock`` on a file
    next to the database every half millisecond. Other programs writing the file (the ``sqlite3``
    shell) still meet SQLite's busy handler, which stays in place behind this lock.
    """

    def __init__(self, database: Path, *, timeout: float = SQLITE_LOCK_TIMEOUT) -> None:
        self.path = database.with_name(database.name + ".writer-lock")
        self.timeout = timeout
        self._thread_lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise DatabaseUnavailableError("database write lock not obtained in time")
        try:
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise DatabaseUnavailableError("database write lock not obtained in time") from None
                    time.sleep(_FLOCK_POLL_SECONDS)
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        os.close(self._fd)


def _locking_connection_class(writer_lock: SqliteWriterLock) -> type[sqlite3.Connection]:
    """A pysqlite connection that takes ``writer_lock`` before BEGIN and gives it up with the transaction."""

    class LockingConnection(sqlite3.Connection):
        holds_writer_lock = False

        def begin_immediate(self) -> None:
            writer_lock.acquire()
            self.holds_writer_lock = True
            try:
                self.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                # Another program holds the file (the sqlite3 shell, a backup): pysqlite's own error
                # here is not wrapped by SQLAlchemy, and a sender got 0x0110 "unexpected error" (review)
                self._release_writer_lock()
                said = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
                raise DatabaseUnavailableError(f"database locked by another program ({said})") from exc
            except BaseException:
                self._release_writer_lock()
                raise

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self._release_writer_lock()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self._release_writer_lock()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self._release_writer_lock()

        def _release_writer_lock(self) -> None:
            if self.holds_writer_lock:
                self.holds_writer_lock = False
                writer_lock.release()

    return LockingConnection


def _private_database_file(database: Path) -> None:
    """Create the SQLite file (and its directory) readable by the node's user only: it holds patient
    names and IDs, and SQLite gives its -wal and -shm files the database file's mode. An existing file
    that others can read is left as it is, with a warning (an administrator chose its mode)."""
    private_directory(database.parent)
    try:
        os.close(os.open(database, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        if database.stat().st_mode & 0o007:
            LOGGER.warning("the database file %s can be read by other users (mode %o); it holds patient "
                           "data: chmod 600 it", database, database.stat().st_mode & 0o777)


# What SQLite says when a resource is short, not when a statement is wrong ("no such column")
_SQLITE_TRANSIENT = ("locked", "busy", "disk", "full", "unable to open", "i/o error")
# SQLSTATE classes that pass: connection exception, transaction rollback (deadlock, serialisation),
# insufficient resources, operator intervention (cancelled, shutting down), system error (I/O)
_POSTGRESQL_TRANSIENT = frozenset({"08", "40", "53", "57", "58"})


def waits_for_a_resource(exc: BaseException) -> bool:
    """Whether a failure will pass by itself: the file store short of space, the database away, locked
    or full. A database error is judged by what the driver said: SQLite reports a schema or query bug
    ("no such column") as an OperationalError too, and no wait would mend that."""
    error: BaseException | None = exc
    while error is not None:
        if isinstance(error, DBAPIError):
            if error.connection_invalidated:
                return True
            if isinstance(error.orig, sqlite3.Error):
                said = str(error.orig).lower()
                return isinstance(error, OperationalError) and any(word in said for word in _SQLITE_TRANSIENT)
            state = str(getattr(error.orig, "sqlstate", None) or "")
            if state:  # PostgreSQL, by SQLSTATE class: a deadlock or a full disk passes, a bad query not
                return state[:2] in _POSTGRESQL_TRANSIENT
            return isinstance(error, OperationalError)  # no SQLSTATE: the connection itself failed
        error = error.__cause__
    return isinstance(exc, NodeError) and exc.retriable


#: What the node does with each of its tables (the scheduler's too): all of it.
_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")

#: How :func:`missing_privileges` names a sequence (a table's row ids) the role may not use.
SEQUENCE = "sequence "


def missing_privileges(connection: Any) -> list[str]:
    """The node's tables its PostgreSQL role may not read and write (an operator's REVOKE, or tables
    created by another role without GRANTs), then, as ``sequence <name>``, the sequences of those tables'
    row ids it may not use (without USAGE every INSERT fails); empty on SQLite, where the file mode
    decides."""
    if connection.dialect.name != "postgresql":
        return []
    from dicom_node.store.models import Base

    names = sorted(Base.metadata.tables)
    checks = " AND ".join(f"has_table_privilege(t, '{p}')" for p in _TABLE_PRIVILEGES)
    rows = connection.exec_driver_sql(
        f"SELECT t FROM unnest(%(names)s::text[]) AS t WHERE to_regclass(t) IS NOT NULL AND NOT ({checks})",
        {"names": names},
    )
    tables = [str(row[0]) for row in rows]
    sequences = connection.exec_driver_sql(
        "SELECT DISTINCT s.relname FROM pg_depend d"
        " JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
        " WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass"
        " AND d.refobjid IN (SELECT to_regclass(t) FROM unnest(%(names)s::text[]) AS t)"
        # CASE: the planner may test the privilege before the join's relkind, and an index is no sequence
        " AND CASE WHEN s.relkind = 'S' THEN NOT has_sequence_privilege(s.oid, 'USAGE') END"
        " ORDER BY s.relname",
        {"names": names},
    )
    return tables + [SEQUENCE + str(row[0]) for row in sequences]


def privileges_advice(missing: list[str]) -> str:
    """One line naming what :func:`missing_privileges` found and the GRANTs that mend it."""
    tables = [name for name in missing if not name.startswith(SEQUENCE)]
    sequences = [name.removeprefix(SEQUENCE) for name in missing if name.startswith(SEQUENCE)]
    wants, grants = [], []
    if tables:
        wants.append(f"read and write table(s) {', '.join(tables)}")
        grants.append("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                      "TO <the node's role>")
    if sequences:
        wants.append(f"use sequence(s) {', '.join(sequences)}")
        grants.append("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO <the node's role>")
    return f"the database role may not {' nor '.join(wants)}: {'; '.join(grants)}"


#: pg_try_advisory_lock key of a running node ("CXRNODE" in ASCII): one node per database.
NODE_LOCK_KEY = 0x4358524E4F4445


#: How long /healthz and a stop wait for a lock check that is itself waiting on the database.
_GUARD_WAIT_SECONDS = 2.0


class LockState(enum.Enum):
    """What :meth:`NodeLock.check` found."""

    HELD = "held"
    UNREACHABLE = "unreachable"  # the database cannot be reached to tell; checked again later
    TAKEN = "taken"  # another node took it while this one's session was gone
    RELEASED = "released"  # this node is not running


class NodeLock:
    """Held by a running node for as long as it runs: a second node on the same database refuses to start.

    Two nodes sharing a database share its scheduler tables too: each fired the other's settle timers on
    studies whose files it did not have ("stored file unreadable", the study FAILED), and one's scheduler
    thread died on a timer the other had taken. PostgreSQL: a session advisory lock on a connection kept
    open; SQLite: an exclusive ``flock`` on ``<database>.node-lock`` (the node's listener processes do not
    take it). Either goes with the process, however it ends."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Any = None
        self._fd: int | None = None
        self._guard = threading.Lock()  # the health check and stop() share the lock's connection
        self._wanted = False  # between acquire() and release()
        self._last = LockState.RELEASED  # what the last check found

    def acquire(self) -> None:
        url = self._engine.url
        if url.get_backend_name() == "postgresql":
            if not self._take_advisory_lock():
                raise ConfigurationError(ANOTHER_NODE)
        elif (path := sqlite_file(url)) is not None:
            lock_file = path.with_name(path.name + ".node-lock")
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigurationError(ANOTHER_NODE) from None
            self._fd = fd
        self._wanted = True
        self._last = LockState.HELD

    def _take_advisory_lock(self) -> bool:
        try:
            connection = self._engine.connect()
        except OperationalError as exc:
            raise _unreachable(exc) from exc
        try:
            query = f"SELECT pg_try_advisory_lock({NODE_LOCK_KEY})"
            taken = bool(connection.exec_driver_sql(query).scalar())
            connection.commit()
        except OperationalError as exc:
            _close_for_good(connection)
            raise _unreachable(exc) from exc
        if not taken:
            connection.close()
            return False
        self._connection = connection
        return True

    def held(self) -> bool:
        """Whether this node still holds the lock (a /healthz check; see :meth:`check`)."""
        return self.check() is LockState.HELD

    def check(self) -> LockState:
        """Whether this node still holds the lock. The PostgreSQL lock goes with the session that holds
        it: a database restart, a failover or an idle-connection cut end it without a word, and a second
        node could then start. A lost session is taken again when no other node has taken the lock
        meanwhile. The running node checks every ``database.lock_check_seconds`` (and /healthz on each
        call). A check still waiting on a database that does not answer makes another caller (/healthz)
        get the last state found rather than wait with it."""
        if not self._guard.acquire(timeout=_GUARD_WAIT_SECONDS):
            return self._last
        try:
            self._last = self._check()
            return self._last
        finally:
            self._guard.release()

    def _check(self) -> LockState:
        if not self._wanted:
            return LockState.RELEASED
        if self._engine.url.get_backend_name() != "postgresql":
            return LockState.HELD  # an flock stays with its open file
        if self._connection is not None:
            try:
                self._connection.exec_driver_sql("SELECT 1").scalar()
                self._connection.commit()
                return LockState.HELD
            except OperationalError:
                _close_for_good(self._connection)
                self._connection = None
        try:
            taken = self._take_advisory_lock()
        except DatabaseUnavailableError:
            return LockState.UNREACHABLE
        if taken:
            LOGGER.warning("the database session holding the node lock was lost; the lock is taken again")
            return LockState.HELD
        LOGGER.error("the node lock was lost, and another cxr-node has taken it: stop one of them")
        return LockState.TAKEN

    def release(self) -> None:
        """Give the lock up. If a check is still waiting on a database that does not answer, the node
        stops without waiting for it: the PostgreSQL session, and its lock, end with the process."""
        if not self._guard.acquire(timeout=_GUARD_WAIT_SECONDS):
            self._wanted = False
            LOGGER.warning("the database holding the node lock does not answer; the lock ends with the "
                           "process")
            return
        try:
            self._wanted = False
            self._release()
        finally:
            self._guard.release()

    def _release(self) -> None:
        if self._connection is not None:
            _close_for_good(self._connection)  # the server ends the session's advisory lock with it
            self._connection = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _close_for_good(connection: Any) -> None:
    """Close a connection and its session, not hand it back to the pool (which would keep a session
    lock with it, or a broken connection)."""
    connection.invalidate()
    connection.close()


ANOTHER_NODE = (
    "another cxr-node is running on this database; give each node its own database (database.url) "
    "and data directory (node.data_dir)"
)


def sqlite_file(url: URL) -> Path | None:
    """The file of an SQLite database URL (absolute); None for another engine, an in-memory database or
    a ``file:`` URI."""
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).resolve()


def describe_url(url: Any) -> str:
    """Which database a URL names, for the log, without its password: "SQLite file /var/…" or
    "PostgreSQL cxrnode on db.example:5432 as cxrnode"."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite file {parsed.database}" if parsed.database else "SQLite in memory"
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    who = f" as {parsed.username}" if parsed.username else ""
    return f"{parsed.get_backend_name()} {parsed.database} on {where}{who}"


def masked_url(url: str) -> str:
    """The URL to show an admin: its password, and any password in its query (psycopg takes
    ``?password=`` and ``sslpassword=``), as ``***``."""
    parsed = make_url(url)
    secret = {key: _MASK for key in parsed.query if "password" in key.lower()}
    rendered = parsed.update_query_dict(secret).render_as_string(hide_password=True)
    return rendered.replace(quote(_MASK, safe=""), _MASK)


_MASK = "***"


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Build an engine. SQLite gets WAL, a busy timeout, enforced foreign keys and, for a database
    file, a :class:`SqliteWriterLock` in front of its write transactions."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # not a URL at all, or a port that is not a number
        raise ConfigurationError(
            "database.url is not a database URL: use postgresql+psycopg://user@host/name or sqlite:///path"
        ) from exc
    # hide_parameters: bound values (patient names, IDs) never reach logs or exception texts.
    kwargs: dict[str, Any] = {"echo": echo, "future": True, "hide_parameters": True}
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite:
        connect_args: dict[str, Any] = {"timeout": SQLITE_LOCK_TIMEOUT, "check_same_thread": False}
        if (database := sqlite_file(parsed)) is not None:
            _private_database_file(database)
            writer_lock = SqliteWriterLock(database)
            connect_args["factory"] = _locking_connection_class(writer_lock)
        kwargs["connect_args"] = connect_args
    else:
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=10)
        if parsed.get_backend_name() == "postgresql":
            # TCP keepalives (libpq): a connection cut by a firewall or a failover is found within about
            # 1.5 minutes, not hours later; the node lock's idle session among them.
            # connect_timeout: a server that does not answer a new connection is given up after 10 s.
            kwargs["connect_args"] = {"keepalives": 1, "keepalives_idle": 60, "keepalives_interval": 10,
                                      "keepalives_count": 3, "connect_timeout": 10}
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ModuleNotFoundError) as exc:  # an unknown dialect, or its driver is missing
        raise ConfigurationError(
            f"database.url names a database the node cannot use ({parsed.drivername}): use "
            "postgresql+psycopg://user@host/name or sqlite:///path"
        ) from exc
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        if "factory" in connect_args:
            weakref.finalize(engine, writer_lock.close)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is turned off so that "begin" below is the only BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the node answers success (NORMAL may lose it on power loss).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_LOCK_TIMEOUT * 1000)}")
    cursor.close()
    # SQLite's built-in lower() folds only A-Z, so a search for "müller" never found "MÜLLER"; PostgreSQL's
    # folds every letter of its UTF-8 locale. Python's is the same for both, and replaces the built-in.
    dbapi_connection.create_function("lower", 1, _unicode_lower, deterministic=True)


def _unicode_lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


#: Execution option of an engine whose transactions only read (:func:`make_read_only_session_factory`).
READ_ONLY = "cxr_read_only"


def _sqlite_begin_immediate(connection: Any) -> None:
    """Take SQLite's write lock at BEGIN, unless the connection only reads (:data:`READ_ONLY`).

    A deferred transaction that reads and then writes fails at once with "database is locked"
    (SQLITE_BUSY_SNAPSHOT, the busy timeout does not apply) when another connection committed in
    between — exactly what concurrent associations do. BEGIN IMMEDIATE waits for the lock instead.
    A transaction that only reads needs no lock in WAL mode: it reads the last commit, and never waits
    behind the writers (review: the caller check of an association request queued behind every image
    being stored, and behind another program holding the file, for up to 30 s).
    """
    if connection.get_execution_options().get(READ_ONLY):
        connection.exec_driver_sql("BEGIN")
        return
    dbapi_connection = connection.connection.dbapi_connection
    begin = getattr(dbapi_connection, "begin_immediate", None)
    if begin is not None:
        begin()  # the writer lock first, then BEGIN IMMEDIATE on the same connection
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_only_session_factory(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Sessions on ``factory``'s engine for work that only reads: on SQLite they take no write lock (a
    write in one of them would meet SQLITE_BUSY instead of waiting its turn); elsewhere they are the same."""
    engine: Engine = factory.kw["bind"]
    return sessionmaker(bind=engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: commit on success, roll back on error, map lost connections to 0xA700."""
    session = factory()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        raise DatabaseUnavailableError("database unavailable") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@dataclass(frozen=True)
class SchemaUpgrade:
    """What :func:`upgrade` did: the schema revision(s) before, the migrations applied (oldest first) and
    the revision(s) after. An empty ``before`` is a database without the node's schema."""

    before: tuple[str, ...]
    applied: tuple[str, ...]
    after: tuple[str, ...]

    def summary(self) -> str:
        """One line for the operator: ``already at 0009_…``, or what was applied on top of what."""
        after = ", ".join(self.after) or "(none)"
        if not self.applied:
            return f"database schema already at {after}"
        before = f"was at {', '.join(self.before)}" if self.before else "was empty"
        return f"database schema {before}; applied {', '.join(self.applied)}; now at {after}"


def upgrade(engine: Engine, revision: str = "heads") -> SchemaUpgrade:
    """Apply migrations up to ``revision`` on ``engine`` (idempotent); returns what it did."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    sqlite = engine.dialect.name == "sqlite"
    try:
        connection = engine.connect()
    except OperationalError as exc:  # the server is down or refuses the login: one line, not a traceback
        raise _unreachable(exc) from exc
    try:
        with connection:
            if sqlite:
                _sqlite_foreign_keys(connection, on=False)
            try:
                with connection.begin():
                    before = tuple(sorted(MigrationContext.configure(connection).get_current_heads()))
                    _refuse_unknown_revisions(before, ScriptDirectory.from_config(cfg))
                    cfg.attributes["connection"] = connection
                    command.upgrade(cfg, revision)
                    after = tuple(sorted(MigrationContext.configure(connection).get_current_heads()))
                    # Only a migration ran without foreign keys: at every start with nothing to migrate
                    # the check read every referencing table under the writer lock.
                    if sqlite and after != before:
                        _check_references(connection)
            finally:
                if sqlite:
                    _sqlite_foreign_keys(connection, on=True)
    except DBAPIError as exc:
        if _sqlstate(exc) == INSUFFICIENT_PRIVILEGE:
            raise _not_permitted(engine, exc) from exc
        if isinstance(exc, OperationalError):
            # connected, then a migration failed (a lock held too long, a connection lost, a statement the
            # database refused): said as such, not as a database that cannot be reached
            reason = driver_reason(exc.orig) or type(exc.orig).__name__
            raise ConfigurationError(f"the schema migration failed and was rolled back: {reason}") from exc
        raise
    applied = tuple(reversed([
        script.revision for script in ScriptDirectory.from_config(cfg).iterate_revisions(after, before)
    ]))
    done = SchemaUpgrade(before, applied, after)
    LOGGER.info("%s", done.summary())
    return done


def _refuse_unknown_revisions(current: tuple[str, ...], scripts: ScriptDirectory) -> None:
    """Refuse a database whose schema revision this version has no migration for: a newer version
    migrated it, and this one was installed back (an upgrade rolled back). Alembic's own error ended the
    command or the node in an uncaught traceback whose reason the log withholds."""
    known = {script.revision for script in scripts.walk_revisions()}
    unknown = [revision for revision in current if revision not in known]
    if unknown:
        raise ConfigurationError(
            f"the database's schema is at {', '.join(unknown)}, which this cxr-node (schema up to "
            f"{scripts.get_current_head()}) does not know: a newer version of cxr-node upgraded it; run that "
            "version again, or restore the database from the backup taken before the upgrade"
        )


def _sqlite_foreign_keys(connection: Connection, *, on: bool) -> None:
    """Turn SQLite's foreign key enforcement on or off for this connection, outside a transaction (where
    the PRAGMA is a no-op). Off while migrating: Alembic's batch mode rebuilds a table by copying it,
    dropping it and renaming the copy, and dropping a table that other rows reference (a patient's
    studies, a result object's deliveries) failed with "FOREIGN KEY constraint failed" on every node
    that held data (migrations 0007 and 0008); an empty test database never showed it."""
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None
    dbapi_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _check_references(connection: Connection) -> None:
    """Refuse (roll back) an upgrade that left a row referencing one that is not there."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = ", ".join(sorted({str(row[0]) for row in broken}))
        raise ConfigurationError(f"the schema upgrade would leave {len(broken)} row(s) referencing rows that "
                                 f"are not there (tables {tables}); nothing was changed")


#: PostgreSQL's SQLSTATE for "permission denied" (a role without CREATE on the schema, not owning a table).
INSUFFICIENT_PRIVILEGE = "42501"


def _sqlstate(exc: DBAPIError) -> str | None:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)  # psycopg 3 or 2
    return str(code) if code else None


def _unreachable(exc: OperationalError) -> DatabaseUnavailableError:
    reason = driver_reason(exc.orig) or "no reason given"
    return DatabaseUnavailableError(f"the database cannot be reached: {reason}")


def _schema_owner(engine: Engine) -> str | None:
    """The role that owns the node's schema (its alembic_version table) when it is not the one connected;
    None when it is, when there is no schema yet, or when that cannot be read."""
    try:
        with engine.connect() as connection:
            owner = connection.exec_driver_sql(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass('alembic_version')"
                " AND relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)"
            ).scalar()
    except DBAPIError:
        return None
    return str(owner) if owner is not None else None


def _not_permitted(engine: Engine, exc: DBAPIError) -> ConfigurationError:
    """A role that may log in but not create the node's tables: PostgreSQL 15 and later no longer let every
    role create in schema ``public``, so a role made with ``createuser`` alone meets this at the first
    migration. The driver's first line names the schema or table; the URL's password is never repeated."""
    reason = driver_reason(exc.orig) or "permission denied"
    role = engine.url.username or "the node's role"
    database = engine.url.database or "the node's database"
    refused = (f"the database refused a schema migration (SQLSTATE {INSUFFICIENT_PRIVILEGE} "
               "insufficient_privilege: ")
    owner = _schema_owner(engine)
    if owner is not None:
        # Another role made the node's tables: CREATE on the schema would not let this one alter them, nor
        # read alembic_version; the owner migrates, this role reads and writes.
        return ConfigurationError(
            f"{refused}{reason}): the node's tables belong to role {owner}, not {role}: run `cxr-node db "
            f"upgrade` as role {owner} (CXR_NODE__DATABASE__URL naming it), and as a superuser or {owner}, "
            f"in database {database}: GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
            f"TO {role}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
        )
    return ConfigurationError(
        f"{refused}{reason}): role {role} needs CREATE on the schema; as a superuser, in database "
        f"{database}: GRANT CREATE ON SCHEMA public TO {role}; or make it the database's owner: "
        f"ALTER DATABASE {database} OWNER TO {role}"
    )
