"""``cxr-node db upgrade`` as an operator runs it: what it says it did, and a role that may not create
tables."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from dicom_node.cli import main as cli_main
from dicom_node.errors import ConfigurationError
from dicom_node.store import db
from tests.postgres_server import PostgresServer

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("restore_logging")]

HEAD = "0018_name_marks_folded"


def _upgrade(capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_main(["db", "upgrade"])
    out, err = capsys.readouterr()
    return code, out, err


def test_db_upgrade_says_which_migrations_it_applied(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """It said "database schema is up to date" whether it had just applied migrations or not."""
    url = f"sqlite:///{tmp_path / 'node.sqlite3'}"
    cli_env.setenv("CXR_NODE__DATABASE__URL", url)
    engine = db.make_engine(url)
    try:
        db.upgrade(engine, "0007_patient_empty_id")  # a node two versions old
    finally:
        engine.dispose()

    assert _upgrade(capsys) == (
        0,
        "database schema was at 0007_patient_empty_id; applied 0008_result_revision, "
        "0009_study_id_and_offset, 0010_patient_name_folded, 0011_scale_indexes, 0012_identifier_folded, "
        "0013_result_sha256, 0014_patient_name_words, 0015_audit_filter_indexes, "
        "0016_study_patient_received, 0017_storage_commitment, "
        f"{HEAD}; now at {HEAD}\n",
        "",
    )
    assert _upgrade(capsys) == (0, f"database schema already at {HEAD}\n", "")

    cli_env.setenv("CXR_NODE__DATABASE__URL", f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
    code, out, _ = _upgrade(capsys)
    assert code == 0
    assert out.startswith("database schema was empty; applied 0001_initial, 0002_scheduler_jobs, ")
    assert out.endswith(f", {HEAD}; now at {HEAD}\n")


def test_a_role_without_create_on_the_schema_is_one_line_naming_the_grant(
    pg_server: PostgresServer, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """PostgreSQL 15 and later do not let a new role create in schema public: `db upgrade` ended in a
    60-line CRITICAL traceback of the ProgrammingError (InsufficientPrivilege)."""
    url = pg_server.create_database()
    database = url.rsplit("/", 1)[1]
    role = f"cxr_nocreate_{os.getpid()}"
    with psycopg.connect(f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={database}",
                         autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-s3cr3t'")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # PostgreSQL 15's default, on any version
    cli_env.setenv("CXR_NODE__DATABASE__URL",
                    f"postgresql+psycopg://{role}:pw-s3cr3t@127.0.0.1:{pg_server.port}/{database}")

    code, out, err = _upgrade(capsys)

    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: the database refused a schema migration "), err
    assert "SQLSTATE 42501" in err and "permission denied for schema public" in err
    assert f"GRANT CREATE ON SCHEMA public TO {role}" in err
    assert "s3cr3t" not in err and "Traceback" not in err

    with psycopg.connect(f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={database}",
                         autocommit=True) as conn:
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")  # what the message says to do
    applied = f"database schema was empty; applied {_all_revisions()}; now at {HEAD}\n"
    assert _upgrade(capsys)[:2] == (0, applied)


@pytest.mark.parametrize("schema_at", ["0013_result_sha256", HEAD])
def test_a_role_that_does_not_own_the_schema_is_told_to_upgrade_as_its_owner_and_the_grants(
    pg_server: PostgresServer, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], schema_at: str
) -> None:
    """The node's tables made by another role (the operator guide's least-privilege set-up): `db upgrade`
    and `serve` as the node's role said "role … needs CREATE on the schema; GRANT CREATE ON SCHEMA public",
    also when the schema was up to date and the role only lacked SELECT on alembic_version; that GRANT
    mends neither, as only the tables' owner may alter them (review)."""
    url = pg_server.create_database()
    database = url.rsplit("/", 1)[1]
    owner = db.make_engine(url)
    try:
        db.upgrade(owner, schema_at)
    finally:
        owner.dispose()
    role = f"cxr_notowner_{os.getpid()}_{len(schema_at)}"
    admin = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={database}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-n0towner'")
    cli_env.setenv("CXR_NODE__DATABASE__URL",
                   f"postgresql+psycopg://{role}:pw-n0towner@127.0.0.1:{pg_server.port}/{database}")

    code, out, err = _upgrade(capsys)

    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: the database refused a schema migration "), err
    assert "GRANT CREATE ON SCHEMA" not in err
    assert "the node's tables belong to role postgres" in err
    assert "run `cxr-node db upgrade` as role postgres" in err
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}" in err
    assert f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}" in err
    assert "n0towner" not in err and "Traceback" not in err


def _all_revisions() -> str:
    versions = sorted(path.stem for path in (db.MIGRATIONS_DIR / "versions").glob("0*.py"))
    return ", ".join(versions)


def test_a_database_a_newer_node_upgraded_is_one_line_saying_so(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An upgrade rolled back (the package of the version before reinstalled) met a database the newer
    version had migrated: `db upgrade`, and `serve` with it, ended in a CRITICAL "uncaught CommandError"
    traceback with Alembic's reason withheld, and nothing said what had happened or what to do."""
    url = f"sqlite:///{tmp_path / 'node.sqlite3'}"
    cli_env.setenv("CXR_NODE__DATABASE__URL", url)
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
        with engine.begin() as connection:  # what the next version's migration leaves
            connection.execute(text("UPDATE alembic_version SET version_num = '0099_of_a_newer_node'"))
        with pytest.raises(ConfigurationError, match="0099_of_a_newer_node"):
            db.upgrade(engine)
    finally:
        engine.dispose()

    code, out, err = _upgrade(capsys)

    assert code == 2 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("error: the database's schema is at 0099_of_a_newer_node, which this cxr-node"), err
    assert "a newer version of cxr-node" in err and "Traceback" not in err
