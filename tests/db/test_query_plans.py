"""The console's and the timers' queries read indexes, not whole tables, at a hospital's volume.

Speeds are measured by benchmarks/console_scale.py (100,000 studies); these tests hold the plans that
make them: SQLite's EXPLAIN QUERY PLAN of every statement a page or a timer runs, on a database as the
node keeps it (migrated, never ANALYZEd: without statistics SQLite plans the same for 10 rows as for
10 million), and the indexes the migration creates on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from sqlalchemy import Engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import aes
from dicom_node.metrics import NodeMetrics
from dicom_node.outbox import Outbox
from dicom_node.pipeline import Pipeline
from dicom_node.retention import Retention
from dicom_node.settings import Settings
from dicom_node.store import db
from dicom_node.store.models import AeRole, AuditEvent
from dicom_node.web import admin, results
from tests.web.studies import StudySpec, add_study

pytestmark = pytest.mark.db

SCALE_INDEXES = {
    ("instance", "ix_instance_received_at"): ["received_at"],
    ("instance", "ix_instance_state_purged_at"): ["state", "purged_at"],
    ("patient", "ix_patient_patient_id_folded"): ["patient_id_folded"],
    ("patient_name_word", "ix_patient_name_word_word"): ["word", "patient_pk"],
    ("study", "ix_study_accession_number_folded"): ["accession_number_folded"],
    ("study", "ix_study_patient_pk_first_received_at"): ["patient_pk", "first_received_at", "id"],
    ("study", "ix_study_state_analysed_at"): ["state", "analysed_at"],
    ("study", "ix_study_state_last_received_at"): ["state", "last_received_at"],
    ("delivery_attempt", "ix_delivery_attempt_outcome"): ["outcome"],
    ("delivery", "ix_delivery_destination_state_next"): ["destination_pk", "state", "next_attempt_at"],
    ("audit_event", "ix_audit_event_actor"): ["actor", "at", "id"],
    ("audit_event", "ix_audit_event_action"): ["action", "at", "id"],
}


def test_the_upgrade_creates_the_indexes_the_console_and_timers_read(engine: Engine) -> None:
    inspector = inspect(engine)
    found = {
        (table, index["name"]): list(index["column_names"])
        for table in {t for t, _ in SCALE_INDEXES}
        for index in inspector.get_indexes(table)
    }
    assert {key: found.get(key) for key in SCALE_INDEXES} == SCALE_INDEXES


# ---------------------------------------------------------------------------------------------
# Plans on SQLite
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(sqlite_engine: Engine) -> sessionmaker[Session]:
    return db.make_session_factory(sqlite_engine)


@contextmanager
def plans(engine: Engine) -> Iterator[list[list[str]]]:
    """The EXPLAIN QUERY PLAN lines of every SELECT run inside the block, one list per statement."""
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and not many:
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    found: list[list[str]] = []
    try:
        yield found
    finally:
        event.remove(engine, "before_cursor_execute", record)
    with engine.connect() as conn:
        for statement, parameters in statements:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            found.append([str(row[-1]) for row in rows])


BIG_TABLES = ("study", "patient", "patient_name_word", "series", "instance", "finding", "result_object",
              "delivery", "delivery_attempt", "job", "audit_event")


def whole_table_reads(found: list[list[str]]) -> list[str]:
    """Plan lines that read a large table row by row, or look up a correlated subquery for every row."""
    bad = []
    for lines in found:
        for line in lines:
            scanned = line.split()[1] if line.startswith("SCAN ") else ""
            if scanned in BIG_TABLES and "COVERING INDEX" not in line:
                bad.append(line)
        if any(line.startswith("CORRELATED") for line in lines):
            bad.append(" / ".join(lines))
    return bad


def test_the_dashboard_counts_today_from_indexes(
    sqlite_engine: Engine, factory: sessionmaker[Session]
) -> None:
    """Every dashboard load read the whole instance table and every analysed study (90 ms at 100,000)."""
    with plans(sqlite_engine) as found, factory() as session:
        results.dashboard(session)
    assert found and whole_table_reads(found) == []
    assert not [line for lines in found for line in lines if line.startswith("SCAN ")]


def test_the_finding_labels_are_sought_in_their_index_not_read_through_it(
    sqlite_engine: Engine, factory: sessionmaker[Session]
) -> None:
    """Every results page read every finding's label (SELECT DISTINCT over the whole label index: 3 ms at
    110,000 findings); each label is now one seek from the one before."""
    for n, label in enumerate(["normal", "covid", "pneumonia"]):
        add_study(factory, StudySpec(f"LABEL^{n}", f"PL{n}", f"AL{n}", label=label))
    with plans(sqlite_engine) as found, factory() as session:
        assert results.finding_labels(session) == ["covid", "normal", "pneumonia"]
    assert len(found) == 4  # the first label, then one seek after each
    lines = [line for lines in found for line in lines]
    assert not [line for line in lines if line.startswith("SCAN ")], lines
    assert all("INDEX ix_finding_label" in line for line in lines), lines


SEARCHES: dict[str, results.ResultQuery] = {
    "first page": results.ResultQuery(),
    "late page": results.ResultQuery(page=3990),
    "finding": results.ResultQuery(finding="covid"),
    "finding, late page": results.ResultQuery(finding="covid", page=20),
    "date range": results.ResultQuery(date_from=date(2026, 11, 1), date_to=date(2026, 11, 30)),
    "accession": results.ResultQuery(accession="ACC0005"),
    "accession with a wildcard inside": results.ResultQuery(accession="acc00?5"),
}


@pytest.mark.parametrize("name", list(SEARCHES))
def test_a_results_search_reads_no_whole_table(
    name: str, sqlite_engine: Engine, factory: sessionmaker[Session]
) -> None:
    """A finding search looked up every study's findings one by one (SQLite stopped it after 20 s at
    100,000 studies); a late page built every row it skipped, each with its patient (230 ms)."""
    with plans(sqlite_engine) as found, factory() as session:
        results.search(session, SEARCHES[name])
    assert found and whole_table_reads(found) == []
    patient_reads = [line for lines in found for line in lines if " patient" in line]
    assert all("PRIMARY KEY" in line for line in patient_reads), patient_reads


RESULT_PAGES_BY_LINK: dict[str, dict[str, Any]] = {
    "a late page": {"page": 3990, "before": 1},
    "the page before a late page": {"page": 3989, "after": 1},
    "a late page of a finding's": {"finding": "covid", "page": 20, "before": 1},
    "a late page of a date range": {"date_from": date(2026, 1, 1), "page": 50, "before": 1},
}


@pytest.mark.parametrize("name", list(RESULT_PAGES_BY_LINK))
def test_a_results_page_by_its_link_is_sought_from_the_index(
    name: str, sqlite_engine: Engine, factory: sessionmaker[Session]
) -> None:
    """A late page walked past every study of the pages before it (OFFSET 99,725 at page 3990); the
    pager's link seeks it from its (first_received_at, id) in the index on first_received_at (which on
    SQLite holds the id too, as every index holds the rowid)."""
    add_study(factory, StudySpec())
    with plans(sqlite_engine) as found, factory() as session:
        results.search(session, results.ResultQuery(**RESULT_PAGES_BY_LINK[name]))
    assert found and whole_table_reads(found) == []
    if "finding" in RESULT_PAGES_BY_LINK[name]:
        return  # the finding's studies come from its index (a few thousand), sorted: no key to seek
    lines = [line for lines in found for line in lines]
    bound = ">" if "after" in RESULT_PAGES_BY_LINK[name] else "<"
    sought = f"INDEX ix_study_first_received_at (first_received_at{bound}?)"
    assert any(sought in line for line in lines), found


def test_a_patient_search_reads_the_patients_once_not_every_study(
    sqlite_engine: Engine, factory: sessionmaker[Session]
) -> None:
    """A search by Patient ID lower-cased every study's patient, joined study by study (310 ms at 100,000
    studies). The ID now searches its index, the name words theirs (migration 0014), and the studies are
    found from the patients."""
    with plans(sqlite_engine) as found, factory() as session:
        results.search(session, results.ResultQuery(patient="PID0000421"))
    lines = [line for lines in found for line in lines]
    assert not [line for line in lines if line.startswith("SCAN study")], found
    assert not [line for line in lines if line.startswith("SEARCH patient USING INTEGER PRIMARY KEY")], found


@pytest.mark.parametrize("typed", ["muller", "Müller Jörg", "o*brien", "sm?th j*n"])
def test_a_name_search_finds_the_words_from_their_index(
    typed: str, sqlite_engine: Engine, factory: sessionmaker[Session]
) -> None:
    """A search by a word of the patient's name read every patient's folded name (LIKE '%word%': 80 ms a
    search at 100,000 studies on SQLite, 35 ms on PostgreSQL); each word is now a prefix of the index of
    the names' words, and only the patients found are looked up."""
    with plans(sqlite_engine) as found, factory() as session:
        results.search(session, results.ResultQuery(patient=typed))
    assert found and whole_table_reads(found) == []
    lines = [line for lines in found for line in lines]
    words = len(typed.split())
    # each further word's list from the word index (an alias of the table), and the patients it holds
    # looked up by the (patient, word) key with the first word's prefix: no word read whole
    searched = [line for line in lines
                if re.match(r"SEARCH patient_name_word(_\d+)? USING COVERING INDEX", line)
                and "word>? AND word<?)" in line]
    assert len(searched) == 2 * words, found  # each word by its prefix, in the count and in the page
    # their studies, newest first, from one index (migration 0016; on PostgreSQL the index on patient_pk
    # alone made the page read the whole study table for "Müller Jörg")
    studies = [line for line in lines if line.startswith("SEARCH study ")]
    assert studies and all("COVERING INDEX ix_study_patient_pk_first_received_at (patient_pk=?)" in line
                           for line in studies), found
    assert not [line for line in lines if line.startswith("SCAN ") and "patient" in line], found


AUDIT_PAGES: dict[str, dict[str, Any]] = {
    "actor": {"actor": "rad07"},
    "action": {"action": "user.login"},
    "actor and action": {"actor": "user:rad07", "action": "study."},
    "a late page, by its link": {"page": 2000, "before": 1},
    "a late page of an actor's, by its link": {"actor": "rad07", "page": 80, "before": 1},
}


@pytest.mark.parametrize("name", list(AUDIT_PAGES))
def test_an_audit_log_page_reads_no_whole_table(
    name: str, sqlite_engine: Engine, factory: sessionmaker[Session]
) -> None:
    """The filter by actor (LIKE '%actor%') read all 500,000 events of a hospital's year, 77 ms a page on
    SQLite and 117 ms on PostgreSQL; a late page counted past every event before it (OFFSET). The filters
    search their index from the value's start; the pager's link seeks the page from its (at, id)."""
    with factory() as session, session.begin():
        session.add(AuditEvent(id=1, actor="user:rad07", action="user.login", target="", details={}))
    arguments = {"page": 1, "action": "", "actor": "", **AUDIT_PAGES[name]}
    with plans(sqlite_engine) as found, factory() as session:
        admin.audit_page_data(session, **arguments)
    assert found and whole_table_reads(found) == []
    lines = [line for lines in found for line in lines]
    filters = [f"INDEX ix_audit_event_{column} ({column}>? AND {column}<?)"
               for column in ("actor", "action") if arguments[column]]
    searched = [line for line in lines if any(index in line for index in filters)]
    if filters:  # by the index of one filter, the other checked on the rows it finds
        assert searched, found
    if len(filters) == 1:  # the page's ids from the index alone: no table row read for each match
        assert all("COVERING INDEX" in line for line in searched), found
    if "before" in arguments and not arguments["actor"]:
        assert any("INDEX ix_audit_event_at (at<?)" in line for line in lines), found


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL of every statement run inside the block."""
    found: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        found.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield found
    finally:
        event.remove(engine, "before_cursor_execute", record)


COUNTED_PAGES: dict[str, Callable[[Session], object]] = {
    "results": lambda session: results.search(session, results.ResultQuery()),
    "results by finding": lambda session: results.search(session, results.ResultQuery(finding="covid")),
    "audit log": lambda session: admin.audit_page_data(session, page=1, action="", actor=""),
    "audit log by action": lambda session: admin.audit_page_data(session, page=1, action="user.", actor=""),
}


@pytest.mark.parametrize("name", list(COUNTED_PAGES))
def test_a_paged_list_counts_at_most_the_cap(
    name: str, sqlite_engine: Engine, factory: sessionmaker[Session]
) -> None:
    """Every page of the results and of the audit log counted every matching row for "page N of M": all
    500,000 events (50-85 ms a page on PostgreSQL), every study with a finding (165 ms). A count reads at
    most COUNT_CAP + 1 rows; no plan shows that, the statement does."""
    with statements(sqlite_engine) as found, factory() as session:
        COUNTED_PAGES[name](session)
    counts = [statement for statement in found if "count(*)" in statement]
    assert counts and all(" LIMIT ?" in statement for statement in counts), counts


def test_the_patient_id_is_searched_by_its_index(sqlite_engine: Engine) -> None:
    with sqlite_engine.connect() as conn:
        lines = [str(row[-1]) for row in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT id FROM patient WHERE patient_id_folded LIKE ? ESCAPE '\\'",
            ("pid0005%",),
        )]
    assert any("ix_patient_patient_id_folded" in line for line in lines), lines


def test_retention_looks_up_deliveries_by_study_not_all_of_them(
    sqlite_engine: Engine, factory: sessionmaker[Session]
) -> None:
    """Retention's hourly run read every delivery ever made (NOT IN) and every analysed image for its
    purged_at (37 ms at 100,000 studies)."""
    with plans(sqlite_engine) as found, factory() as session:
        Retention._candidates(session, datetime(2026, 1, 1, tzinfo=UTC))
    lines = [line for lines in found for line in lines]
    assert not [line for line in lines if line.startswith("SCAN ")], found
    assert any("INDEX ix_instance_state_purged_at (state=? AND purged_at=?)" in line for line in lines), found


class _Scheduler:
    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def add_job(self, *args: Any, **kwargs: Any) -> None:
        self.jobs.append(kwargs)


class _Holder:
    """What Pipeline.unfinished_studies reads of its pipeline."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.session_factory = factory


def _commitment_requests(factory: sessionmaker[Session]) -> None:
    """What the outbox reads to ask a destination for storage commitment, after each batch and sweep."""
    from dicom_node import commitment
    from dicom_node.store.models import utcnow

    with factory() as session:
        commitment.expire(session, 1, utcnow(), timeout_seconds=3600, max_requests=3)
        commitment.take_due(session, 1, utcnow(), timeout_seconds=3600)
        session.rollback()


def _report_awaited(factory: sessionmaker[Session]) -> bool:
    from dicom_node import commitment

    with factory() as session:
        return commitment.awaiting(session, "2.25.1")


TIMERS: dict[str, Callable[[Outbox, sessionmaker[Session]], object]] = {
    "outbox sweep": lambda outbox, _: outbox._destinations_with_work(due_only=True),
    "outbox lease": lambda outbox, _: outbox._lease(1),
    "outbox next retry": lambda outbox, _: outbox._schedule_next(1),
    "storage commitment requests": lambda _, factory: _commitment_requests(factory),
    "storage commitment report awaited (every 0.1 s of a request's wait)":
        lambda _, factory: _report_awaited(factory),
    "pipeline idle sweep":
        lambda _, factory: Pipeline.unfinished_studies(_Holder(factory)),  # type: ignore[arg-type]
    "metrics": lambda _, factory: generate_latest(NodeMetrics(factory).registry),
}


#: The index each lookup of a few rows among many must search by (not a wider one that finds them all)
TIMER_INDEXES = {
    "outbox sweep": "ix_delivery_state_next",
    "outbox lease": "ix_delivery_destination_state_next",
    "outbox next retry": "ix_delivery_destination_state_next",
    "storage commitment requests": "ix_delivery_commitment_at",
    "pipeline idle sweep": "ix_job_state_kind",
}


@pytest.mark.parametrize("name", list(TIMERS))
def test_a_timer_query_reads_no_whole_table(
    name: str, sqlite_engine: Engine, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """The outbox's lease and next-retry lookups read every delivery ever made to the destination (30 ms
    after each batch at 100,000 studies); each metrics scrape read the whole instance table. The sweep
    read every delivered object ever for storage commitment to ask for (searching by state=delivered),
    and the request after each batch every one delivered to the destination."""
    with factory() as session, session.begin():
        destination = aes.add(session, aes.AeSpec("PACS", AeRole.DESTINATION, "10.0.0.5", 104), "test")
        assert destination.id == 1
    settings = Settings(node={"data_dir": tmp_path / "var"})
    outbox = Outbox.from_settings(settings, factory, scheduler=_Scheduler())  # type: ignore[arg-type]
    with plans(sqlite_engine) as found:
        TIMERS[name](outbox, factory)
    assert found and whole_table_reads(found) == []
    lines = [line for lines in found for line in lines]
    assert not [line for line in lines if line.startswith("SEARCH delivery ") and "(destination_pk=? AND "
                "state=?)" in line or line.endswith("ix_delivery_state_next (state=?)")], found
    if name in TIMER_INDEXES:
        assert any(f"INDEX {TIMER_INDEXES[name]} " in line for lines in found for line in lines), found


def test_the_storage_commitment_lookups_search_the_commitment_index(
    sqlite_engine: Engine, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """With the delivery state in them, SQLite searched ix_delivery_state_next (state = delivered: every
    delivered row) for the few objects awaiting a report: 30 ms each sweep at 100,000 studies."""
    with factory() as session, session.begin():
        aes.add(session, aes.AeSpec("PACS", AeRole.DESTINATION, "10.0.0.5", 104, storage_commitment=True),
                "test")
    settings = Settings(node={"data_dir": tmp_path / "var"})
    outbox = Outbox.from_settings(settings, factory, scheduler=_Scheduler())  # type: ignore[arg-type]
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        where = statement.partition("WHERE")[2]
        if statement.lstrip().upper().startswith("SELECT") and "commitment" in where:
            statements.append((statement, parameters))

    event.listen(sqlite_engine, "before_cursor_execute", record)
    try:
        outbox._destinations_with_work(due_only=True)
        outbox.request_commitments(1)
        generate_latest(NodeMetrics(factory).registry)
    finally:
        event.remove(sqlite_engine, "before_cursor_execute", record)
    with sqlite_engine.connect() as conn:
        found = [[str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
                 for sql, params in statements]
    assert len(found) >= 4, found  # the sweep's, expire, take_due, the scrape's count
    for lines in found:
        searched = [line for line in lines if " delivery " in f"{line} "]
        assert searched and all("ix_delivery_commitment_at" in line for line in searched), lines
