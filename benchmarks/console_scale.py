"""The console and the timer-driven queries on a hospital's volume: a year and more of chest radiographs.

Fills a database (SQLite file in ``--work``, or PostgreSQL at ``--database-url``) with ``--studies``
studies as the node leaves them — patients, one image each (a tenth with a lateral too), findings, an SR
and a PDF per analysed study delivered to the PACS (a few retrying or dead), the pipeline's jobs and an
audit log of ``--audit`` events — by bulk inserts, not through DICOM. A database that already holds the
rows is reused (``alembic upgrade`` is applied first): fill it once with one version of the node, then
time it with another.

Then times, in process (the console app as ``cxr-node serve`` builds it, logged in as an admin), the
dashboard, the results list and its searches, a study page, the audit log, the AE page, /healthz and
/metrics, and the queries that run on a timer: the outbox's sweep and next-retry lookup, the pipeline's
idle sweep for open jobs and retention's candidates (files older than 90 days already removed, as an
hourly retention would have). Each figure is the median of ``--rounds`` runs after one warm-up.
``--explain`` prints, for each operation, its slowest statement's plan (SQLite: EXPLAIN QUERY PLAN,
PostgreSQL: EXPLAIN ANALYZE).

    python benchmarks/console_scale.py --work /tmp/scale [--studies 100000] [--audit 500000]
        [--database-url postgresql+psycopg://...] [--rounds 5] [--explain]

(at least 10,000 studies and 100,000 audit events: the deep pages it times need them)

Prints a table and, as the last line, a JSON object with the figures (milliseconds); an operation that
failed (an error, not the ``--cap`` deadline) is shown as "failed", listed under "failed", and makes the
exit status 1.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from argon2 import PasswordHasher  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import Engine, event, func, insert, select, text  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from benchmarks import table  # noqa: E402
from classifier.cli import at_least  # noqa: E402
from dicom_node import users  # noqa: E402
from dicom_node.outbox import Outbox  # noqa: E402
from dicom_node.pipeline import Pipeline  # noqa: E402
from dicom_node.retention import Retention  # noqa: E402
from dicom_node.settings import Settings  # noqa: E402
from dicom_node.store.db import make_engine, make_session_factory, session_scope, upgrade  # noqa: E402
from dicom_node.store.folding import name_words  # noqa: E402
from dicom_node.store.models import (  # noqa: E402
    AeRole,
    AuditEvent,
    CommitmentState,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Finding,
    Instance,
    InstanceState,
    Job,
    JobKind,
    JobState,
    Patient,
    PatientNameWord,
    RemoteAe,
    ResultKind,
    ResultObject,
    Series,
    Study,
    StudyState,
    User,
    UserRole,
    folded_name,
)
from dicom_node.web import create_app  # noqa: E402
from dicom_node.web.results import ResultQuery, search  # noqa: E402

DAYS = 400  # the studies' first_received_at spread over this many days up to now
RETENTION_DAYS = 90
ADMIN = ("scaleadmin", "scale-admin-password-1")
SURNAMES = ["MÜLLER", "MULLER", "GARCÍA", "SMITH", "NGUYEN", "O'BRIEN", "ØSTERGÅRD", "DUBOIS", "ROSSI",
            "KOWALSKI", "JOHANSSON", "FERNÁNDEZ", "SCHÄFER", "BROWN", "PETROVIĆ", "YILMAZ", "LEFÈVRE",
            "WANG", "KIM", "HANSEN", "DE LA CRUZ", "ÇELIK", "NOVÁK", "MARTIN", "JONES", "MOREAU"]
GIVEN = ["JÖRG", "ANNA", "JOSÉ", "MARIA", "JOHN", "LÉA", "PETER", "ZOË", "ALI", "SARA", "ÉMILE", "IVAN"]
LABELS = [("normal", 0.75), ("pneumonia", 0.2), ("covid", 0.05)]
CHUNK = 5000


# ---------------------------------------------------------------------------------------------
# Filling the database
# ---------------------------------------------------------------------------------------------


def _insert(engine: Engine, model: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        for start in range(0, len(rows), CHUNK):
            conn.execute(insert(model.__table__), rows[start:start + CHUNK])


def _commitment(asked: bool, awaited: bool, at: datetime) -> dict[str, Any]:
    """A delivery's storage commitment columns: committed, awaiting the PACS's report, or not asked."""
    if not asked:
        return {"commitment": None, "commitment_uid": None, "commitment_at": None, "commitment_requests": 0}
    state = CommitmentState.REQUESTED if awaited else CommitmentState.COMMITTED
    return {"commitment": state, "commitment_uid": f"1.2.826.0.1.3680043.9.7.9.{int(at.timestamp())}",
            "commitment_at": at, "commitment_requests": 1}


MIN_STUDIES = 10_000
MIN_AUDIT = 100_000


def fill(engine: Engine, studies: int, audit_events: int, now: datetime, seed: int = 7) -> dict[str, int]:
    """Insert the rows; returns how many of each."""
    rng = random.Random(seed)
    patients_n = max(1, int(studies * 0.7))  # some patients come back
    # one bulk INSERT takes its columns from the first row: every row names them all (the storage
    # commitment column, added later, was in the first row only and the insert failed; reply_to_id of
    # the third would have been dropped silently)
    _insert(engine, RemoteAe, [
        dict(id=1, ae_title="PACS", role=AeRole.DESTINATION, host="10.0.0.5", port=104, tls=False,
             storage_commitment=True, enabled=True, description="", reply_to_id=None, created_at=now,
             updated_at=now),
        dict(id=2, ae_title="ARCHIVE", role=AeRole.DESTINATION, host="10.0.0.6", port=104, tls=False,
             storage_commitment=False, enabled=True, description="", reply_to_id=None, created_at=now,
             updated_at=now),
        dict(id=3, ae_title="MODALITY", role=AeRole.CALLER, host="10.0.1.1", port=None, tls=False,
             storage_commitment=False, enabled=True, description="", reply_to_id=1, created_at=now,
             updated_at=now),
    ])
    patients = []
    for p in range(1, patients_n + 1):
        name = f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}"
        patients.append(dict(id=p, patient_id=f"PID{p:08d}", issuer_of_patient_id="", name=name,
                             name_folded=folded_name(name), birth_date=f"19{rng.randint(30, 99)}0101",
                             sex=rng.choice("MF")))
    _insert(engine, Patient, patients)
    # the words the search by name finds, as the node's ingest writes them with each patient
    _insert(engine, PatientNameWord, [dict(patient_pk=p["id"], word=word) for p in patients
                                      for word in sorted(name_words(str(p["name_folded"])))])
    del patients
    study_rows, series_rows, instance_rows, finding_rows, job_rows = [], [], [], [], []
    object_rows, delivery_rows, attempt_rows = [], [], []
    instance_id = object_id = delivery_id = attempt_id = finding_id = 0
    span = timedelta(days=DAYS)
    purge_before = now - timedelta(days=RETENTION_DAYS)
    for s in range(1, studies + 1):
        received = now - span * (studies - s) / studies - timedelta(minutes=1)
        recent = studies - s < 20  # the last few still in the pipeline
        roll = s % 100
        if recent:
            state = StudyState.RECEIVED if s % 2 else StudyState.READY
        elif roll == 0:
            state = StudyState.FAILED
        elif roll <= 6:
            state = StudyState.SKIPPED
        else:
            state = StudyState.ANALYSED
        done = state in (StudyState.ANALYSED, StudyState.SKIPPED)
        study_rows.append(dict(
            id=s, study_instance_uid=f"1.2.826.0.1.3680043.9.7.1.{s}", patient_pk=rng.randint(1, patients_n),
            accession_number=f"ACC{s:08d}", study_date=received.strftime("%Y%m%d"), patient_age="054Y",
            study_time=received.strftime("%H%M%S"), study_id=str(s % 10000), timezone_offset="",
            study_description="CHEST PA", referring_physician_name="WHO^DR", calling_ae="MODALITY",
            state=state, state_reason="" if state is not StudyState.SKIPPED else "not a frontal chest image",
            first_received_at=received, last_received_at=received + timedelta(seconds=30),
            ready_at=None if recent and s % 2 else received + timedelta(seconds=60),
            analysed_at=received + timedelta(seconds=70) if state is StudyState.ANALYSED else None,
        ))
        series_rows.append(dict(id=s, series_instance_uid=f"1.2.826.0.1.3680043.9.7.2.{s}", study_pk=s,
                                modality="DX", series_number=1, body_part_examined="CHEST",
                                series_description=""))
        covered = []
        for view in ("PA", "LL") if s % 10 == 0 else ("PA",):
            instance_id += 1
            covered.append(instance_id)
            if done:
                istate = InstanceState.ANALYSED if state is StudyState.ANALYSED else InstanceState.SKIPPED
            else:
                istate = InstanceState.FAILED if state is StudyState.FAILED else InstanceState.RECEIVED
            instance_rows.append(dict(
                id=instance_id, sop_instance_uid=f"1.2.826.0.1.3680043.9.7.3.{instance_id}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", series_pk=s, instance_number=len(covered),
                transfer_syntax_uid="1.2.840.10008.1.2.1", view_position=view, image_laterality="",
                rows=2048, columns=2048, file_path=f"{s % 256:02x}/{instance_id}.dcm", sha256="0" * 64,
                size_bytes=8_000_000, calling_ae="MODALITY", source="dimse", received_at=received,
                state=istate, state_reason="",
                purged_at=received + timedelta(days=RETENTION_DAYS)
                if done and received < purge_before else None,
            ))
            if istate is InstanceState.ANALYSED:
                finding_id += 1
                label = rng.choices([x for x, _ in LABELS], [w for _, w in LABELS])[0]
                confidence = round(rng.uniform(0.5, 0.99), 3)
                finding_rows.append(dict(
                    id=finding_id, instance_pk=instance_id, model_name="cxr", model_version="1",
                    label=label, top_class=label, confidence=confidence,
                    probabilities={label: confidence, "other": round(1 - confidence, 3)},
                    timings_ms={"predict": 80}, heatmap_path=None, novelty=0.2, better_turn=0,
                    negative=False, created_at=received + timedelta(seconds=65),
                ))
        job_rows.append(dict(id=s, kind=JobKind.STUDY_READY, dedupe_key=f"study:{s}", study_pk=s,
                             state=JobState.PENDING if recent else JobState.DONE, attempts=0 if recent else 1,
                             error="", created_at=received, started_at=None, finished_at=None))
        if not done:
            continue
        kinds = [ResultKind.SR, ResultKind.PDF] if state is StudyState.ANALYSED else [ResultKind.PDF]
        for kind in kinds:
            object_id += 1
            made = received + timedelta(seconds=70)
            object_rows.append(dict(
                id=object_id, study_pk=s, kind=kind, model_name="cxr", model_version="1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                sop_instance_uid=f"1.2.826.0.1.3680043.9.7.4.{object_id}",
                series_instance_uid=f"1.2.826.0.1.3680043.9.7.5.{object_id}", file_path=f"r/{object_id}.dcm",
                created_at=made, revision=1, covers=covered,
            ))
            for destination in (1, 2) if s % 10 == 3 else (1,):
                delivery_id += 1
                fate = rng.random()
                if studies - s < 40 and fate < 0.5:
                    dstate, tries = DeliveryState.RETRYING, 3
                elif fate < 0.002:
                    dstate, tries = DeliveryState.DEAD, 8
                else:
                    dstate, tries = DeliveryState.DELIVERED, 1
                delivery_rows.append(dict(
                    id=delivery_id, result_object_pk=object_id, destination_pk=destination, state=dstate,
                    attempts=tries,
                    next_attempt_at=now + timedelta(minutes=5) if dstate is DeliveryState.RETRYING else None,
                    last_status=0 if dstate is DeliveryState.DELIVERED else None,
                    last_error="" if dstate is DeliveryState.DELIVERED else "association rejected",
                    created_at=made, delivered_at=made + timedelta(seconds=2)
                    if dstate is DeliveryState.DELIVERED else None,
                    # the PACS is set to storage commitment: it reported on all but the last few
                    **_commitment(destination == 1 and dstate is DeliveryState.DELIVERED, studies - s < 20,
                                  made + timedelta(seconds=3)),
                ))
                for t in range(tries):
                    attempt_id += 1
                    ok = dstate is DeliveryState.DELIVERED
                    attempt_rows.append(dict(
                        id=attempt_id, delivery_pk=delivery_id, at=made + timedelta(seconds=t),
                        status=0 if ok else None, outcome="delivered" if ok else "failed",
                        error="" if ok else "association rejected"))
    for model, rows in ((Study, study_rows), (Series, series_rows), (Instance, instance_rows),
                        (Finding, finding_rows), (Job, job_rows), (ResultObject, object_rows),
                        (Delivery, delivery_rows), (DeliveryAttempt, attempt_rows)):
        _insert(engine, model, rows)
    counts = {"studies": studies, "patients": patients_n, "instances": instance_id, "findings": finding_id,
              "result_objects": object_id, "deliveries": delivery_id, "delivery_attempts": attempt_id}
    del study_rows, series_rows, instance_rows, finding_rows, job_rows
    del object_rows, delivery_rows, attempt_rows
    actions = [("study.view", 0.7), ("report.download", 0.15), ("user.login", 0.1), ("retention.purge", 0.03),
               ("ae.update", 0.01), ("user.login_failed", 0.01)]
    readers = [f"user:rad{i:02d}" for i in range(40)]
    audit_rows = []
    for a in range(1, audit_events + 1):
        action = rng.choices([x for x, _ in actions], [w for _, w in actions])[0]
        audit_rows.append(dict(id=a, at=now - span * (audit_events - a) / audit_events,
                               actor="system" if action == "retention.purge" else rng.choice(readers),
                               action=action, target=f"study:{rng.randint(1, studies)}", details={}))
        if len(audit_rows) == 100_000:
            _insert(engine, AuditEvent, audit_rows)
            audit_rows = []
    _insert(engine, AuditEvent, audit_rows)
    counts["audit_events"] = audit_events
    if engine.dialect.name == "postgresql":  # explicit ids: move the sequences past them
        with engine.begin() as conn:
            for name in ("remote_ae", "patient", "study", "series", "instance", "finding", "job",
                         "result_object", "delivery", "delivery_attempt", "audit_event"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                                  f"(SELECT coalesce(max(id), 1) FROM {name}))"))
            conn.execute(text("ANALYZE"))  # as autovacuum would have by now
    # SQLite: no ANALYZE, as the node never runs one (its planner works without statistics)
    return counts


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class StatementLog:
    """The statements one operation ran, with their durations, while ``active``."""

    active: bool = False
    entries: list[tuple[float, str, Any]] = field(default_factory=list)

    def attach(self, engine: Engine) -> None:
        @event.listens_for(engine, "before_cursor_execute")
        def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            conn.info["scale_started"] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def after(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            if self.active and not many:
                elapsed = time.perf_counter() - conn.info.pop("scale_started", time.perf_counter())
                self.entries.append((elapsed, statement, parameters))

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.entries.clear()
        self.active = True
        try:
            yield
        finally:
            self.active = False


def explain(engine: Engine, statement: str, parameters: Any) -> str:
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN (ANALYZE, BUFFERS OFF) "
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + statement, parameters).all()
        conn.rollback()
    if engine.dialect.name == "sqlite":
        return "\n".join(f"    {row[-1]}" for row in rows)
    return "\n".join(f"    {row[0]}" for row in rows)


class Deadline:
    """Stops a statement running past ``seconds`` (SQLite: a progress handler; PostgreSQL:
    statement_timeout), so that one quadratic plan does not hold the whole run for an hour."""

    def __init__(self, engine: Engine, seconds: float) -> None:
        self.seconds = seconds
        self.until = float("inf")
        if engine.dialect.name == "sqlite":
            @event.listens_for(engine, "connect")
            def connect(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.set_progress_handler(lambda: int(time.perf_counter() > self.until), 10_000)
        else:
            @event.listens_for(engine, "connect")
            def connect_pg(dbapi_connection: Any, _record: Any) -> None:
                with dbapi_connection.cursor() as cursor:
                    cursor.execute(f"SET statement_timeout = {int(seconds * 1000)}")
                dbapi_connection.commit()

    @contextmanager
    def armed(self) -> Iterator[None]:
        self.until = time.perf_counter() + self.seconds
        try:
            yield
        finally:
            self.until = float("inf")


class _NoScheduler:
    def add_job(self, *args: Any, **kwargs: Any) -> None:
        pass


def operations(client: TestClient, factory: sessionmaker[Session], settings: Settings,
               now: datetime, studies: int) -> dict[str, Callable[[], object]]:
    def get(url: str) -> Callable[[], object]:
        def call() -> object:
            response = client.get(url)
            if response.status_code != 200:
                raise RuntimeError(f"GET {url}: {response.status_code}")
            return response
        return call

    month_ago = (now - timedelta(days=30)).strftime("%Y-%m-%d")
    today = now.strftime("%Y-%m-%d")
    outbox = Outbox.from_settings(settings, factory, scheduler=_NoScheduler())
    idle = SimpleNamespace(session_factory=factory)
    cutoff = now - timedelta(days=RETENTION_DAYS)

    def lease_query() -> object:  # the SELECT of Outbox._lease, without taking the lease
        with session_scope(factory) as session:
            return list(session.scalars(
                select(Delivery).where(
                    Delivery.destination_pk == 1,
                    Delivery.state.in_((DeliveryState.PENDING, DeliveryState.RETRYING)),
                    Delivery.next_attempt_at <= func.now(),
                ).order_by(Delivery.id).limit(20)
            ))

    def retention() -> object:
        with session_scope(factory) as session:
            return Retention._candidates(session, cutoff)

    late = max(1, studies // 25 - 10)
    with session_scope(factory) as session:  # the last event of page 1999: page 2000's "Older" link
        before = session.scalar(select(AuditEvent.id).order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
                                .offset(1999 * 50 - 1).limit(1))
        # the last study of the page before: the late page's "Older" link (and its first: "Newer")
        newest_first = select(Study.id).order_by(Study.first_received_at.desc(), Study.id.desc())
        study_before = session.scalar(newest_first.offset((late - 1) * 25 - 1).limit(1))
        study_after = session.scalar(newest_first.offset(late * 25).limit(1))
        covid_before = search(session, ResultQuery(finding="covid", page=19)).rows[-1].study_id
    return {
        "GET / (dashboard)": get("/"),
        "GET /api/dashboard": get("/api/dashboard"),
        "results page 1": get("/results"),
        f"results page {late}": get(f"/results?page={late}"),
        f"results page {late}, by its Older link": get(f"/results?page={late}&before={study_before}"),
        f"results page {late}, by its Newer link": get(f"/results?page={late}&after={study_after}"),
        "search name 'muller'": get("/results?patient=muller"),
        "search name 'Müller Jörg'": get("/results?patient=M%C3%BCller+J%C3%B6rg"),
        "search patient ID": get("/results?patient=PID0000421"),
        "search accession": get(f"/results?accession=ACC{studies // 2:08d}"),
        "search date range (30 d)": get(f"/results?date_from={month_ago}&date_to={today}"),
        "search finding covid": get("/results?finding=covid"),
        "search finding covid, page 20": get("/results?finding=covid&page=20"),
        "search finding covid, page 20, by its link":
            get(f"/results?finding=covid&page=20&before={covid_before}"),
        "study page": get(f"/results/{studies // 2}"),
        "audit page 1": get("/admin/audit"),
        "audit page 2000": get("/admin/audit?page=2000"),
        "audit page 2000, by its link": get(f"/admin/audit?page=2000&before={before}"),
        "audit search action": get("/admin/audit?action=user.login"),
        "audit search actor": get("/admin/audit?actor=rad07"),
        "admin AE page": get("/admin/aes"),
        "GET /healthz": get("/healthz"),
        "GET /metrics": get("/metrics"),
        "outbox sweep (due destinations)": lambda: outbox._destinations_with_work(due_only=True),
        "outbox start (destinations w/ work)": lambda: outbox._destinations_with_work(),
        "outbox lease select": lease_query,
        "outbox next retry": lambda: outbox._schedule_next(1),
        # what a batch's end and each sweep check of a destination set to storage commitment (none due)
        "outbox storage commitment check": lambda: outbox.request_commitments(1),
        "pipeline idle sweep (open jobs)":
            lambda: Pipeline.unfinished_studies(idle),  # type: ignore[arg-type]
        "retention candidates": retention,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True,
                        help="directory for the SQLite file and node data")
    parser.add_argument("--database-url", default=None, help="PostgreSQL URL (default: SQLite in --work)")
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--audit", type=int, default=500_000)
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--explain", action="store_true",
                        help="print each operation's slowest statement's plan")
    parser.add_argument("--only", default="", help="time only operations whose name contains this")
    parser.add_argument("--cap", type=float, default=30.0,
                        help="seconds after which an operation is stopped and shown as '> cap'")
    args = parser.parse_args(argv)
    if args.studies < MIN_STUDIES or args.audit < MIN_AUDIT:
        # page 19 of the COVID-19 results (5 % of the studies) and page 2000 of the audit log are timed
        parser.error(f"--studies at least {MIN_STUDIES} and --audit at least {MIN_AUDIT}: the deep pages "
                     "timed need that many rows")
    args.work.mkdir(parents=True, exist_ok=True)
    groups: dict[str, Any] = {  # as data: the groups' types are their models
        "node": {"data_dir": args.work / "var", "name": "Scale"}, "web": {"port": 0},
        "database": {"url": args.database_url} if args.database_url else {},
    }
    settings = Settings(**groups)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    now = datetime.now(UTC)
    with session_scope(factory) as session:
        existing = int(session.scalar(select(func.count()).select_from(Study)) or 0)
    if existing == 0:
        started = time.perf_counter()
        counts = fill(engine, args.studies, args.audit, now)
        print(f"filled in {time.perf_counter() - started:.0f} s: {counts}", file=sys.stderr)
    else:
        args.studies = existing
    users._HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    with session_scope(factory) as session:
        admins = select(func.count()).select_from(User).where(User.username == ADMIN[0])
        if session.scalar(admins) == 0:
            users.create_user(session, ADMIN[0], ADMIN[1], UserRole.ADMIN, "benchmark")
    engine.dispose()  # the connections made from now on get the deadline
    deadline = Deadline(engine, args.cap)
    log = StatementLog()
    log.attach(engine)
    results: dict[str, float] = {}
    failed: list[str] = []
    rows: list[list[object]] = []
    with TestClient(create_app(settings, factory), follow_redirects=False) as client:
        response = client.post("/api/session", json={"username": ADMIN[0], "password": ADMIN[1]})
        if response.status_code not in (200, 201):
            raise SystemExit(f"login failed: {response.status_code} {response.text}")
        ops = operations(client, factory, settings, now, args.studies)
        for name, call in ops.items():
            if args.only and args.only not in name:
                continue
            started = time.perf_counter()
            try:
                with deadline.armed():
                    call()  # warm-up
            except Exception as exc:  # stopped by the deadline, or failed: no figure
                results[name] = float("inf")
                if time.perf_counter() - started < args.cap:  # an error, not the deadline: not "slow"
                    print(f"--- {name}: failed ({type(exc).__name__}: {exc})", file=sys.stderr)
                    failed.append(name)
                    rows.append([name, "failed", None, None, None])
                else:
                    print(f"--- {name}: stopped ({type(exc).__name__})", file=sys.stderr)
                    rows.append([name, f"> {args.cap * 1000:.0f}", None, None, None])
                continue
            times = []
            for _ in range(args.rounds):
                with log.recording():
                    started = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - started) * 1000)
            results[name] = round(statistics.median(times), 1)
            slowest = max(log.entries, key=lambda e: e[0], default=None)
            rows.append([name, results[name], min(times), len(log.entries),
                         None if slowest is None else slowest[0] * 1000])
            if args.explain and slowest is not None:
                print(f"--- {name}: {slowest[0] * 1000:.1f} ms\n  {' '.join(slowest[1].split())[:600]}")
                print(explain(engine, slowest[1], slowest[2]))
    print(table.render([("operation", ""), ("median ms", ".1f"), ("min ms", ".1f"), ("statements", ""),
                        ("slowest stmt ms", ".1f")], rows))
    print(table.json_line({"database": engine.dialect.name, "studies": args.studies, "rounds": args.rounds,
                      "cap_ms": args.cap * 1000,
                      "ms": {k: (None if v == float("inf") else v) for k, v in results.items()},
                      "failed": failed}))
    engine.dispose()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
