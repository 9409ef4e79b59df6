"""Database behaviour of the node on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import logging
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import aes, part10, storage
from dicom_node.errors import (
    ConfigurationError,
    ConflictError,
    DatabaseUnavailableError,
    IdentityConflictError,
    InvalidDatasetError,
)
from dicom_node.ingest import Ingestor
from dicom_node.jobs import StudySettler, build_scheduler
from dicom_node.pipeline import header_from_rows
from dicom_node.statuses import Status
from dicom_node.store import db, header_columns
from dicom_node.store.files import FileStore
from dicom_node.store.models import (
    AeRole,
    AuditEvent,
    Base,
    Instance,
    InstanceState,
    Job,
    JobKind,
    JobState,
    Patient,
    PatientNameWord,
    Series,
    Study,
    StudyState,
    utcnow,
)
from dicom_node.web.uploads import read_upload
from tests.node_datasets import make_cr, to_bytes
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.db


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return db.make_session_factory(engine)


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "instances", fsync=True)


def test_migrations_match_models_and_rerun_cleanly(engine: Engine) -> None:
    db.upgrade(engine)  # second run is a no-op
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        version = conn.execute(text("select version_num from alembic_version")).scalar_one()
    assert diffs == []
    assert version == "0018_name_marks_folded"
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())


def test_ae_registry_is_default_deny_and_audited(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, session.begin():
        aes.add(session, aes.AeSpec("PACS", AeRole.DESTINATION, "10.0.0.5", 104), "cli:test")
        aes.add(session, aes.AeSpec("MODALITY", AeRole.CALLER, "127.0.0.1", reply_to="PACS"), "cli:test")
        aes.add(session, aes.AeSpec("BYNAME", AeRole.CALLER, "localhost"), "cli:test")
        aes.add(session, aes.AeSpec("ANYHOST", AeRole.CALLER), "cli:test")
        aes.add(session, aes.AeSpec("OFF", AeRole.CALLER, enabled=False), "cli:test")
    with sessions() as session:
        assert aes.caller_allowed(session, "MODALITY", "127.0.0.1")
        assert not aes.caller_allowed(session, "MODALITY", "10.1.1.1")
        assert aes.caller_allowed(session, "BYNAME", "127.0.0.1")  # host name resolved
        assert aes.caller_allowed(session, "ANYHOST", "10.1.1.1")
        assert not aes.caller_allowed(session, "OFF", "127.0.0.1")
        assert not aes.caller_allowed(session, "STRANGER", "127.0.0.1")
        assert not aes.caller_allowed(session, "PACS", "10.0.0.5")  # a destination is not a caller
        caller = aes.get(session, "MODALITY", AeRole.CALLER)
        assert caller.reply_to is not None and caller.reply_to.ae_title == "PACS"
    with sessions() as session, session.begin(), pytest.raises(ConflictError):
        aes.add(session, aes.AeSpec("PACS", AeRole.DESTINATION, "10.0.0.6", 104), "cli:test")
    with sessions() as session, session.begin():
        aes.remove(session, aes.get(session, "ANYHOST", AeRole.CALLER).id, "cli:test")
    with sessions() as session:
        assert not aes.caller_allowed(session, "ANYHOST", "10.1.1.1")
        actions = session.scalars(select(AuditEvent.action)).all()
    assert actions.count("ae.add") == 5 and actions.count("ae.remove") == 1


@pytest.mark.parametrize(
    ("title", "host", "error"),
    [
        ("PACS", "bad host name", "host must be"),
        ("PACS", "pacs.example.org:104", "host must be"),
        ("PACS", "http://pacs", "host must be"),
        ("PACS", "-pacs", "host must be"),
        ("PÄCS", "10.0.0.5", "AE title must be"),
        ("A" * 17, "10.0.0.5", "AE title must be"),
    ],
)
def test_an_ae_entry_the_network_cannot_use_is_refused(title: str, host: str, error: str) -> None:
    with pytest.raises(aes.InvalidAeError, match=error):
        aes.AeSpec(title, AeRole.DESTINATION, host, 104).validated()


@pytest.mark.parametrize("host", ["10.0.0.5", "fe80::1", "pacs", "pacs-1.radiology.example.org", "orthanc_1", "pacs."])
def test_addresses_and_host_names_are_accepted(host: str) -> None:
    assert aes.AeSpec("PACS", AeRole.DESTINATION, host, 104).validated().host == host


def test_ingest_records_display_rows_and_is_idempotent(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    ds = make_cr(patient_name="Roe^Richard", patient_id="P77")
    data = to_bytes(ds)
    first = Ingestor(sessions, store).ingest_bytes(data, calling_ae="MODALITY", source="upload")
    again = Ingestor(sessions, store).ingest_bytes(data, calling_ae="MODALITY", source="upload")
    assert not first.duplicate and again.duplicate and again.instance_pk == first.instance_pk
    with sessions() as session:
        instance = session.execute(select(Instance)).scalar_one()
        series = session.get(Series, instance.series_pk)
        assert series is not None
        study = session.get(Study, series.study_pk)
        assert study is not None
        patient = session.get(Patient, study.patient_pk)
        assert patient is not None
        assert (patient.name, patient.patient_id, patient.sex) == ("Roe^Richard", "P77", "F")
        assert (study.accession_number, study.study_date, study.study_description) == (
            "ACC123", "20240102", "CHEST PA")
        assert study.state is StudyState.RECEIVED and study.calling_ae == "MODALITY"
        assert (series.modality, instance.view_position, instance.rows) == ("CR", "PA", 64)
        assert instance.sop_instance_uid == ds.SOPInstanceUID
    stored = store.path(instance.file_path)
    assert stored.read_bytes() == data  # the bytes as sent, not a re-encoding
    import hashlib

    assert instance.sha256 == hashlib.sha256(data).hexdigest() and instance.size_bytes == len(data)


def test_studies_without_a_patient_id_do_not_share_a_patient(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    """Patient ID is Type 2: empty IDs identify no one, so each study keeps its own name and birth date."""
    child = make_cr(patient_name="Child^Anna", patient_id="")
    child.PatientBirthDate = "20200101"
    adult = make_cr(patient_name="Adult^Bert", patient_id="")
    same_id = [make_cr(patient_name="Roe^Richard", patient_id="P77") for _ in range(2)]
    ingestor = Ingestor(sessions, store)
    for ds in (child, adult, *same_id):
        ingestor.ingest_bytes(to_bytes(ds), calling_ae="MODALITY", source="upload")
    with sessions() as session:
        rows = session.execute(
            select(Study.study_instance_uid, Patient.name, Patient.birth_date, Patient.patient_id).join(
                Patient, Study.patient_pk == Patient.id
            )
        ).all()
        assert session.scalar(select(func.count()).select_from(Patient)) == 3
    by_study = {row.study_instance_uid: (row.name, row.birth_date, row.patient_id) for row in rows}
    assert by_study[child.StudyInstanceUID] == ("Child^Anna", "20200101", "")
    assert by_study[adult.StudyInstanceUID] == ("Adult^Bert", "19700101", "")
    assert by_study[same_id[0].StudyInstanceUID] == by_study[same_id[1].StudyInstanceUID]  # one patient


def test_concurrent_instances_of_one_study_make_one_study_row(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    payloads = [to_bytes(make_cr(study_uid=study_uid, series_uid=series_uid, seed=i)) for i in range(24)]
    ingestor = Ingestor(sessions, store)
    errors: list[BaseException] = []

    def worker(chunk: list[bytes]) -> None:
        try:
            for data in chunk:
                ingestor.ingest_bytes(data, calling_ae="MODALITY", source="dimse")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(payloads[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 24
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        assert session.scalar(select(func.count()).select_from(Series)) == 1
        assert session.scalar(select(func.count()).select_from(Patient)) == 1


def test_failed_commit_leaves_no_file_and_maps_to_out_of_resources(
    engine: Engine, sessions: sessionmaker[Session], store: FileStore
) -> None:
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE instance RENAME TO instance_gone"))
    with pytest.raises(DatabaseUnavailableError) as caught:
        Ingestor(sessions, store).ingest_bytes(to_bytes(make_cr()), calling_ae="X", source="upload")
    assert int(caught.value.status) == 0xA700
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_settled_study_becomes_ready_exactly_once(
    engine: Engine, sessions: sessionmaker[Session], store: FileStore
) -> None:
    scheduler = build_scheduler(engine)
    ready: list[int] = []
    fired = threading.Event()

    def on_ready(study_pk: int) -> None:
        ready.append(study_pk)
        fired.set()

    settler = StudySettler(scheduler, sessions, settle_seconds=0.5, callbacks=[on_ready],
                           name=f"test-{generate_uid()}")
    scheduler.start()
    settler.start()
    try:
        ingestor = Ingestor(sessions, store, on_stored=settler.on_stored)
        study_uid = generate_uid()
        results = [ingestor.ingest_bytes(to_bytes(make_cr(study_uid=study_uid, seed=i)), calling_ae="M",
                                         source="dimse") for i in range(3)]
        study_pk = results[0].study_pk
        assert fired.wait(timeout=20), "the settle timer did not fire"
        assert ready == [study_pk]
        settler.settle(study_pk)  # a second firing (e.g. after a restart) changes nothing
        with sessions() as session:
            jobs = session.scalars(select(Job).where(Job.study_pk == study_pk)).all()
            study = session.get(Study, study_pk)
            assert study is not None and study.state is StudyState.READY and study.ready_at is not None
        assert [(j.kind, j.dedupe_key) for j in jobs] == [(JobKind.STUDY_READY, f"study:{study_pk}")]
        assert ready == [study_pk]
    finally:
        settler.stop()
        scheduler.shutdown(wait=True)


def test_a_late_image_reopens_a_finished_study_and_its_job(
    engine: Engine, sessions: sessionmaker[Session], store: FileStore
) -> None:
    """A re-take sent after the study was analysed: the study is RECEIVED again, the settle timer readies
    it and opens its one STUDY_READY job again, and the pipeline is called. Before, the study stayed
    ANALYSED, the timer did nothing, and the image stayed "received" for good. A resent duplicate of an
    image already there reopens nothing."""
    scheduler = build_scheduler(engine)  # not started: the timer is fired by hand
    ready: list[int] = []
    settler = StudySettler(scheduler, sessions, settle_seconds=0, callbacks=[ready.append],
                           name=f"test-{generate_uid()}")
    ingestor = Ingestor(sessions, store)
    study_uid = generate_uid()
    study_pk = ingestor.ingest_bytes(to_bytes(make_cr(study_uid=study_uid, seed=0)), calling_ae="M",
                                     source="dimse").study_pk
    settler.settle(study_pk)
    assert ready == [study_pk]

    def finish() -> None:  # what the pipeline does at the end of a round
        with sessions() as session, session.begin():
            session.scalars(select(Job)).one().state = JobState.DONE
            study = session.get(Study, study_pk)
            assert study is not None
            study.state, study.state_reason = StudyState.ANALYSED, ""

    def state() -> tuple[StudyState, list[JobState]]:
        with sessions() as session:
            study = session.get(Study, study_pk)
            assert study is not None
            return study.state, [job.state for job in session.scalars(select(Job))]

    finish()
    late = to_bytes(make_cr(study_uid=study_uid, seed=1))
    assert ingestor.ingest_bytes(late, calling_ae="M", source="dimse").study_pk == study_pk
    assert state() == (StudyState.RECEIVED, [JobState.DONE])
    settler.settle(study_pk)
    assert ready == [study_pk, study_pk]
    assert state() == (StudyState.READY, [JobState.PENDING])  # the same job row, open again

    finish()
    assert ingestor.ingest_bytes(late, calling_ae="M", source="dimse").duplicate
    assert state() == (StudyState.ANALYSED, [JobState.DONE])


def test_a_finished_study_left_with_an_image_never_analysed_is_reopened_at_start(
    engine: Engine, sessions: sessionmaker[Session], store: FileStore
) -> None:
    """An earlier version finished a study ANALYSED while an image stored during its last round stayed
    RECEIVED, and nothing ever looked at it again. The settler's start reopens such studies (not FAILED
    ones: those wait for an operator) and arms their timers."""
    scheduler = build_scheduler(engine)  # not started: only the decisions are under test
    settler = StudySettler(scheduler, sessions, settle_seconds=60, name=f"test-{generate_uid()}")
    ingestor = Ingestor(sessions, store)
    studies = [ingestor.ingest_bytes(to_bytes(make_cr(seed=i)), calling_ae="M", source="dimse").study_pk
               for i in range(3)]
    with sessions() as session, session.begin():
        for study_pk, state in zip(studies, (StudyState.ANALYSED, StudyState.FAILED, StudyState.ANALYSED),
                                   strict=True):
            study = session.get(Study, study_pk)
            assert study is not None
            study.state = state
        analysed = session.scalars(select(Instance).join(Series).where(Series.study_pk == studies[2])).one()
        analysed.state = InstanceState.ANALYSED
    try:
        settler.start()
        with sessions() as session:
            states = [session.get(Study, pk).state for pk in studies]  # type: ignore[union-attr]
    finally:
        settler.stop()
    assert states == [StudyState.RECEIVED, StudyState.FAILED, StudyState.ANALYSED]
    assert scheduler.get_job(f"settle-study-{studies[0]}") is not None


def test_only_one_node_runs_on_a_database(engine: Engine) -> None:
    """Two nodes on one database fired each other's settle timers on files they did not have."""
    other_engine = db.make_engine(engine.url.render_as_string(hide_password=False))
    first, second = db.NodeLock(engine), db.NodeLock(other_engine)
    try:
        first.acquire()
        with pytest.raises(ConfigurationError, match="another cxr-node is running on this database"):
            second.acquire()
        assert first.held()
        first.release()
        second.acquire()  # the lock goes with the node that held it
        assert second.held() and not first.held()
    finally:
        first.release()
        second.release()
        other_engine.dispose()


def test_postgresql_connections_send_tcp_keepalives(pg_server: PostgresServer) -> None:
    """A connection a firewall or failover cut is found within minutes, the node lock's idle one too."""
    engine = db.make_engine(pg_server.create_database())
    try:
        with engine.connect() as connection:
            parameters = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    finally:
        engine.dispose()
    assert (parameters["keepalives"], parameters["keepalives_idle"]) == ("1", "60")


def test_a_node_lock_whose_session_was_cut_is_taken_again_or_reported_lost(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A PostgreSQL restart, a failover or an idle cut ends the session holding the advisory lock without
    a word, and a second node could start beside the first (found by review); /healthz checks it."""
    url = pg_server.create_database()
    engines = [db.make_engine(url) for _ in range(3)]
    first, second = db.NodeLock(engines[0]), db.NodeLock(engines[1])

    def cut_sessions() -> None:
        with engines[2].connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE pid <> pg_backend_pid() AND datname = current_database()"))

    try:
        first.acquire()
        cut_sessions()
        with caplog.at_level("WARNING", logger="dicom_node.store.db"):
            assert first.held()  # nobody else took it: taken again
        assert "the lock is taken again" in caplog.text
        cut_sessions()
        second.acquire()  # meanwhile another node started
        assert not first.held()
        assert "another cxr-node has taken it" in caplog.text
    finally:
        first.release()
        second.release()
        for engine in engines:
            engine.dispose()


def test_timer_rearms_while_instances_keep_arriving(
    engine: Engine, sessions: sessionmaker[Session], store: FileStore
) -> None:
    scheduler = build_scheduler(engine)  # not started: only the decision is under test
    settler = StudySettler(scheduler, sessions, settle_seconds=60, name=f"test-{generate_uid()}")
    result = Ingestor(sessions, store).ingest_bytes(to_bytes(make_cr()), calling_ae="M", source="dimse")
    settler.settle(result.study_pk)
    with sessions() as session:
        study = session.get(Study, result.study_pk)
        assert study is not None and study.state is StudyState.RECEIVED
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert scheduler.get_job(f"settle-study-{result.study_pk}") is not None


def test_a_resent_instance_restores_a_file_lost_after_commit(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    """Power loss between COMMIT and the directory fsync can lose the name; the sender's retry heals it."""
    data = to_bytes(make_cr())
    first = Ingestor(sessions, store).ingest_bytes(data, calling_ae="M", source="dimse")
    with sessions() as session:
        path = store.path(session.get_one(Instance, first.instance_pk).file_path)
    path.unlink()
    again = Ingestor(sessions, store).ingest_bytes(data, calling_ae="M", source="dimse")
    assert again.duplicate and again.instance_pk == first.instance_pk
    assert path.read_bytes() == data
    assert list(store.root.rglob("*.tmp")) == []


@pytest.mark.parametrize("copy", ["another transfer syntax", "a corrected name"])
def test_a_lost_file_restored_from_another_copy_is_what_its_row_describes(
    sessions: sessionmaker[Session], store: FileStore, caplog: pytest.LogCaptureFixture, copy: str
) -> None:
    """A lost file is restored from whatever copy is sent again: a PACS re-sends an image in the transfer
    syntax it keeps it in, or as it corrected it. The old code renamed that copy into place and left the
    row describing the first one (its SHA-256, size and transfer syntax): `storage check --verify` then
    called the file it had just restored damaged, and the log said the first copy was kept."""
    caplog.set_level(logging.INFO)
    ingestor = Ingestor(sessions, store)
    first = make_cr()
    stored = ingestor.ingest_bytes(to_bytes(first), calling_ae="M", source="dimse")
    with sessions() as session:
        path = store.path(session.get_one(Instance, stored.instance_pk).file_path)
    path.unlink()
    again = dcmread(io.BytesIO(to_bytes(first)))
    if copy == "a corrected name":
        again.PatientName = "Doe^Janet"
    else:
        again.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    again.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    restored = ingestor.ingest_bytes(data, calling_ae="M", source="dimse")
    assert restored.duplicate and restored.instance_pk == stored.instance_pk and not restored.differs
    assert path.read_bytes() == data and restored.size_bytes == len(data)
    with sessions() as session:
        row = session.get_one(Instance, stored.instance_pk)
        assert (row.sha256, row.size_bytes, row.transfer_syntax_uid) == (
            hashlib.sha256(data).hexdigest(), len(data), again.file_meta.TransferSyntaxUID)
        assert storage.check(session, store.root, store.root.parent / "results", verify=True).damaged == 0
    assert "kept the first copy" not in caplog.text
    assert not ingestor.ingest_bytes(data, calling_ae="M", source="dimse").differs  # the same copy again


def _without_transfer_syntax(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file (preamble, "DICM", file meta) whose file meta leaves out the Transfer
    Syntax UID, as some writers do; its data set explicit VR little endian."""
    prefix = part10.part10_prefix(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    start = prefix.index(b"\x02\x00\x10\x00UI")
    end = start + 8 + struct.unpack("<H", prefix[start + 6:start + 8])[0]
    meta = prefix[132 + 12:start] + prefix[end:]  # after the group length element
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return prefix[:132] + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta)) + meta + body.getvalue()


def test_an_upload_whose_file_meta_has_no_transfer_syntax_is_stored_as_a_readable_file(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    """The console takes such a file (pydicom reads it, finding the encoding). The old code took a file
    meta without a Transfer Syntax UID for no file meta at all and wrote its own preamble and file meta in
    front of the whole upload, the upload's own preamble, "DICM" and file meta included: the stored file
    read as a data set with neither Rows nor Pixel Data, after success was answered."""
    ds = make_cr()
    upload = read_upload("chest.dcm", _without_transfer_syntax(ds))
    stored = Ingestor(sessions, store).ingest_bytes(upload.data, calling_ae="M", source="upload")
    with sessions() as session:
        path = store.path(session.get_one(Instance, stored.instance_pk).file_path)
    written = dcmread(path)
    assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert written.SOPInstanceUID == ds.SOPInstanceUID and written.Rows == 64
    assert np.array_equal(written.pixel_array, ds.pixel_array)


@pytest.mark.parametrize("named", ["MediaStorageSOPInstanceUID", "MediaStorageSOPClassUID"])
def test_an_upload_whose_file_meta_names_another_instance_is_stored_under_its_own_identity(
    sessions: sessionmaker[Session], store: FileStore, named: str
) -> None:
    """An anonymiser that gave the data set new UIDs and left the file meta as it was: the file meta
    names the instance it was made from (PS3.10 7.1: it names the data set's own). The old code stored
    such an upload as given, a file that contradicts itself and keeps the original UID; now the node's
    file meta, for the data set's identity and in the transfer syntax the upload gives, precedes the
    data set's bytes."""
    ds = make_cr()
    data = to_bytes(ds)  # pydicom writes the data set's own UIDs into the file meta: changed after
    start = part10.data_set_offset(data)
    named_uid = str(ds.file_meta[named].value).encode()
    other = named_uid[:-1] + (b"8" if named_uid.endswith(b"7") else b"7")  # as long: the lengths hold
    assert data[:start].count(named_uid) == 1
    data = data[:start].replace(named_uid, other) + data[start:]
    upload = read_upload("chest.dcm", data)
    stored = Ingestor(sessions, store).ingest_bytes(upload.data, calling_ae="M", source="upload")
    with sessions() as session:
        path = store.path(session.get_one(Instance, stored.instance_pk).file_path)
    written = dcmread(path)
    assert written.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert written.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert path.read_bytes().endswith(data[part10.data_set_offset(data):])  # the data set as uploaded


def test_a_part10_stream_without_its_preamble_is_stored_with_preamble_and_prefix(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    """A file meta at the first byte (no preamble, no "DICM"), as pydicom reads it: ingest_bytes takes it
    (the console refuses it before, so only the API meets it). The old code put 128 zero bytes in front
    and no "DICM", a file that dcmread, and so the node's pipeline, refuses."""
    ds = make_cr()
    data = to_bytes(ds)[132:]
    stored = Ingestor(sessions, store).ingest_bytes(data, calling_ae="M", source="upload")
    with sessions() as session:
        path = store.path(session.get_one(Instance, stored.instance_pk).file_path)
    assert path.read_bytes() == b"\x00" * 128 + b"DICM" + data
    assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID


def _conflicting(first: Dataset, change: str) -> Dataset:
    """Another image that claims part of ``first``'s identity and contradicts the rest."""
    if change == "series in another study":  # a Series Instance UID reused by another study
        return make_cr(series_uid=first.SeriesInstanceUID)
    if change == "study of another patient":  # the same study under another Patient ID
        study, series = first.StudyInstanceUID, first.SeriesInstanceUID
        return make_cr(study_uid=study, series_uid=series, patient_id="PID-2")
    if change == "instance in another study":
        other = make_cr()  # the same SOP Instance UID, in another study
        other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
        return other
    copy = dcmread(io.BytesIO(to_bytes(first)))  # the same instance, all its UIDs kept
    if change == "copy under another patient":  # a PACS corrected the patient's identity
        copy.PatientID, copy.PatientName = "PID-2", "Roe^Richard"
    elif change == "copy in another series":
        copy.SeriesInstanceUID = generate_uid()
    else:  # a copy as another SOP class
        copy.SOPClassUID = copy.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    return copy


_CONFLICTS = [
    "series in another study", "study of another patient", "instance in another study",
    "copy under another patient", "copy in another series", "copy as another SOP class",
]


@pytest.mark.parametrize("change", _CONFLICTS)
@pytest.mark.parametrize("cached", [True, False], ids=["same-ingestor", "after-restart"])
def test_an_image_whose_identity_contradicts_what_is_stored_is_refused_not_filed_under_it(
    sessions: sessionmaker[Session], store: FileStore, change: str, cached: bool
) -> None:
    """A series belongs to one study, a study to one patient, an instance to one study, series and SOP
    class. The old code filed the second image by its Series UID under the first study (another
    patient's), or answered success for an instance of another study, and for a copy a PACS re-identified
    keeping its UIDs (the conformance statement said it was refused), and kept nothing of it. Now the
    sender is told, with a reason, and nothing is stored."""
    ingestor = Ingestor(sessions, store)
    first = make_cr()
    stored = ingestor.ingest_bytes(to_bytes(first), calling_ae="M", source="dimse")
    if not cached:
        ingestor = Ingestor(sessions, store)
    with pytest.raises(IdentityConflictError) as refused:
        ingestor.ingest_bytes(to_bytes(_conflicting(first, change)), calling_ae="M", source="dimse")
    assert refused.value.status == Status.IDENTITY_CONFLICT and not refused.value.retriable
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        assert session.get_one(Instance, stored.instance_pk).series.study.patient.patient_id == "PID-1"
    assert len(list(store.root.rglob("*.dcm"))) == 1 and list(store.root.rglob("*.tmp")) == []


def test_a_changed_copy_of_a_stored_instance_keeps_the_first_and_says_so(
    sessions: sessionmaker[Session], store: FileStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The same SOP Instance UID with a corrected name: the first copy is what was analysed and stays;
    the old code logged the same INFO line as for an identical re-send, so nobody could tell."""
    caplog.set_level(logging.INFO)
    ingestor = Ingestor(sessions, store)
    first = make_cr()
    data = to_bytes(first)
    stored = ingestor.ingest_bytes(data, calling_ae="M", source="dimse")
    assert not ingestor.ingest_bytes(data, calling_ae="M", source="dimse").differs
    implicit = dcmread(io.BytesIO(data))  # the same image in another transfer syntax: not a change
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    implicit.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=True)
    assert not ingestor.ingest_bytes(buffer.getvalue(), calling_ae="M", source="dimse").differs
    first.PatientName = "Doe^Janet"
    again = ingestor.ingest_bytes(to_bytes(first), calling_ae="M", source="dimse")
    assert again.duplicate and again.differs and again.instance_pk == stored.instance_pk
    with sessions() as session:
        assert store.path(session.get_one(Instance, stored.instance_pk).file_path).read_bytes() == data
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"instance {stored.instance_pk} received again from M with different content: kept the first copy"
    ]


@pytest.mark.parametrize(
    ("first_id", "then", "other"),
    [(("", ""), ("PID-9", ""), ("PID-8", "")), (("PID-1", ""), ("PID-1", "HOSP-A"), ("PID-1", "HOSP-B"))],
    ids=["id-added", "issuer-added"],
)
def test_a_study_takes_the_identity_a_later_image_adds_and_then_holds_to_it(
    sessions: sessionmaker[Session],
    store: FileStore,
    first_id: tuple[str, str],
    then: tuple[str, str],
    other: tuple[str, str],
) -> None:
    """An empty Patient ID (or issuer) contradicts nothing, so the study takes the one a later image
    gives; the review found the study kept its empty one, and accepted PID-8 after PID-9 as well."""
    ingestor = Ingestor(sessions, store)

    def image(identity: tuple[str, str]) -> Dataset:
        ds = make_cr(study_uid=study_uid, patient_id=identity[0])
        if identity[1]:
            ds.IssuerOfPatientID = identity[1]
        if identity == then:  # the later image names the patient and nothing else about them
            ds.PatientName, ds.PatientBirthDate = "", ""
        return ds

    study_uid = generate_uid()
    stored = ingestor.ingest_bytes(to_bytes(image(first_id)), calling_ae="M", source="dimse")
    assert not ingestor.ingest_bytes(to_bytes(image(then)), calling_ae="M", source="dimse").duplicate
    with sessions() as session:
        patient = session.get_one(Study, stored.study_pk).patient
        assert (patient.patient_id, patient.issuer_of_patient_id) == then
        assert (patient.name, patient.birth_date) == ("Doe^Jane", "19700101")  # kept from the first
        assert session.scalar(select(func.count()).select_from(Patient)) == 1  # no orphan row left
        # the name's words for the search moved with the name; the earlier row's went with it
        words = session.execute(select(PatientNameWord.patient_pk, PatientNameWord.word)).all()
        assert sorted(tuple(row) for row in words) == [(patient.id, "doe"), (patient.id, "jane")]
    with pytest.raises(IdentityConflictError):
        ingestor.ingest_bytes(to_bytes(image(other)), calling_ae="M", source="dimse")


def test_the_folded_search_columns_follow_the_values_a_later_image_fills(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    """The patient's name and the study's accession, filled from a later image while empty, bring their
    search columns (name_folded, accession_number_folded) with them, and a third image changes neither."""
    ingestor = Ingestor(sessions, store)
    study_uid = generate_uid()
    first = make_cr(study_uid=study_uid, patient_name="")
    first.AccessionNumber = ""
    stored = ingestor.ingest_bytes(to_bytes(first), calling_ae="M", source="dimse")
    for name, accession in (("MÜLLER^Jörg", "ACC-Ab7"), ("Other^Name", "ACC-9")):
        later = make_cr(study_uid=study_uid, patient_name=name)
        later.AccessionNumber = accession
        ingestor.ingest_bytes(to_bytes(later), calling_ae="M", source="dimse")
    with sessions() as session:
        study = session.get_one(Study, stored.study_pk)
        assert (study.accession_number, study.accession_number_folded) == ("ACC-Ab7", "acc-ab7")
        assert (study.patient.name, study.patient.name_folded) == ("MÜLLER^Jörg", "muller^jorg")
        # the words the search by name finds (migration 0014), there since the name came
        words = session.scalars(
            select(PatientNameWord.word).where(PatientNameWord.patient_pk == study.patient_pk)
        )
        assert sorted(words) == ["jorg", "muller"]


def test_two_images_naming_two_patients_for_a_study_without_one_do_not_both_get_in(
    sessions: sessionmaker[Session], store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent at the same time into a study whose first image had no Patient ID: on PostgreSQL both passed
    the check on the empty row, and the study held images of PID-8 and PID-9 (review). One is refused."""
    from dicom_node.store import received

    ingestor = Ingestor(sessions, store)
    first = make_cr(patient_id="")
    ingestor.ingest_bytes(to_bytes(first), calling_ae="M", source="dimse")
    both_checked = threading.Barrier(2, timeout=3)  # SQLite serialises the two: the first waits in vain
    upsert = received._upsert_patient

    def after_both_checks(conn: Any, ds: Dataset) -> int:
        if ds.PatientID:
            with contextlib.suppress(threading.BrokenBarrierError):
                both_checked.wait()
        return upsert(conn, ds)

    monkeypatch.setattr(received, "_upsert_patient", after_both_checks)
    outcomes: dict[str, str] = {}

    def send(patient_id: str) -> None:
        try:
            ds = make_cr(study_uid=first.StudyInstanceUID, patient_id=patient_id)
            ingestor.ingest_bytes(to_bytes(ds), calling_ae="M", source="dimse")
            outcomes[patient_id] = "stored"
        except IdentityConflictError:
            outcomes[patient_id] = "refused"

    senders = [threading.Thread(target=send, args=(pid,)) for pid in ("PID-8", "PID-9")]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert sorted(outcomes.values()) == ["refused", "stored"], outcomes
    stored = next(pid for pid, outcome in outcomes.items() if outcome == "stored")
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        assert study.patient.patient_id == stored
        ids = {p.patient_id for p in session.scalars(select(Patient))}
        assert ids == {stored}, ids  # the empty-ID row went with the re-filing; the refused one rolled back


def test_header_values_a_database_column_cannot_hold_are_stored_as_far_as_they_go(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    """PostgreSQL text cannot hold a NUL character, nor its integer an Instance Number past 2^31: the
    DataError was answered 0xA700 (out of resources, try again), so the sender retried for ever. The
    instance is stored as sent; the row keeps what its columns can hold."""
    ds = make_cr()
    ds.PatientName = "NUL\x00NAME"
    ds.PatientID = "ID\x00"
    ds.InstanceNumber = "99999999999"
    ds.SeriesNumber = "-99999999999"
    data = to_bytes(ds)
    result = Ingestor(sessions, store).ingest_bytes(data, calling_ae="M", source="dimse")
    with sessions() as session:
        instance = session.get_one(Instance, result.instance_pk)
        assert store.path(instance.file_path).read_bytes() == data
        assert instance.instance_number is None and instance.series.series_number is None
        patient = instance.series.study.patient
        assert (patient.name, patient.patient_id) == ("NULNAME", "ID")


def test_a_resent_instance_does_not_bring_back_a_file_retention_removed(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    data = to_bytes(make_cr())
    first = Ingestor(sessions, store).ingest_bytes(data, calling_ae="M", source="dimse")
    with sessions.begin() as session:  # what dicom_node.retention does
        instance = session.get_one(Instance, first.instance_pk)
        path = store.path(instance.file_path)
        instance.purged_at = utcnow()
    path.unlink()
    again = Ingestor(sessions, store).ingest_bytes(data, calling_ae="M", source="dimse")
    assert again.duplicate and again.instance_pk == first.instance_pk
    assert not path.exists()
    assert list(store.root.rglob("*.dcm")) == [] and list(store.root.rglob("*.tmp")) == []


def test_seeding_from_settings_is_idempotent_and_keeps_an_admins_description_and_disable(
    sessions: sessionmaker[Session],
) -> None:
    dest = aes.AeSpec("PACS", AeRole.DESTINATION, host="10.0.0.5", port=104)
    caller = aes.AeSpec("PACS", AeRole.CALLER, reply_to="PACS")
    with sessions.begin() as session:
        aes.upsert(session, dest, "system")
        aes.upsert(session, caller, "system")
    with sessions.begin() as session:
        row = aes.get(session, "PACS", AeRole.CALLER)
        row.description = "main PACS, set by an admin"
        row.enabled = False  # e.g. the PACS was compromised: a restart must not let it back in
    for _ in range(2):  # every start-up seeds again
        with sessions.begin() as session:
            aes.upsert(session, dest, "system")
            aes.upsert(session, caller, "system")
    with sessions.begin() as session:
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
        assert actions == ["ae.add", "ae.add"]
        assert aes.get(session, "PACS", AeRole.CALLER).description == "main PACS, set by an admin"
        assert not aes.caller_allowed(session, "PACS", "10.0.0.5")
    with sessions.begin() as session:  # a real change in the file is applied and audited
        aes.upsert(session, aes.AeSpec("PACS", AeRole.DESTINATION, host="10.0.0.6", port=104), "system")
        assert session.scalars(select(AuditEvent.action).order_by(AuditEvent.id.desc())).first() == "ae.update"


def test_patient_search_folds_case_beyond_ascii(sessions: sessionmaker[Session]) -> None:
    """DICOM names are often upper case; both databases must fold Ö, Ü and Ş as they fold A-Z."""
    from dicom_node.web.results import ResultQuery, search
    from tests.web.studies import StudySpec, add_study

    turkish = add_study(sessions, StudySpec("ÖZTÜRK^AYŞE", "P-TR", "A-TR"))
    add_study(sessions, StudySpec("SMITH^JOHN", "P-EN", "A-EN"))
    with sessions() as session:
        for words in ("öztürk", "ÖZTÜRK ayşe", "Öztürk"):
            assert [row.study_id for row in search(session, ResultQuery(patient=words)).rows] == [turkish.study]


def test_patient_search_folds_accents_as_an_english_keyboard_types_them(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    """"muller" did not find MÜLLER^JÖRG, nor "soren" Søren, on either database: the search compared
    accented letters as they were. Images received (ingest) and names filled in later both count."""
    from dicom_node.web.results import ResultQuery, search
    from tests.web.studies import StudySpec, add_study

    german = add_study(sessions, StudySpec("MÜLLER^JÖRG", "P-DE", "A-DE"))
    danish = add_study(sessions, StudySpec("Søren^Kierkegaard", "P-DK", "A-DK"))
    irish = add_study(sessions, StudySpec("MULLIGAN^JO", "P-IE", "A-IE"))
    received = make_cr(patient_name="", patient_id="P-FR")  # a name that comes with a later image
    Ingestor(sessions, store).ingest_bytes(to_bytes(received), calling_ae="MODALITY", source="dimse")
    later = make_cr(patient_name="Ãlvarez^Renée", patient_id="P-FR", study_uid=received.StudyInstanceUID)
    later.SpecificCharacterSet = "ISO_IR 192"
    Ingestor(sessions, store).ingest_bytes(to_bytes(later), calling_ae="MODALITY", source="dimse")

    def found(words: str) -> list[int]:
        with sessions() as session:
            return [row.study_id for row in search(session, ResultQuery(patient=words)).rows]

    assert found("muller jorg") == [german.study]
    assert found("Müller") == [german.study]
    assert found("mul*") == [irish.study, german.study]  # wildcards still work, newest first
    assert found("soren") == found("SØREN") == [danish.study]
    with sessions() as session:
        french = session.scalar(select(Study.id).where(Study.study_instance_uid == received.StudyInstanceUID))
    assert found("renee alvarez") == [french]


def test_a_patient_name_of_many_words_is_found_on_either_database(sessions: sessionmaker[Session]) -> None:
    """Each word nested the query one level deeper: at nine words SQLite's parser overflowed its stack
    and the search answered 500 (review). A full Spanish name, and the same words in another order."""
    from dicom_node.web.results import ResultQuery, search
    from tests.web.studies import StudySpec, add_study

    name = "GARCIA LOPEZ DE LA CRUZ^MARIA DE LOS ANGELES DEL CARMEN"
    spanish = add_study(sessions, StudySpec(name, "P-ES", "A-ES"))
    add_study(sessions, StudySpec("GARCIA^MARIA", "P-ES2", "A-ES2"))

    def found(words: str) -> list[int]:
        with sessions() as session:
            return [row.study_id for row in search(session, ResultQuery(patient=words)).rows]

    assert found("maria de los angeles del carmen garcia lopez de la cruz") == [spanish.study]  # 11 words
    assert found("cruz la de lopez garcia carmen del angeles los de maria") == [spanish.study]
    assert found("maria de los angeles del carmen garcia lopez de la cruz perez") == []


def test_the_upgrade_folds_the_names_of_patients_stored_before(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    try:
        db.upgrade(engine, "0009_study_id_and_offset")
        with engine.begin() as conn:
            conn.execute(text("insert into patient (patient_id, issuer_of_patient_id, name, birth_date, sex) "
                              "values ('P1', '', 'MÜLLER^JÖRG', '', ''), ('P2', '', '', '', '')"))
        db.upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("select patient_id, name_folded from patient order by patient_id")).all()
            words = conn.execute(text("select p.patient_id, w.word from patient_name_word w "
                                      "join patient p on p.id = w.patient_pk order by w.word")).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [("P1", "muller^jorg"), ("P2", "")]
    assert [tuple(row) for row in words] == [("P1", "jorg"), ("P1", "muller")]  # 0014 made them


def test_every_header_column_comes_back_as_the_attribute_it_was_read_from(
    sessions: sessionmaker[Session], store: FileStore
) -> None:
    """Retention removes pixel files; results made later rebuild the header from the rows. Each header
    column must be written from its attribute at ingest and restored as that attribute, with values at
    the limits of the columns (a 64-character description, a 5-part name, an INTEGER's maximum)."""
    ds = make_cr(patient_name="Ünal^Zeynep^Ayşe^Dr.^PhD", patient_id="P-HDR")
    ds.SpecificCharacterSet = "ISO_IR 192"
    values = {
        "IssuerOfPatientID": "HOSP-A", "PatientBirthDate": "19500101", "PatientSex": "O",
        "PatientAge": "074Y", "StudyTime": "235959.123456", "StudyID": "S-1",
        "TimezoneOffsetFromUTC": "+0530", "StudyDescription": "X" * 64,
        "ReferringPhysicianName": "Welby^Marcus", "SeriesNumber": 2**31 - 1,
        "SeriesDescription": "Thorax PA", "BodyPartExamined": "CHEST", "InstanceNumber": -7,
        "ViewPosition": "AP", "AccessionNumber": "A" * 16, "StudyDate": "20240229",
    }
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.Laterality = "L"  # the series' laterality stands in for the image's
    Ingestor(sessions, store).ingest_bytes(to_bytes(ds), calling_ae="MODALITY", source="dimse")
    with sessions() as session:
        instance = session.execute(select(Instance)).scalar_one()
        restored = header_from_rows(instance)
    for keyword in (*values, "PatientName", "PatientID", "Modality", "StudyInstanceUID",
                    "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        assert str(restored[keyword].value) == str(ds[keyword].value), keyword
    assert restored.ImageLaterality == "L"


def test_every_column_of_the_received_tables_is_a_header_column_or_the_nodes_own() -> None:
    """A column added to the patient, study, series or instance table is either mapped to its DICOM
    attribute (and so restored with it) or named here as the node's own bookkeeping."""
    own = {
        "id", "patient_pk", "study_pk", "series_pk", "study_instance_uid", "series_instance_uid",
        "sop_instance_uid", "sop_class_uid", "calling_ae", "state", "state_reason", "first_received_at",
        "last_received_at", "ready_at", "analysed_at", "transfer_syntax_uid", "rows", "columns",
        "file_path", "sha256", "size_bytes", "source", "received_at", "purged_at", "name_folded",
        "patient_id_folded", "accession_number_folded",
    }
    mapped = {
        Patient: header_columns.PATIENT_IDENTITY + header_columns.PATIENT_DEMOGRAPHICS,
        Study: header_columns.STUDY, Series: header_columns.SERIES, Instance: header_columns.INSTANCE,
    }
    for model, columns in mapped.items():
        names = {column.name for column in inspect(model).columns}
        header = {column for column, _ in columns}
        assert header <= names, model.__name__
        assert names - header - own == set(), model.__name__


def test_a_header_value_of_several_is_kept_as_its_dicom_text_not_a_python_list() -> None:
    """A backslash in a Patient ID, accession or study date makes pydicom read a MultiValue, and its repr
    was stored: the console listed "['ID1', 'ID2']" and the study date "['202401", a search for the
    patient ID ID1 found nothing, and a result rebuilt from the rows wrote the repr into the SR."""
    from dicom_node.web.templating import person_name

    ds = Dataset()
    ds.PatientID = "ID1\\ID2"
    ds.AccessionNumber = "ACC1\\ACC2"
    ds.StudyDate = "20240101\\20240102"
    ds.StudyDescription = "CHEST\\PA"
    study = header_columns.values(ds, Study, header_columns.STUDY)
    assert study["accession_number"] == "ACC1\\ACC2"
    assert study["study_date"] == "20240101"  # the first date, within the column's 8 characters
    assert study["study_description"] == "CHEST\\PA"
    assert header_columns.values(ds, Patient, header_columns.PATIENT_IDENTITY)["patient_id"] == "ID1\\ID2"
    assert header_columns.text(ds, "PatientID", 64) == "ID1\\ID2"
    ds.PatientName = "Doe^John\\Roe^Jane"
    stored = header_columns.values(ds, Patient, header_columns.PATIENT_DEMOGRAPHICS)["name"]
    assert stored == "Doe^John\\Roe^Jane"
    assert person_name(stored) == "Doe, John; Roe, Jane"  # as the console shows it, and the PDF prints it


def test_a_role_that_may_not_write_a_table_is_unhealthy_and_its_refusals_are_errors(
    pg_server: PostgresServer, store: FileStore, caplog: pytest.LogCaptureFixture
) -> None:
    """After a REVOKE every image got 0xA700 "database unavailable" with a WARNING, and /healthz said
    ok: an operator saw nothing while every PACS queued its images (review). The PACS is still told to
    retry later (the images are not lost), but the health check fails and the log says ERROR."""
    import psycopg

    from dicom_node.metrics import NodeMetrics

    engine, admin, role = _migrated_for_a_role(pg_server, "dml", sequences=True)
    try:
        factory = db.make_session_factory(engine)
        metrics = NodeMetrics(factory)
        assert metrics.health().checks["database"]
        Ingestor(factory, store).ingest_bytes(to_bytes(make_cr()), calling_ae="X", source="dimse")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"REVOKE INSERT ON instance FROM {role}")
        with engine.connect() as connection:
            assert db.missing_privileges(connection) == ["instance"]
        with caplog.at_level(logging.INFO):
            assert not metrics.health().checks["database"]
            with pytest.raises(DatabaseUnavailableError) as caught:
                Ingestor(factory, store).ingest_bytes(to_bytes(make_cr()), calling_ae="X", source="dimse")
        assert int(caught.value.status) == 0xA700  # the Error Comment, as the operator guide quotes it
        assert str(caught.value) == "node database refused the write (InsufficientPrivilege); retry later"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("may not read and write table(s) instance: GRANT" in message for message in errors)
        assert any("SQLSTATE 42501): a configuration error" in message for message in errors)
    finally:
        engine.dispose()


def test_a_role_granted_the_tables_but_not_their_sequences_is_refused_with_the_grant(
    pg_server: PostgresServer,
) -> None:
    """The operator guide's least-privilege set-up (SELECT, INSERT, UPDATE, DELETE on every table) passed
    the start-up check, and `serve` then died in an uncaught ProgrammingError "permission denied for
    sequence remote_ae_id_seq" at its first INSERT: every row id comes from a sequence (review)."""
    import psycopg

    engine, admin, role = _migrated_for_a_role(pg_server, "noseq", sequences=False)
    try:
        with engine.connect() as connection:
            missing = db.missing_privileges(connection)
        assert "sequence remote_ae_id_seq" in missing and "sequence instance_id_seq" in missing
        advice = db.privileges_advice(missing)
        assert advice.startswith("the database role may not use sequence(s) ")
        assert "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO <the node's role>" in advice
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")  # what it says to do
        with engine.connect() as connection:
            assert db.missing_privileges(connection) == []
    finally:
        engine.dispose()


_ROLES = itertools.count(1)


def _migrated_for_a_role(pg_server: PostgresServer, name: str, *, sequences: bool) -> tuple[Engine, str, str]:
    """A new database migrated by its owner, and an engine for a new login role granted its tables (and,
    with ``sequences``, their sequences): that engine, a superuser's connection string, the role's name."""
    import psycopg

    url = pg_server.create_database()
    database = url.rsplit("/", 1)[1]
    owner = db.make_engine(url)
    db.upgrade(owner)
    owner.dispose()
    role = f"cxr_{name}_{next(_ROLES)}"
    admin = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={database}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{name}-9'")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        if sequences:
            conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    engine = db.make_engine(f"postgresql+psycopg://{role}:pw-{name}-9@127.0.0.1:{pg_server.port}/{database}")
    return engine, admin, role


def test_an_sqlite_file_locked_by_another_program_is_out_of_resources(
    tmp_path: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sqlite3 shell or a backup holding the file: pysqlite's "database is locked" came out of the
    node's BEGIN IMMEDIATE unwrapped, and the sender got 0x0110 "unexpected error" instead of 0xA700
    (retry later) (review)."""
    import sqlite3

    monkeypatch.setattr(db, "SQLITE_LOCK_TIMEOUT", 0.5)
    path = tmp_path / "locked.sqlite3"
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(DatabaseUnavailableError) as caught:
            Ingestor(db.make_session_factory(engine), store).ingest_bytes(
                to_bytes(make_cr()), calling_ae="X", source="dimse")
        assert int(caught.value.status) == 0xA700 and "locked by another program" in str(caught.value)
        assert [p for p in store.root.rglob("*") if p.is_file()] == []
    finally:
        other.execute("ROLLBACK")
        other.close()
        engine.dispose()


@pytest.mark.parametrize(("keyword", "vr", "value"), [("Rows", "DS", "64"), ("StudyDate", "US", 2024)])
def test_an_attribute_the_node_uses_encoded_with_another_vr_is_refused(
    sessions: sessionmaker[Session], store: FileStore, keyword: str, vr: str, value: object
) -> None:
    """With an explicit VR a sender can write Rows as DS or Study Date as US: the first was answered
    success and failed its study with a TypeError, the second was copied into the SR, which then failed
    dciodvfy (review). Both are now refused 0xA900 with the attribute named, and nothing kept."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    ds = make_cr()
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds[tag] = DataElement(tag, vr, value)
    with pytest.raises(InvalidDatasetError, match=f"{keyword} is encoded as {vr}") as caught:
        Ingestor(sessions, store).ingest_bytes(to_bytes(ds), calling_ae="X", source="dimse")
    assert int(caught.value.status) == 0xA900
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_a_lock_check_waiting_on_the_database_holds_up_neither_a_stop_nor_the_health_check(
    tmp_path: Path,
) -> None:
    """The node's loop checked its lock itself, and a database that stopped answering held that check,
    and with it SIGTERM and /healthz, for as long as it lasted (review). A check that waits now holds up
    only itself: the others get the last state found, and a stop goes on without it."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'lock.sqlite3'}")
    lock = db.NodeLock(engine)
    lock.acquire()
    waiting = threading.Event()
    done = threading.Event()

    def a_check_that_hangs() -> None:
        with lock._guard:  # what a check does while its SELECT waits on the database
            waiting.set()
            done.wait(30)

    hung = threading.Thread(target=a_check_that_hangs)
    hung.start()
    try:
        assert waiting.wait(5)
        started = time.monotonic()
        assert lock.check() is db.LockState.HELD  # the last state found
        lock.release()
        assert time.monotonic() - started < 8
    finally:
        done.set()
        hung.join()
        engine.dispose()


@pytest.mark.parametrize("second", ["age", "issuer"])
def test_two_images_filling_one_study_at_once_keep_the_first_value_and_both_are_stored(
    sessions: sessionmaker[Session], store: FileStore, monkeypatch: pytest.MonkeyPatch, second: str
) -> None:
    """Values a study's first image left empty are filled from later ones. That fill read the row before
    it updated it: on PostgreSQL a second image's UPDATE, waiting for the first's lock, overwrote the
    age the first had just committed, and after a concurrent re-filing (the first image gave an issuer)
    it named a patient row that was gone, and the second image failed (review)."""
    import dicom_node.ingest as ingest_module

    study_uid = generate_uid()
    first = make_cr(study_uid=study_uid, patient_id="PID-1")  # no Patient Age, no issuer
    Ingestor(sessions, store).ingest_bytes(to_bytes(first), calling_ae="X", source="dimse")
    child = make_cr(study_uid=study_uid, patient_id="PID-1", seed=1)
    child.PatientAge = "008Y"
    if second == "issuer":
        child.IssuerOfPatientID = "HOSP-A"
    later = make_cr(study_uid=study_uid, patient_id="PID-1", seed=2)
    later.PatientAge = "045Y"
    original = ingest_module.insert_rows
    holding = threading.Event()

    def held_open(conn: Any, parsed: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(conn, parsed, *args, **kwargs)
        if parsed.sop_instance_uid == child.SOPInstanceUID:
            holding.set()
            time.sleep(1.5)  # the child's transaction stays open, its rows locked
        return result

    monkeypatch.setattr(ingest_module, "insert_rows", held_open)
    outcomes: dict[str, str] = {}

    def send(name: str, ds: Dataset) -> None:
        try:
            Ingestor(sessions, store).ingest_bytes(to_bytes(ds), calling_ae="X", source="dimse")
            outcomes[name] = "stored"
        except Exception as exc:  # collected and asserted below
            outcomes[name] = type(exc).__name__

    child_thread = threading.Thread(target=send, args=("child", child))
    child_thread.start()
    assert holding.wait(10)
    send("later", later)  # waits for the child's lock on PostgreSQL
    child_thread.join()
    assert outcomes == {"child": "stored", "later": "stored"}
    with sessions() as session:
        assert session.scalars(select(Study.patient_age)).one() == "008Y"  # the first value stays
        assert session.scalar(select(func.count()).select_from(Instance)) == 3


def test_two_admins_disabling_each_other_at_once_leave_one_admin(sessions: sessionmaker[Session]) -> None:
    """Each counted the other as the active admin that would remain, before either had committed: on
    PostgreSQL both went through and no active admin was left to administer the node (review)."""
    from dicom_node import users
    from dicom_node.store.models import User, UserRole

    with sessions() as session, session.begin():
        first, second = (User(username=name, password_hash="-", role=UserRole.ADMIN, active=True)
                         for name in ("first", "second"))
        session.add_all([first, second])
        session.flush()
        ids = first.id, second.id
    outcomes: list[str] = []

    def disable(user_id: int) -> None:
        with sessions() as session:
            try:
                users.set_active(session, user_id, False, "test")
                session.commit()
                outcomes.append("disabled")
            except ConflictError:
                outcomes.append("refused")

    holder = sessions()
    users.set_active(holder, ids[1], False, "test")  # the first admin disables the second, not yet committed
    other = threading.Thread(target=disable, args=(ids[0],))  # the second disables the first meanwhile
    other.start()
    other.join(1.0)
    holder.commit()
    holder.close()
    other.join(30)
    assert outcomes == ["refused"]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(User).where(User.active.is_(True))) == 1
