"""Outbox: one association per destination and batch, back-off, dead letters and `cxr-node resend`."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import scu
from dicom_node.cli import main as cli_main
from dicom_node.outbox import REFUSED, REMAKING, Outbox, backoff_seconds, requeue
from dicom_node.pipeline import dataset_bytes
from dicom_node.settings import OutboxSettings, Settings
from dicom_node.storage import REMAKE_REASON
from dicom_node.store.db import session_scope
from dicom_node.store.files import FileStore
from dicom_node.store.models import (
    AeRole,
    AuditEvent,
    Delivery,
    DeliveryState,
    RemoteAe,
    ResultKind,
    ResultObject,
    Study,
    StudyState,
    utcnow,
)
from tests import peers
from tests.node_process import wait_until
from tests.pipeline.conftest import add_study, write_transaction_open
from tests.pipeline.storepeer import StorePeer

pytestmark = pytest.mark.network


@pytest.fixture
def peer() -> Iterator[StorePeer]:
    server = StorePeer().start()
    yield server
    server.stop()


def _result_file(results: Path, relative: str, sop_uid: str, study_uid: str) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = b"\x00\x01\x02\x03"
    store = FileStore(results, fsync=False)
    store.write(relative, [dataset_bytes(ds)])
    store.close()


def _deliveries(db: sessionmaker[Session], results: Path, port: int, count: int) -> tuple[int, list[int]]:
    """A destination at ``port`` and ``count`` result objects of one study, each with a delivery."""
    with session_scope(db) as session:
        destination = RemoteAe(ae_title="PACS", role=AeRole.DESTINATION, host="127.0.0.1", port=port)
        session.add(destination)
        study = add_study(session, results.parent / "instances", state=StudyState.ANALYSED)
        session.flush()
        ids = []
        for kind in [ResultKind.SR, ResultKind.PDF, ResultKind.HEATMAP_SC][:count]:
            uid = generate_uid()
            relative = f"{study.id}/{kind.value}-{uid}.dcm"  # named as dicom_node.pipeline names them
            _result_file(results, relative, uid, study.study_instance_uid)
            obj = ResultObject(study_pk=study.id, kind=kind, model_name="m", model_version="1",
                               sop_class_uid=SecondaryCaptureImageStorage, sop_instance_uid=uid,
                               series_instance_uid=generate_uid(), file_path=relative)
            session.add(obj)
            session.flush()
            delivery = Delivery(result_object_pk=obj.id, destination_pk=destination.id, next_attempt_at=utcnow())
            session.add(delivery)
            session.flush()
            ids.append(delivery.id)
        return destination.id, ids


def _many_deliveries(db: sessionmaker[Session], results: Path, port: int, count: int) -> int:
    """A destination at ``port`` and ``count`` SR revisions of one study, each due for it; returns the
    destination's id."""
    with session_scope(db) as session:
        destination = RemoteAe(ae_title="PACS", role=AeRole.DESTINATION, host="127.0.0.1", port=port)
        session.add(destination)
        study = add_study(session, results.parent / "instances", state=StudyState.ANALYSED)
        session.flush()
        for revision in range(1, count + 1):
            uid = generate_uid()
            relative = f"{study.id}/sr-{uid}.dcm"
            _result_file(results, relative, uid, study.study_instance_uid)
            obj = ResultObject(study_pk=study.id, kind=ResultKind.SR, model_name="m", model_version="1",
                               sop_class_uid=SecondaryCaptureImageStorage, sop_instance_uid=uid,
                               series_instance_uid=generate_uid(), file_path=relative, revision=revision)
            session.add(obj)
            session.flush()
            session.add(Delivery(result_object_pk=obj.id, destination_pk=destination.id,
                                 next_attempt_at=utcnow()))
        return destination.id


def _outbox(db: sessionmaker[Session], results: Path, max_attempts: int = 3) -> Outbox:
    # A minute's back-off: "not due yet" must hold however slowly the test runs between two attempts.
    settings = OutboxSettings(max_attempts=max_attempts, backoff_initial_seconds=60, backoff_max_seconds=600)
    return Outbox(db, results, calling_aet="CXRNODE", settings=settings)


def _make_due(db: sessionmaker[Session]) -> None:
    with session_scope(db) as session:
        for delivery in session.scalars(select(Delivery)):
            if delivery.next_attempt_at is not None:
                delivery.next_attempt_at = utcnow() - timedelta(seconds=1)


def test_an_association_lost_mid_batch_keeps_what_the_peer_stored(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """The objects answered before the abort are delivered; only the rest are retried."""
    results = tmp_path / "results"
    aborting = StorePeer(abort_after=1).start()
    try:
        destination_pk, ids = _deliveries(db, results, aborting.port, 3)
        report = _outbox(db, results).deliver_due(destination_pk)
    finally:
        aborting.stop()
    assert report.delivered == ids[:1] and sorted(report.failed) == sorted(ids[1:])
    with session_scope(db) as session:
        states = {d.id: d.state for d in session.scalars(select(Delivery))}
    assert states == {ids[0]: DeliveryState.DELIVERED, ids[1]: DeliveryState.RETRYING,
                      ids[2]: DeliveryState.RETRYING}


def test_a_tls_destination_is_reached_while_the_nodes_own_listener_stays_plain(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """A destination marked TLS got nothing unless dicom.tls.enabled was on, which also puts the node's own
    listener on TLS: every delivery failed ("dicom.tls is not configured") until it was DEAD, while the
    C-ECHO test of the same destination succeeded."""
    from dicom_node import aes
    from dicom_node.ingest import Ingestor
    from dicom_node.scp import build_scp
    from dicom_node.settings import DicomSettings, Settings, TlsSettings
    from dicom_node.store.db import make_engine, make_session_factory, upgrade
    from dicom_node.store.models import AeRole
    from dicom_node.tls import server_context
    from tests import peers

    cert, key = peers.self_signed_certificate(tmp_path)
    pacs_engine = make_engine(f"sqlite:///{tmp_path / 'pacs.sqlite3'}")
    upgrade(pacs_engine)
    pacs_db = make_session_factory(pacs_engine)
    with session_scope(pacs_db) as session:
        aes.add(session, aes.AeSpec("CXRNODE", AeRole.CALLER, "127.0.0.1"), "test")
    tls_only = server_context(TlsSettings(enabled=True, certificate=cert, private_key=key,
                                          require_client_certificate=False))
    pacs = build_scp(DicomSettings(ae_title="TLSPACS", port=0, bind_address="127.0.0.1"),
                     Ingestor(pacs_db, FileStore(tmp_path / "pacs")), pacs_db, ssl_context=tls_only)
    pacs.start()
    try:
        results = tmp_path / "results"
        destination_pk, ids = _deliveries(db, results, pacs.port, 2)
        with session_scope(db) as session:
            destination = session.get_one(RemoteAe, destination_pk)
            destination.ae_title, destination.tls = "TLSPACS", True
        settings = Settings(node={"data_dir": tmp_path}, dicom={"tls": {"ca_certificates": cert}})
        assert not settings.dicom.tls.enabled  # the node's own listener speaks plain DICOM
        report = Outbox.from_settings(settings, db).deliver_due(destination_pk)
    finally:
        pacs.stop()
        pacs_engine.dispose()
    assert sorted(report.delivered) == sorted(ids)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_seconds(n, 5, 60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_due_objects_go_in_one_association_and_are_never_sent_twice(
    db: sessionmaker[Session], tmp_path: Path, peer: StorePeer
) -> None:
    results = tmp_path / "results"
    destination_pk, ids = _deliveries(db, results, peer.port, 3)
    outbox = _outbox(db, results)

    report = outbox.deliver_due(destination_pk)
    assert sorted(report.delivered) == sorted(ids)
    assert peer.associations == 1
    assert len(peer.received) == 3

    assert outbox.deliver_due(destination_pk).delivered == []  # nothing due any more
    assert len(peer.received) == 3
    with session_scope(db) as session:
        for delivery in session.scalars(select(Delivery)):
            assert delivery.state is DeliveryState.DELIVERED
            assert [a.outcome for a in delivery.attempt_history] == ["delivered"]


@pytest.mark.parametrize("max_pdu", [0, 16384])
def test_the_outbox_offers_the_configured_maximum_pdu(
    db: sessionmaker[Session], tmp_path: Path, peer: StorePeer, max_pdu: int
) -> None:
    """The SCU offered 131072 bytes whatever dicom.max_pdu said, while the statement says dicom.max_pdu
    is what the node offers (review)."""
    results = tmp_path / "results"
    destination_pk, ids = _deliveries(db, results, peer.port, 1)
    settings = Settings(node={"data_dir": tmp_path}, dicom={"max_pdu": max_pdu})
    outbox = Outbox.from_settings(settings, db)
    outbox.results_dir = results
    assert outbox.deliver_due(destination_pk).delivered == ids
    assert peer.offered_max_pdus == [max_pdu]


def test_the_outbox_waits_for_a_response_as_long_as_dicom_dimse_timeout_says(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """dicom.dimse_timeout ("DIMSE messages are awaited for ...", conformance statement §2.1) was read by
    nothing that waits for a DIMSE message: the listener never does, and the outbox waited a fixed 60 s for
    each C-STORE response whatever the setting said (review)."""
    results = tmp_path / "results"
    slow = StorePeer(delay=4.0).start()
    try:
        destination_pk, ids = _deliveries(db, results, slow.port, 1)
        settings = Settings(node={"data_dir": tmp_path}, dicom={"dimse_timeout": 1.0})
        outbox = Outbox.from_settings(settings, db)
        outbox.results_dir = results
        started = time.monotonic()
        report = outbox.deliver_due(destination_pk)
        waited = time.monotonic() - started
    finally:
        slow.stop()
    assert report.delivered == [] and report.failed == ids
    assert waited < 3.5, f"waited {waited:.1f} s for a response dicom.dimse_timeout gives 1 s"
    with session_scope(db) as session:
        [delivery] = session.scalars(select(Delivery))
        assert delivery.state is DeliveryState.RETRYING and "no C-STORE response" in delivery.last_error


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unreadable_result_file_fails_its_own_delivery_only(
    db: sessionmaker[Session], tmp_path: Path, peer: StorePeer, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The old code read every file of a batch before associating: one damaged object failed all 64,
    batch after batch, until its batch-mates (other studies' results among them) went DEAD with it.
    The reason names the object by its kind, not by its file, whose name holds its SOP Instance UID (an
    identifier of the patient's study on the PACS, kept out of logs)."""
    caplog.set_level(logging.INFO)
    results = tmp_path / "results"
    destination_pk, ids = _deliveries(db, results, peer.port, 3)
    with session_scope(db) as session:
        damaged = session.get(Delivery, ids[1])
        assert damaged is not None
        path = results / damaged.result_object.file_path
        # cut short, pydicom raises its own types (BytesLengthException, struct.error), not InvalidDicomError
        path.write_bytes(b"not DICOM at all" if damage == "garbage" else path.read_bytes()[:141])
    report = _outbox(db, results).deliver_due(destination_pk)
    assert sorted(report.delivered) == [ids[0], ids[2]] and report.failed == [ids[1]]
    assert len(peer.received) == 2
    with session_scope(db) as session:
        damaged = session.get(Delivery, ids[1])
        assert damaged is not None and damaged.state is DeliveryState.RETRYING
        assert damaged.last_error.startswith("result file damaged (not a readable DICOM file: ")
        uid = damaged.result_object.sop_instance_uid
        assert uid not in damaged.last_error and uid not in caplog.text


def test_a_result_file_missing_has_its_study_made_again_and_waits_for_it_instead_of_going_dead(
    db: sessionmaker[Session], tmp_path: Path, peer: StorePeer
) -> None:
    """A restore drill: the database restored from a later time than results/. The delivery failed with
    "result file missing" and went on to DEAD; nothing made the object again. Now its study is reopened
    for the pipeline to make its results again (a new revision supersedes the delivery), and the
    delivery waits for that, retrying, past max_attempts. Once the study is done and the object was not
    replaced, it fails for good, saying so; a failed study is not reopened by every retry."""
    results = tmp_path / "results"
    destination_pk, [delivery_pk] = _deliveries(db, results, peer.port, 1)
    with session_scope(db) as session:
        delivery = session.get_one(Delivery, delivery_pk)
        (results / delivery.result_object.file_path).unlink()
        study_pk = delivery.result_object.study_pk
    outbox = _outbox(db, results, max_attempts=1)

    def attempt() -> tuple[DeliveryState, str, StudyState, str]:
        _make_due(db)
        outbox.deliver_due(destination_pk)
        with session_scope(db) as session:
            delivery = session.get_one(Delivery, delivery_pk)
            study = session.get_one(Study, study_pk)
            return delivery.state, delivery.last_error, study.state, study.state_reason

    state, error, study_state, reason = attempt()
    assert (state, study_state) == (DeliveryState.RETRYING, StudyState.RECEIVED)  # was DEAD, at once
    remaking = f"result file missing: {REMAKING}"
    assert error == remaking and reason == REMAKE_REASON
    assert attempt()[:3] == (DeliveryState.RETRYING, remaking, StudyState.RECEIVED)  # the round is coming
    with session_scope(db) as session:  # the round ended without replacing this object
        session.get_one(Study, study_pk).state = StudyState.ANALYSED
    state, error, study_state, _ = attempt()
    assert (state, study_state) == (DeliveryState.DEAD, StudyState.ANALYSED)
    assert error == "result file missing, and making the study's results again did not replace it"
    with session_scope(db) as session:
        session.get_one(Study, study_pk).state = StudyState.FAILED
    assert requeue_all(db) == [delivery_pk]
    state, error, study_state, _ = attempt()
    assert (state, study_state) == (DeliveryState.DEAD, StudyState.FAILED)
    assert error == "result file missing, and the study's processing failed: see the study's reason"
    assert peer.received == []


def requeue_all(db: sessionmaker[Session]) -> list[int]:
    with session_scope(db) as session:
        return [d.id for d in requeue(session, None, "test")]


def test_a_warning_status_counts_as_delivered_and_is_recorded(
    db: sessionmaker[Session], tmp_path: Path, peer: StorePeer
) -> None:
    peer.status = 0xB000
    results = tmp_path / "results"
    destination_pk, _ = _deliveries(db, results, peer.port, 1)
    _outbox(db, results).deliver_due(destination_pk)
    with session_scope(db) as session:
        delivery = session.scalars(select(Delivery)).one()
        assert delivery.state is DeliveryState.DELIVERED
        assert delivery.last_status == 0xB000
        assert [(a.outcome, a.status) for a in delivery.attempt_history] == [("warning", 0xB000)]


@pytest.mark.interop
def test_a_rejected_association_is_recorded_with_the_peers_reason(
    db: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The destination's AE title is wrong (DCMTK dcmqrscp answers to PACS2 only): the delivery's reason and
    the WARNING said "association rejected by PACS at …" and nothing of why."""
    results = tmp_path / "results"
    with peers.dcmqrscp(tmp_path, "PACS2") as port:
        destination_pk, _ = _deliveries(db, results, port, 1)
        with caplog.at_level("INFO", logger="dicom_node.outbox"):
            _outbox(db, results).deliver_due(destination_pk)
    reason = (f"association rejected by PACS at 127.0.0.1:{port} "
              "(permanent; service user: called AE title not recognised)")
    with session_scope(db) as session:
        assert session.scalars(select(Delivery)).one().last_error == reason
    [summary] = [r for r in caplog.records if r.name == "dicom_node.outbox"]
    assert summary.levelname == "WARNING" and reason in summary.getMessage()


@pytest.mark.interop
def test_a_peer_that_accepts_no_context_is_recorded_with_what_it_refused(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """storescp whose profile lacks the result's SOP class: the reason was "no association with PACS …
    (aborted or timed out)", which sent the operator looking at the network."""
    results = tmp_path / "results"
    outbox = _outbox(db, results, max_attempts=300)
    with peers.storescp_accepting(tmp_path, "PACS", "CTImageStorage") as port:
        destination_pk, ids = _deliveries(db, results, port, 1)
        reports = []
        for _ in range(3):  # outbox.refused_attempts: then DEAD, not retried for three days
            reports.append(outbox.deliver_due(destination_pk))
            _make_due(db)
    reason = (
        f"failure status 0x0122 (not sent: PACS at 127.0.0.1:{port} accepted none of the proposed "
        "presentation contexts (Secondary Capture Image Storage in Explicit VR Little Endian or Implicit VR "
        "Little Endian: SOP class not supported))"
    )
    assert [report.dead for report in reports] == [[], [], ids]
    with session_scope(db) as session:
        delivery = session.scalars(select(Delivery)).one()
        assert [a.error for a in delivery.attempt_history] == [reason] * 3
        assert (delivery.state, delivery.last_error) == (DeliveryState.DEAD, f"{reason}; {REFUSED}")


@pytest.mark.usefixtures("restore_logging")
def test_a_refused_object_is_recorded_with_the_peers_error_comment_and_send_names_its_file(
    db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PACS answering 0xA700 says why in its Error Comment: the node recorded only "failure status
    0xA700", and `cxr-node send` printed "object 1: status 0xA700" without saying which file."""
    full = StorePeer(status=0xA700, comment='Storage "archive1"\nfull').start()
    results = tmp_path / "results"
    try:
        destination_pk, _ = _deliveries(db, results, full.port, 1)
        with caplog.at_level("INFO", logger="dicom_node.outbox"):
            _outbox(db, results).deliver_due(destination_pk)
        reason = "failure status 0xA700 (Error Comment: \"Storage 'archive1' full\")"
        with session_scope(db) as session:
            delivery = session.scalars(select(Delivery)).one()
            assert (delivery.last_error, delivery.last_status) == (reason, 0xA700)
            assert [a.error for a in delivery.attempt_history] == [reason]
        [summary] = [r for r in caplog.records if r.name == "dicom_node.outbox"]
        assert summary.levelname == "WARNING"
        assert f"1 failed (failure status 0xA700 ({scu.COMMENT_WITHHELD}))" in summary.getMessage()

        config = tmp_path / "node.yaml"
        config.write_text(f"node:\n  data_dir: {tmp_path}\ndicom:\n  ae_title: CXRNODE\n")
        monkeypatch.setenv("CXR_NODE__DATABASE__URL", str(db.kw["bind"].url))
        [sent] = (results / path for path in _result_paths(db))
        capsys.readouterr()
        assert cli_main(["send", "--config", str(config), str(sent), "--to", "PACS"]) == 1
        assert f"{sent}: {reason}\n" in capsys.readouterr().out
    finally:
        full.stop()


@pytest.mark.usefixtures("restore_logging")
def test_an_object_the_peer_refuses_as_such_is_dead_after_three_such_answers_in_a_row(
    db: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """0xA900 (Data Set does not match SOP Class) was retried like 0xA700 (out of resources): 300 times
    over three days, each answered the same, and the delivery was DEAD only then. A passing refusal in
    between starts the count again."""
    peer = StorePeer(status=0xA900, comment="Missing Content Template Sequence").start()
    results = tmp_path / "results"
    outbox = _outbox(db, results, max_attempts=300)
    try:
        destination_pk, ids = _deliveries(db, results, peer.port, 1)
        states = []
        with caplog.at_level("WARNING", logger="dicom_node.outbox"):
            for status in (0xA900, 0xA700, 0xA900, 0xA900, 0xA900):
                peer.status = status
                outbox.deliver_due(destination_pk)
                _make_due(db)
                with session_scope(db) as session:
                    states.append(session.scalars(select(Delivery.state)).one())
        assert states == [DeliveryState.RETRYING] * 4 + [DeliveryState.DEAD]
        refusal = "failure status 0xA900 (Error Comment: \"Missing Content Template Sequence\")"
        with session_scope(db) as session:
            delivery = session.scalars(select(Delivery)).one()
            assert (delivery.attempts, delivery.last_status) == (5, 0xA900)
            assert delivery.last_error == f"{refusal}; {REFUSED}"
            assert delivery.next_attempt_at is None
        assert any(r.getMessage() == f"delivery {ids[0]} is DEAD after 5 attempts (the peer refused the "
                   "object itself, each time)" for r in caplog.records)

        # The operator resends once the PACS is being mended; the first answer still refuses. That is one
        # refusal since the resend, not a fourth in a row: the count began again with the attempts.
        with session_scope(db) as session:
            requeue(session, ids, "user:admin")
        assert outbox.deliver_due(destination_pk).dead == []
        with session_scope(db) as session:
            assert session.scalars(select(Delivery.state)).one() is DeliveryState.RETRYING
        peer.status = 0x0000  # the PACS's configuration was changed
        _make_due(db)
        assert outbox.deliver_due(destination_pk).delivered == ids
    finally:
        peer.stop()


def _result_paths(db: sessionmaker[Session]) -> list[str]:
    with session_scope(db) as session:
        return list(session.scalars(select(ResultObject.file_path)))


def test_a_pacs_error_comment_quoting_the_patient_stays_out_of_the_log(
    db: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The Error Comment is the PACS's own text, and a PACS may quote the patient in it ("Patient ID 4711
    exists as DOE^JOHN"). The delivery's WARNING line carried it verbatim into the log, which must hold no
    patient data; the delivery's reason (database, console) keeps it for the operator."""
    comment = "Patient ID 4711 exists as DOE^JOHN"
    pacs = StorePeer(status=0xA700, comment=comment).start()
    results = tmp_path / "results"
    try:
        destination_pk, _ = _deliveries(db, results, pacs.port, 1)
        with caplog.at_level("DEBUG"):
            _outbox(db, results).deliver_due(destination_pk)
    finally:
        pacs.stop()
    with session_scope(db) as session:
        assert session.scalars(select(Delivery.last_error)).one() == (
            f'failure status 0xA700 (Error Comment: "{comment}")')
    assert any("failure status 0xA700" in r.getMessage() for r in caplog.records)
    assert not [r.getMessage() for r in caplog.records if "4711" in r.getMessage() or "DOE" in r.getMessage()]


def test_an_error_comment_is_one_printable_line_of_at_most_64_characters() -> None:
    from dicom_node.scu import error_comment

    response = pydicom.Dataset()
    response.ErrorComment = "a\tb\x07c " + "x" * 100
    assert error_comment(response) == "a b?c " + "x" * 58 + "…"
    assert error_comment(pydicom.Dataset()) == ""


@pytest.mark.usefixtures("restore_logging")
def test_failures_back_off_then_die_and_resend_delivers(
    db: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = StorePeer(status=0xA700)  # refuses: out of resources
    results = tmp_path / "results"
    destination_pk, ids = _deliveries(db, results, down.port, 2)
    outbox = _outbox(db, results, max_attempts=2)

    down.start()
    try:
        with caplog.at_level("INFO", logger="dicom_node.outbox"):
            first = outbox.deliver_due(destination_pk)
    finally:
        down.stop()
    assert sorted(first.failed) == sorted(ids)
    # one warning line names the destination and says why, without the operator reading pynetdicom's log
    [summary] = [r for r in caplog.records if "failed" in r.getMessage()]
    assert summary.levelname == "WARNING"
    assert summary.getMessage().endswith("0 delivered, 2 failed (failure status 0xA700), 0 dead")
    with session_scope(db) as session:
        for delivery in session.scalars(select(Delivery)):
            assert delivery.state is DeliveryState.RETRYING
            assert delivery.last_status == 0xA700
            attempt = delivery.attempt_history[-1]
            assert delivery.next_attempt_at is not None
            assert (delivery.next_attempt_at - attempt.at).total_seconds() == 60  # backoff_initial_seconds
    assert outbox.deliver_due(destination_pk).failed == []  # not due yet: no attempt

    _make_due(db)
    second = outbox.deliver_due(destination_pk)  # nobody listening now: connection refused
    assert sorted(second.dead) == sorted(ids)
    with session_scope(db) as session:
        for delivery in session.scalars(select(Delivery)):
            assert delivery.state is DeliveryState.DEAD
            assert [a.outcome for a in delivery.attempt_history] == ["failed", "error"]
            assert delivery.next_attempt_at is None
            # the network's own words: pynetdicom logs them only at its level, now INFO (shown at DEBUG)
            assert delivery.last_error.endswith("(Connection refused)"), delivery.last_error

    # The operator fixes the destination, then resends from the CLI.
    fixed = StorePeer(port=down.port).start()
    try:
        config = tmp_path / "node.yaml"
        config.write_text(f"node:\n  data_dir: {tmp_path}\ndicom:\n  ae_title: CXRNODE\n")
        monkeypatch.setenv("CXR_NODE__DATABASE__URL", str(db.kw["bind"].url))
        assert cli_main(["resend", "--config", str(config), str(ids[0])]) == 0
        assert len(fixed.received) == 1
        assert cli_main(["resend", "--config", str(config), "--all-dead"]) == 0
        assert len(fixed.received) == 2
        assert fixed.associations == 2
        assert cli_main(["resend", "--config", str(config)]) == 0  # lists: none dead any more
    finally:
        fixed.stop()
    with session_scope(db) as session:
        assert {d.state for d in session.scalars(select(Delivery))} == {DeliveryState.DELIVERED}
        audited = [e.target for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "delivery.resend"))]
        assert sorted(audited) == sorted(f"delivery:{pk}" for pk in ids)


@pytest.mark.parametrize("source", ["defaults", "production example"])
def test_results_are_retried_through_a_weekend_outage_of_the_pacs(source: str) -> None:
    """With 8 attempts from 5 s doubling, a delivery was DEAD 11 minutes after the PACS went down, and
    a routine maintenance window needed someone to re-send by hand (review)."""
    if source == "defaults":
        settings = OutboxSettings()
    else:
        example = Path(__file__).parents[2] / "config" / "production.example.yaml"
        settings = OutboxSettings(**yaml.safe_load(example.read_text())["outbox"])
    window = sum(
        backoff_seconds(attempt, settings.backoff_initial_seconds, settings.backoff_max_seconds)
        for attempt in range(1, settings.max_attempts)
    )
    assert 60 * 3600 <= window <= 5 * 24 * 3600


def test_a_disabled_destination_with_due_deliveries_is_not_woken_again_and_again(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """An admin disables a destination (a PACS being replaced) while results are due for it. Each round
    found nothing to lease and armed the wake-up for the earliest due row, which was due already: the
    wake-up fired at once, and again, about 70 rounds a second for as long as it stayed disabled, each a
    write to the scheduler's job store. Once enabled again, the sweep sends the deliveries."""
    from dicom_node.jobs import build_scheduler

    results = tmp_path / "results"
    with session_scope(db) as session:
        destination = RemoteAe(ae_title="PACS", role=AeRole.DESTINATION, host="127.0.0.1", port=104,
                               enabled=False)
        session.add(destination)
        session.flush()
        destination_pk = destination.id
    scheduler = build_scheduler(db.kw["bind"])
    scheduler.start()
    outbox = Outbox(db, results, calling_aet="CXRNODE", settings=OutboxSettings(), scheduler=scheduler)
    rounds: list[int] = []
    deliver_due = outbox.deliver_due

    def counted(pk: int, *, ask_commitment: bool = True) -> object:
        rounds.append(pk)
        return deliver_due(pk, ask_commitment=ask_commitment)

    outbox.deliver_due = counted  # type: ignore[assignment,method-assign]
    try:
        with session_scope(db) as session:
            study = add_study(session, tmp_path / "instances", state=StudyState.ANALYSED)
            session.flush()
            obj = ResultObject(study_pk=study.id, kind=ResultKind.SR, model_name="m", model_version="1",
                               sop_class_uid=SecondaryCaptureImageStorage, sop_instance_uid=generate_uid(),
                               series_instance_uid=generate_uid(), file_path="sr.dcm")
            session.add(obj)
            session.flush()
            session.add(Delivery(result_object_pk=obj.id, destination_pk=destination_pk,
                                 state=DeliveryState.RETRYING, attempts=1,
                                 next_attempt_at=utcnow() - timedelta(seconds=5)))
        outbox.start()
        time.sleep(2.0)
        assert len(rounds) <= 2, f"{len(rounds)} rounds in 2 s"
        assert scheduler.get_job(f"outbox:destination:{destination_pk}") is None
        assert outbox._destinations_with_work(due_only=True) == [destination_pk]  # the sweep's, once enabled
    finally:
        outbox.stop()
        scheduler.shutdown(wait=True)


def test_the_backoff_stays_at_its_cap_however_many_attempts_were_made() -> None:
    """5 s doubled 1,024 times is more than a float (the settings' type) holds: OverflowError."""
    assert [backoff_seconds(n, 5.0, 900.0) for n in (1, 9, 1025, 1100, 10**6)] == [5, 900, 900, 900, 900]


def test_a_delivery_retried_more_than_a_thousand_times_is_recorded_with_its_batch_mates(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """A delivery waiting for its study's results to be made again retries however many attempts, and
    outbox.max_attempts has no upper bound. Past 1,024 attempts its back-off overflowed while the batch
    was recorded: the whole record was rolled back, so the object its batch-mate had just delivered stayed
    leased, and was sent again every two minutes, never recorded."""
    results = tmp_path / "results"
    peer = StorePeer(abort_after=1).start()  # the first object is stored, then the association is lost
    try:
        destination_pk, ids = _deliveries(db, results, peer.port, 2)
        with session_scope(db) as session:
            session.get_one(Delivery, ids[1]).attempts = 1100
        report = _outbox(db, results, max_attempts=5000).deliver_due(destination_pk)
    finally:
        peer.stop()
    assert (report.delivered, report.failed) == ([ids[0]], [ids[1]])
    with session_scope(db) as session:
        first, second = (session.get_one(Delivery, pk) for pk in ids)
        assert first.state is DeliveryState.DELIVERED
        assert (second.state, second.attempts) == (DeliveryState.RETRYING, 1101)
        assert second.next_attempt_at is not None
        assert second.next_attempt_at - second.attempt_history[-1].at == timedelta(seconds=600)


@contextlib.contextmanager
def _stalling_in_front_of(port: int) -> Iterator[int]:
    """A PACS that hangs in the middle of an answer: relays to ``port``, passes the peer's answer to the
    association request whole, then the first 3 bytes of its next PDU (the C-STORE response), and then
    nothing, the connection held open. Yields its own port."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = [server]

    def exactly(sock: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def upward(client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                upstream.sendall(chunk)

    def serve() -> None:
        with contextlib.suppress(OSError):
            client, _ = server.accept()
            upstream = socket.create_connection(("127.0.0.1", port))
            held.extend([client, upstream])
            threading.Thread(target=upward, args=(client, upstream), daemon=True).start()
            header = exactly(upstream, 6)
            client.sendall(header + exactly(upstream, struct.unpack(">L", header[2:])[0]))
            client.sendall(exactly(upstream, 6)[:3])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        for sock in held:
            sock.close()
        thread.join(timeout=5)


def test_a_pacs_hanging_in_the_middle_of_an_answer_fails_the_batch_within_the_time_out(
    tmp_path: Path, peer: StorePeer
) -> None:
    """pynetdicom takes the connect time-out off the socket once connected: a PACS that stopped in the
    middle of a PDU (hung, or its link lost without a FIN) left the read waiting for ever. The DIMSE
    time-out's abort then waited for that read, the batch never ended, and the destination's outbox
    held its lock: nothing more went to that PACS until the node was restarted."""
    from dicom_node.errors import AssociationError

    results = tmp_path / "results"
    relative = "1/sr.dcm"
    _result_file(results, relative, generate_uid(), generate_uid())
    outcome: list[object] = []

    def send(port: int) -> None:
        try:
            outcome.append(scu.send([results / relative], "127.0.0.1", port, "PACS", calling_aet="CXRNODE",
                                    timeout=2.0))
        except AssociationError as exc:
            outcome.append(exc)

    with _stalling_in_front_of(peer.port) as port:
        sending = threading.Thread(target=send, args=(port,), daemon=True)
        sending.start()
        sending.join(timeout=30)
        assert not sending.is_alive(), "still waiting for the PACS after 30 s"
    [error] = outcome
    assert isinstance(error, AssociationError) and error.statuses == []
    assert peer.received  # the PACS had the object; its answer did not come


def test_a_batch_slower_than_its_lease_is_not_taken_and_sent_again_by_another_process(
    db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is leased for 120 s, but 64 objects to a slow archive (2 s each) take longer, up to 64
    DIMSE time-outs. Once the lease ran out, `cxr-node resend` (another process: its own outbox) leased
    the objects still being sent and sent them a second time, and both processes recorded an attempt.
    The lease is now renewed while the batch is being sent."""
    from dicom_node import outbox as outbox_module

    monkeypatch.setattr(outbox_module, "LEASE_SECONDS", 2.0)
    slow = StorePeer(delay=1.5).start()
    results = tmp_path / "results"
    try:
        destination_pk, ids = _deliveries(db, results, slow.port, 3)
        first = threading.Thread(target=_outbox(db, results).deliver_due, args=(destination_pk,))
        first.start()
        # the node's batch is sending (its rows leased), and a whole lease has passed since: unrenewed, it
        # would be over; a fixed 3 s from the thread's start failed when the batch began late (slow CI)
        assert wait_until(lambda: slow.received, 30), "the batch never reached the PACS"
        time.sleep(outbox_module.LEASE_SECONDS)  # the lease's own length is what must pass
        second = _outbox(db, results).deliver_due(destination_pk)  # the resend command's outbox
        first.join(timeout=30)
    finally:
        slow.stop()
    assert second.delivered == [] and second.failed == []
    assert sorted(slow.received) == sorted(set(slow.received)) and len(slow.received) == 3
    with session_scope(db) as session:
        assert [d.attempts for d in session.scalars(select(Delivery).order_by(Delivery.id))] == [1, 1, 1]


def test_a_node_starting_while_cxr_node_resend_sends_does_not_send_the_same_objects(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """`cxr-node resend` (another process) leases the deliveries it sends. A node (re)started meanwhile
    made every PENDING delivery due at once, the ones leased by the running command too, and sent them a
    second time: each object twice, two attempts recorded."""
    slow = StorePeer(delay=1.0).start()
    results = tmp_path / "results"
    node = _outbox(db, results)
    try:
        destination_pk, ids = _deliveries(db, results, slow.port, 3)
        resend = threading.Thread(target=_outbox(db, results).deliver_due, args=(destination_pk,))
        resend.start()
        assert wait_until(lambda: slow.received, 30), "the batch never reached the PACS"
        node.start()  # without a scheduler it delivers what is due itself
        resend.join(timeout=30)
    finally:
        node.stop()
        slow.stop()
    assert sorted(slow.received) == sorted(set(slow.received)) and len(slow.received) == 3
    with session_scope(db) as session:
        assert [d.attempts for d in session.scalars(select(Delivery).order_by(Delivery.id))] == [1, 1, 1]


def test_the_sweep_for_work_does_not_wait_behind_a_writer(db: sessionmaker[Session], tmp_path: Path) -> None:
    """The outbox looks for due work every 30 s. The look only reads, but it took SQLite's write lock: it
    queued behind every image being stored, and while another program held the file (a backup, the sqlite3
    shell) it failed after 30 s, that round's deliveries and commitment requests left for the next."""
    results = tmp_path / "results"
    destination_pk, _ = _deliveries(db, results, 104, 1)
    outbox = _outbox(db, results)
    with write_transaction_open(db):
        started = time.monotonic()
        assert outbox._destinations_with_work() == [destination_pk]
        assert time.monotonic() - started < 10


def _move_to(db: sessionmaker[Session], destination_pk: int, port: int) -> None:
    """The admin corrects the destination's port (aes.update, as the console and the API do)."""
    from dicom_node import aes

    with session_scope(db) as session:
        spec = aes._spec_of(session.get_one(RemoteAe, destination_pk))
        aes.update(session, destination_pk, aes.AeSpec(spec.ae_title, spec.role, spec.host, port), "admin")


def test_deliveries_waiting_for_a_mistyped_destination_go_as_soon_as_the_admin_corrects_it(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """The admin typed the PACS's port wrong; its results back off (up to 15 minutes by default, 30 in the
    production example). Correcting the port in the console (or dicom.destinations, then a restart) left
    them waiting for that back-off, and a resend was refused: "it is already being tried"."""
    results = tmp_path / "results"
    pacs = StorePeer().start()
    try:
        destination_pk, ids = _deliveries(db, results, peers.free_port(), 2)  # nobody listens there
        outbox = _outbox(db, results)
        assert sorted(outbox.deliver_due(destination_pk).failed) == sorted(ids)
        _move_to(db, destination_pk, pacs.port)
        report = outbox.deliver_due(destination_pk)
    finally:
        pacs.stop()
    assert sorted(report.delivered) == sorted(ids)
    assert len(pacs.received) == 2


def test_deliveries_held_back_behind_a_failed_batch_go_as_soon_as_the_admin_corrects_the_destination(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """A round stops at a batch of which nothing went, and the destination's other deliveries, never
    tried, wait for that batch's back-off. Correcting the destination must make them due as well as the
    retrying ones."""
    from dicom_node.outbox import BATCH_LIMIT

    results = tmp_path / "results"
    pacs = StorePeer().start()
    try:
        destination_pk = _many_deliveries(db, results, peers.free_port(), BATCH_LIMIT + 2)
        outbox = _outbox(db, results)
        assert len(outbox.deliver_due(destination_pk).failed) == BATCH_LIMIT
        _move_to(db, destination_pk, pacs.port)
        report = outbox.deliver_due(destination_pk)
    finally:
        pacs.stop()
    assert len(report.delivered) == BATCH_LIMIT + 2


def test_a_stop_waits_for_the_batch_being_sent_not_for_every_due_delivery(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """After a PACS outage hundreds of deliveries are due. A stop waited until the outbox had sent them
    all, batch after batch (minutes to a slow PACS), past systemd's 60 s: SIGKILL then cut a batch short,
    its answers never recorded, and the restarted node sent those objects a second time."""
    from dicom_node.jobs import build_scheduler
    from dicom_node.outbox import BATCH_LIMIT

    results = tmp_path / "results"
    slow = StorePeer(delay=0.05).start()
    _many_deliveries(db, results, slow.port, 3 * BATCH_LIMIT)
    scheduler = build_scheduler(db.kw["bind"])
    scheduler.start()
    outbox = Outbox(db, results, calling_aet="CXRNODE", settings=OutboxSettings(), scheduler=scheduler)
    try:
        outbox.start()
        wait_until(lambda: len(slow.received) > 0, timeout=30)
        outbox.stop()
        sent = len(slow.received)
    finally:
        outbox.stop()
        scheduler.shutdown(wait=True)
        slow.stop()
    assert sent <= BATCH_LIMIT, f"{sent} objects sent after the stop began"
    with session_scope(db) as session:
        delivered = session.scalars(select(Delivery).where(Delivery.state == DeliveryState.DELIVERED)).all()
    assert len(delivered) == sent  # what went is recorded: a restart does not send it again


def test_each_batchs_log_line_counts_that_batch_only(
    db: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A round sends batch after batch; each batch's line counted everything the round had done so far:
    "64 delivered, 128 failed" for a batch of 64 of which none went, and an admin adding the lines up
    found twice the deliveries there were."""
    from dicom_node.outbox import BATCH_LIMIT

    results = tmp_path / "results"
    pacs = StorePeer(abort_after=BATCH_LIMIT).start()  # takes one batch, then aborts every association
    destination_pk = _many_deliveries(db, results, pacs.port, 3 * BATCH_LIMIT)
    try:
        with caplog.at_level("INFO", logger="dicom_node.outbox"):
            report = _outbox(db, results).deliver_due(destination_pk)
    finally:
        pacs.stop()
    assert (len(report.delivered), len(report.failed)) == (BATCH_LIMIT, BATCH_LIMIT)  # the round's
    lines = [r.getMessage().split(": ", 1)[1].split(" (")[0] for r in caplog.records
             if r.getMessage().startswith(f"destination {destination_pk} (PACS): ")]
    assert lines == [f"{BATCH_LIMIT} delivered", f"0 delivered, {BATCH_LIMIT} failed"], lines


def test_a_round_stops_at_the_first_batch_that_finds_the_pacs_gone(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """The PACS went away after the round's first batch. The round went on trying every remaining batch,
    one association each, as the check for "the peer is down" counted what the whole round had delivered;
    and a round that did stop left the rest due, so the wake-up armed after it ran the next batch at
    once. The rest now waits for the failed batch's back-off."""
    from dicom_node.outbox import BATCH_LIMIT

    results = tmp_path / "results"
    pacs = StorePeer(abort_after=BATCH_LIMIT).start()  # takes one batch, then aborts every association
    destination_pk = _many_deliveries(db, results, pacs.port, 4 * BATCH_LIMIT)
    outbox = _outbox(db, results)
    try:
        report = outbox.deliver_due(destination_pk)
    finally:
        pacs.stop()
    assert pacs.associations == 2
    assert (len(report.delivered), len(report.failed)) == (BATCH_LIMIT, BATCH_LIMIT)
    assert outbox._destinations_with_work(due_only=True) == []  # nothing due before the back-off
    with session_scope(db) as session:
        attempts = [d.attempts for d in session.scalars(select(Delivery).order_by(Delivery.id))]
    assert attempts == [1] * (2 * BATCH_LIMIT) + [0] * (2 * BATCH_LIMIT)
