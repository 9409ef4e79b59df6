"""Every migration applies to a database that holds rows, as a hospital's does.

The migration tests upgraded empty databases. On SQLite, Alembic's batch mode rebuilds a table for some
changes (copy, DROP, rename), and the node's connections enforce foreign keys: rebuilding a table that
other rows reference (``remote_ae``, referenced by every delivery) failed with "FOREIGN KEY constraint
failed" on a node with results, while every test passed (migration 0017 did). Here each revision's
database gets one row in every table, the references between them filled, and is upgraded to the head.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    func,
    insert,
    select,
)
from sqlalchemy import Enum as SaEnum

from dicom_node.store import db
from dicom_node.store.folding import name_words
from dicom_node.store.models import Base

pytestmark = [pytest.mark.db]

REVISIONS = [s.revision for s in reversed(list(
    ScriptDirectory.from_config(db.alembic_config("sqlite://")).walk_revisions()))]


def _value(table: str, column: Any) -> Any:
    """A value the column takes: an enum's first value (the head models know which columns are enums)."""
    model = Base.metadata.tables.get(table)
    head = model.columns.get(column.name) if model is not None else None
    if head is not None and isinstance(head.type, SaEnum) and head.type.enum_class is not None:
        first = next(iter(head.type.enum_class))
        return first.value if isinstance(first, enum.Enum) else first
    kind = column.type
    if isinstance(kind, Boolean):
        return False
    if isinstance(kind, DateTime):
        return datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    if isinstance(kind, Date):
        return datetime(2026, 1, 2).date()
    if isinstance(kind, (Integer, Numeric, Float)):
        return 1
    if isinstance(kind, JSON):
        return {}
    if isinstance(kind, LargeBinary):
        return b"1"
    if isinstance(kind, (String, Text)):
        return "1"
    return None


def _fill(engine: Engine) -> dict[str, int]:
    """One row in every table but Alembic's; every foreign key points at row 1 of its table."""
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            if table.name == "alembic_version":
                continue
            row = {c.name: _value(table.name, c) for c in table.columns}
            connection.execute(insert(table).values(**row))
        return {t.name: int(connection.execute(select(func.count()).select_from(t)).scalar_one())
                for t in metadata.sorted_tables if t.name != "alembic_version"}


def _break_a_reference(engine: Engine) -> None:
    """Point every delivery at a destination that is not there, as a tool outside the node could."""
    with engine.connect() as connection:
        dbapi = connection.connection.dbapi_connection
        assert dbapi is not None
        dbapi.execute("PRAGMA foreign_keys=OFF")
        dbapi.execute("UPDATE delivery SET destination_pk = 99")
        dbapi.execute("PRAGMA foreign_keys=ON")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("revision", REVISIONS[:-1])
def test_each_revision_upgrades_to_the_head_with_its_rows(
    request: pytest.FixtureRequest, tmp_path: Path, revision: str, backend: str,
) -> None:
    url = f"sqlite:///{tmp_path / 'node.sqlite3'}" if backend == "sqlite" else \
        request.getfixturevalue("pg_server").create_database()
    engine = db.make_engine(url)
    try:
        db.upgrade(engine, revision)
        counts = _fill(engine)
        assert db.upgrade(engine).after == (REVISIONS[-1],)
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            for name, count in counts.items():
                table = metadata.tables[name]
                rows = connection.execute(select(func.count()).select_from(table)).scalar_one()
                assert rows == count, f"rows of {name} lost"
    finally:
        engine.dispose()


def test_an_upgrade_that_would_leave_a_broken_reference_changes_nothing_and_says_where(
    tmp_path: Path,
) -> None:
    """Foreign keys are not enforced while migrating (the rebuilds above need that): the upgrade checks
    the references itself before it commits. A reference broken already (by a tool outside the node) is
    named too."""
    from dicom_node.errors import ConfigurationError

    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    try:
        db.upgrade(engine, REVISIONS[-2])
        _fill(engine)
        _break_a_reference(engine)
        with pytest.raises(ConfigurationError, match=r"1 row\(s\) referencing rows that are not there "
                                                     r"\(tables delivery\); nothing was changed"):
            db.upgrade(engine)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("select version_num from alembic_version").scalar_one() \
                == REVISIONS[-2]
            # and the connection the upgrade used enforces foreign keys again
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    finally:
        engine.dispose()


def test_a_database_at_the_head_is_not_checked_at_every_start(tmp_path: Path) -> None:
    """``upgrade`` runs at every start of the node and of each CLI command (store.parts): with nothing to
    migrate, foreign keys were enforced all along and there is nothing the upgrade could have broken. The
    check read every referencing table under the writer lock each time (C-STOREs waited behind a
    ``cxr-node user add``), and one row broken by an outside tool stopped ``serve`` and every command."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    try:
        db.upgrade(engine)
        _fill(engine)
        _break_a_reference(engine)
        done = db.upgrade(engine)
        assert (done.applied, done.after) == ((), (REVISIONS[-1],))
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    finally:
        engine.dispose()


def test_a_migration_the_database_refuses_is_said_as_such_not_as_a_database_out_of_reach(
    tmp_path: Path,
) -> None:
    """Any OperationalError of an upgrade read "the database cannot be reached", also a statement of a
    migration the database refused after the node had connected (here: an index of that name exists)."""
    from dicom_node.errors import ConfigurationError

    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    before = "0016_study_patient_received"  # 0017 creates that index
    try:
        db.upgrade(engine, before)
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE INDEX ix_delivery_commitment_at ON study (id)")
        with pytest.raises(ConfigurationError, match="^the schema migration failed and was rolled back: "
                                                     "index ix_delivery_commitment_at already exists"):
            db.upgrade(engine)
        with engine.connect() as connection:
            version = connection.exec_driver_sql("select version_num from alembic_version").scalar_one()
        assert version == before
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_names_with_a_typographic_apostrophe_are_folded_again_with_their_words(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str,
) -> None:
    """A node's patients named with ’ or – before the fold made them ASCII marks: their folded names and
    name words are made again, so that "o'neill" typed finds O’NEILL stored before the upgrade."""
    url = f"sqlite:///{tmp_path / 'node.sqlite3'}" if backend == "sqlite" else \
        request.getfixturevalue("pg_server").create_database()
    engine = db.make_engine(url)
    try:
        db.upgrade(engine, "0017_storage_commitment")
        metadata = MetaData()
        metadata.reflect(engine)
        patient, word = metadata.tables["patient"], metadata.tables["patient_name_word"]
        with engine.begin() as connection:
            for pk, name, folded in ((1, "O\u2019NEILL^SE\u00c1N", "o\u2019neill^sean"),
                                     (2, "SMITH\u2013JONES", "smith\u2013jones"), (3, "DOE^JO", "doe^jo")):
                connection.execute(insert(patient).values(id=pk, patient_id=f"P{pk}", issuer_of_patient_id="",
                                                          patient_id_folded=f"p{pk}", name=name,
                                                          name_folded=folded, birth_date="", sex=""))
                connection.execute(insert(word), [{"patient_pk": pk, "word": w}
                                                  for w in sorted(name_words(folded))])
        db.upgrade(engine)
        with engine.connect() as connection:
            folded_names = dict(connection.execute(select(patient.c.id, patient.c.name_folded)).all())
            words = set(connection.execute(select(word.c.patient_pk, word.c.word)).all())
    finally:
        engine.dispose()
    assert folded_names == {1: "o'neill^sean", 2: "smith-jones", 3: "doe^jo"}
    assert words == {(1, "o'neill"), (1, "neill"), (1, "sean"), (2, "smith-jones"), (2, "jones"),
                     (3, "doe"), (3, "jo")}
