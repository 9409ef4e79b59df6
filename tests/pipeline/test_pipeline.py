"""The pipeline in process with its real parts: ingest, the classifier (a real model), reporting, the outbox
sending to a Storage SCP. Crashes are simulated by an exception that nothing in the pipeline catches
(like ``kill -9``, it leaves whatever was committed), then a fresh pipeline resumes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage, generate_uid
from pypdf import PdfReader
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import pipeline as pipeline_module
from dicom_node import storage
from dicom_node.eligibility import UNKNOWN_AGE, AgePolicy
from dicom_node.errors import IdentityConflictError, StorageError
from dicom_node.ingest import IngestResult, ingest_bytes
from dicom_node.jobs import open_study_ready_job
from dicom_node.outbox import REMAKING, Outbox
from dicom_node.pipeline import (
    ImageClassifier,
    Pipeline,
    PipelineConfig,
    dataset_bytes,
    load_classifier,
    node_identity,
    retry_delay,
    waits_for_a_resource,
)
from dicom_node.settings import OutboxSettings, Settings
from dicom_node.store.db import make_engine, make_session_factory, session_scope, upgrade
from dicom_node.store.files import FileStore, file_sha256
from dicom_node.store.models import (
    AeRole,
    Delivery,
    DeliveryState,
    Finding,
    Instance,
    InstanceState,
    Job,
    JobState,
    RemoteAe,
    ResultKind,
    ResultObject,
    Series,
    Study,
    StudyState,
    utcnow,
)
from reporting import codes
from reporting.pdf import AGE_UNKNOWN_HEADLINE, analysis_time
from tests import peers
from tests.node_datasets import with_corrupt_rle_pixels
from tests.pipeline.model import tiny_model
from tests.pipeline.storepeer import StorePeer

pytestmark = pytest.mark.slow

SENTINEL = "SENTINEL^PHI"


class Crash(BaseException):
    """Stands for kill -9: no handler in the pipeline catches it."""


def crash(*_args: Any, **_kwargs: Any) -> None:
    """Patched over a pipeline step to stop the process right there."""
    raise Crash


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """SQLite only here: these tests are about the pipeline; the queries are also run on PostgreSQL in
    the outbox, retention and metrics tests."""
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def classifier(model_path: Path) -> ImageClassifier:
    from classifier.inference import Classifier

    return Classifier.load(model_path)


@pytest.fixture
def peer() -> Iterator[StorePeer]:
    server = StorePeer(ae_title="PACS").start()
    yield server
    server.stop()


@pytest.fixture
def world(db: sessionmaker[Session], tmp_path: Path, peer: StorePeer, classifier: ImageClassifier) -> dict[str, Any]:
    with session_scope(db) as session:
        pacs = RemoteAe(ae_title="PACS", role=AeRole.DESTINATION, host="127.0.0.1", port=peer.port)
        session.add(pacs)
        session.flush()
        session.add(RemoteAe(ae_title="ORTHANC", role=AeRole.CALLER, host="127.0.0.1", reply_to_id=pacs.id))
    settings = Settings(node={"data_dir": tmp_path, "name": "Test node"})
    config = PipelineConfig(
        storage_dir=tmp_path / "instances",
        results_dir=tmp_path / "results",
        identity=node_identity(settings),
        heatmap=False,
        fsync=False,
    )
    outbox = Outbox(db, config.results_dir, calling_aet="CXRNODE", settings=OutboxSettings())
    return {"db": db, "config": config, "outbox": outbox, "classifier": classifier,
            "store": FileStore(config.storage_dir, fsync=False)}


def test_a_result_file_a_crash_left_half_written_is_removed_at_start(world: dict[str, Any]) -> None:
    """A kill -9 between writing a result's temporary and renaming it left the temporary (an SR or PDF
    that names the patient) in results/.incoming for good; only the received images' were removed (review)."""
    pipeline = make_pipeline(world)
    stale = world["config"].results_dir / ".incoming" / ".incoming-killed.tmp"
    stale.write_bytes(SENTINEL.encode())
    pipeline.start()
    try:
        assert not stale.exists()
    finally:
        pipeline.stop()


def test_the_checksum_of_a_result_written_before_the_disk_filled_is_recorded(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """The SR written, then the disk full at the PDF: the study waits for room and is finished later, but
    the SR's checksum was thrown away with the failed round and never recorded, so a later damage to the
    SR went out to the PACS unnoticed (review)."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    pipeline = make_pipeline(world)
    write = pipeline.results.write
    calls = 0

    def disk_full_at_the_second(relative: str, chunks: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise StorageError("cannot write to the file store (No space left on device)")
        return write(relative, chunks)

    pipeline.results.write = disk_full_at_the_second  # type: ignore[method-assign]
    pipeline.process([study_pk])
    with session_scope(world["db"]) as session:
        assert session.get_one(Study, study_pk).state is StudyState.READY  # waits for room
    pipeline.results.write = write  # type: ignore[method-assign]
    pipeline.process([study_pk])
    with session_scope(world["db"]) as session:
        assert session.get_one(Study, study_pk).state is StudyState.ANALYSED
        rows = list(session.scalars(select(ResultObject).where(ResultObject.study_pk == study_pk)))
    assert {row.kind for row in rows} >= {ResultKind.SR, ResultKind.PDF}
    for row in rows:
        assert row.sha256 == file_sha256(world["config"].results_dir / row.file_path), row.kind


def make_pipeline(world: dict[str, Any], **changes: Any) -> Pipeline:
    config = replace(world["config"], **changes)
    return Pipeline(world["db"], config, lambda: world["classifier"], outbox=world["outbox"])


def receive(
    world: dict[str, Any],
    name: str,
    *,
    study_uid: str | None = None,
    edit: Callable[[pydicom.Dataset], None] | None = None,
    settle: bool = True,
) -> int:
    """Ingest a fresh copy of a pydicom-data file as if ORTHANC sent it; make its study ready (unless
    not ``settle``: the study is left in whatever state the ingest left it)."""
    ds = pydicom.dcmread(peers.pydicom_data_file(name))
    ds.PatientID = "SENTINEL-ID"  # one patient, whichever file: a study belongs to one patient
    if edit is not None:
        edit(ds)
    ds.PatientName = SENTINEL
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    result = ingest_bytes(world["db"], world["store"], buffer.getvalue(), calling_ae="ORTHANC", source="dimse")
    if settle:
        settled(world, result.study_pk)
    return result.study_pk


def settled(world: dict[str, Any], study_pk: int) -> None:
    """What the settle timer does once a RECEIVED study is quiet (a finished one is reopened first)."""
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.RECEIVED
        assert open_study_ready_job(session, study_pk)
        study.state = StudyState.READY


def result_rows(world: dict[str, Any], study_pk: int) -> dict[ResultKind, tuple[str, str]]:
    """(SOP Instance UID, file) of the latest revision of each kind of result of the study."""
    with session_scope(world["db"]) as session:
        rows = session.scalars(
            select(ResultObject).where(ResultObject.study_pk == study_pk).order_by(ResultObject.revision)
        )
        return {r.kind: (r.sop_instance_uid, r.file_path) for r in rows}


def pacs_down(world: dict[str, Any]) -> int:
    """The PACS destination moved to a port nobody listens on: the PACS is down. Returns its row id."""
    with session_scope(world["db"]) as session:
        pacs = session.scalars(select(RemoteAe).where(RemoteAe.ae_title == "PACS")).one()
        pacs.port = peers.free_port()
        return pacs.id


def pacs_back(world: dict[str, Any], pacs_pk: int, peer: StorePeer) -> None:
    """The PACS is back (``peer``): every delivery is due now, and the outbox sends them."""
    with session_scope(world["db"]) as session:
        session.get_one(RemoteAe, pacs_pk).port = peer.port
        for delivery in session.scalars(select(Delivery)):
            delivery.next_attempt_at = utcnow()
    world["outbox"].deliver_due(pacs_pk)


def late_image(world: dict[str, Any], study_pk: int, **changes: Any) -> dict[ResultKind, tuple[str, str]]:
    """A second image of the study arrives after its results and is processed (with ``changes`` to the
    pipeline's configuration): the study's latest results then."""
    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk))
    make_pipeline(world, **changes).process([study_pk])
    return result_rows(world, study_pk)


def evidence(world: dict[str, Any], path: str) -> set[str]:
    """SOP Instance UIDs an SR (its evidence) or an Encapsulated PDF (its source instances) reports on."""
    ds = pydicom.dcmread(world["config"].results_dir / path)
    if "SourceInstanceSequence" in ds:
        return {item.ReferencedSOPInstanceUID for item in ds.SourceInstanceSequence}
    return {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def instance_uids(world: dict[str, Any], study_pk: int) -> set[str]:
    with session_scope(world["db"]) as session:
        query = select(Instance.sop_instance_uid).join(Series).where(Series.study_pk == study_pk)
        return set(session.scalars(query))


def study_uid_of(world: dict[str, Any], study_pk: int) -> str:
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None
        return study.study_instance_uid


def doubt_in_results(world: dict[str, Any], study_pk: int) -> tuple[list[str], str]:
    """The SR's Quality Finding code values and the PDF's first page text of an analysed study."""
    rows = result_rows(world, study_pk)
    sr = pydicom.dcmread(world["config"].results_dir / rows[ResultKind.SR][1])
    quality = [item.ConceptCodeSequence[0].CodeValue for item in hd.sr.utils.find_content_items(
        sr, name=codes.QUALITY_FINDING, recursive=True)]
    pdf = pydicom.dcmread(world["config"].results_dir / rows[ResultKind.PDF][1])
    reader = PdfReader(BytesIO(bytes(pdf.EncapsulatedDocument)))
    return quality, " ".join(" ".join(page.extract_text().split()) for page in reader.pages)


def test_a_chest_study_gets_a_finding_an_sr_and_a_pdf_delivered_to_the_caller(
    world: dict[str, Any], peer: StorePeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])

    with session_scope(world["db"]) as session:
        finding = session.scalars(select(Finding)).one()
        info = world["classifier"].info
        assert (finding.model_name, finding.model_version) == (info.name, info.version)
        assert set(finding.probabilities) == set(info.classes)
        assert abs(sum(finding.probabilities.values()) - 1) < 1e-3
        assert finding.label in (*info.classes, "indeterminate")
        assert {"read", "predict"} <= set(finding.timings_ms)  # recorded, not judged: timing is a benchmark
        assert finding.novelty is not None and 0.0 < finding.novelty < 1.0  # a chest CR: familiar
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.ANALYSED
        assert session.scalars(select(Instance)).one().state is InstanceState.ANALYSED
        assert session.scalars(select(Job)).one().state is JobState.DONE
        assert {d.state for d in session.scalars(select(Delivery))} == {DeliveryState.DELIVERED}

    rows = result_rows(world, study_pk)
    assert set(rows) == {ResultKind.SR, ResultKind.PDF}
    sr = pydicom.dcmread(world["config"].results_dir / rows[ResultKind.SR][1])
    assert sr.SOPInstanceUID == rows[ResultKind.SR][0]
    with session_scope(world["db"]) as session:
        study_uid = session.get(Study, study_pk).study_instance_uid  # type: ignore[union-attr]
    assert sr.StudyInstanceUID == study_uid
    parameters = [item.TextValue for item in hd.sr.utils.find_content_items(
        sr, name=dcm_codes.DCM.AlgorithmParameters, recursive=True)]
    assert "indeterminate_threshold=0.5" in parameters  # the threshold the label was decided with
    pdf = pydicom.dcmread(world["config"].results_dir / rows[ResultKind.PDF][1])
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert sorted(peer.received) == sorted(uid for uid, _ in rows.values())
    assert peer.associations == 1
    assert SENTINEL not in caplog.text and "SENTINEL" not in caplog.text
    assert doubt_in_results(world, study_pk)[0] == []  # the model's checks had no doubt


def test_an_image_that_arrives_after_the_results_gets_new_results_that_include_it(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """A second image of a study that arrives after its SR and PDF were sent is classified, and the PACS
    gets a new SR and PDF (new UIDs, revision 2) that report on both images. The first ones stay as sent.
    The old code classified the late image but left the results as they were: its finding never left."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first = result_rows(world, study_pk)
    assert len(peer.received) == 2

    second = late_image(world, study_pk)
    both = instance_uids(world, study_pk)
    assert len(both) == 2
    for kind in (ResultKind.SR, ResultKind.PDF):
        assert second[kind][0] != first[kind][0]
        assert evidence(world, second[kind][1]) == both
        assert len(evidence(world, first[kind][1])) == 1  # the first revision stays as it was sent
    assert sorted(peer.received) == sorted(uid for rows in (first, second) for uid, _ in rows.values())
    with session_scope(world["db"]) as session:
        revisions = session.execute(select(ResultObject.kind, ResultObject.revision)).all()
        assert sorted(tuple(r) for r in revisions) == sorted(
            (kind, n) for kind in (ResultKind.SR, ResultKind.PDF) for n in (1, 2)
        )
        assert {d.state for d in session.scalars(select(Delivery))} == {DeliveryState.DELIVERED}


def tracked(world: dict[str, Any], path: str) -> dict[str, tuple[str, str]]:
    """(Tracking Identifier, Tracking UID) of each image an SR reports on, by its SOP Instance UID."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(world["config"].results_dir / path))
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return {
        str(group.source_images[0].referenced_sop_instance_uid): (
            str(group.tracking_identifier), str(group.tracking_uid)
        )
        for group in content.get_image_measurement_groups()
    }


def test_an_image_keeps_its_number_and_tracking_uid_in_the_revision_a_late_image_makes(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """A viewer follows one image's finding from revision 1 of the SR to revision 2 by its Tracking UID
    and reads it as the same "Image N". The old code derived the Tracking UID from the SR's own UID, so
    it changed with every revision, and numbered the images by series, so a late image of a lower series
    became "Image 1" and the first image "Image 2" (PACS administrator's review)."""
    def series(number: int) -> Callable[[pydicom.Dataset], None]:
        def edit(ds: pydicom.Dataset) -> None:
            ds.SeriesNumber = number
        return edit

    study_pk = receive(world, "RG1_UNCI.dcm", edit=series(2))
    make_pipeline(world).process([study_pk])
    first = tracked(world, result_rows(world, study_pk)[ResultKind.SR][1])
    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk), edit=series(1))
    make_pipeline(world).process([study_pk])
    second = tracked(world, result_rows(world, study_pk)[ResultKind.SR][1])

    ((early, (identifier, uid)),) = first.items()
    assert identifier == "Image 1 classification"
    assert second[early] == (identifier, uid)
    (late,) = set(second) - {early}
    assert second[late][0] == "Image 2 classification" and second[late][1] != uid


def test_a_revision_references_and_names_the_results_it_replaces(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """Revision 2 of the SR and PDF can be told from revision 1 in a viewer and on paper: the SR's
    Predecessor Documents Sequence references revision 1's SR, each object's Instance Number is its
    revision, its series sorts after revision 1's and its Series Description names the report it
    replaces, and the PDF says so at its top. The old code sent both revisions as Series 9001/9002,
    Instance 1, with the same description and no reference: only Content Time differed (review)."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first = result_rows(world, study_pk)
    second = late_image(world, study_pk)
    results = world["config"].results_dir
    old = {kind: pydicom.dcmread(results / first[kind][1]) for kind in (ResultKind.SR, ResultKind.PDF)}
    new = {kind: pydicom.dcmread(results / second[kind][1]) for kind in (ResultKind.SR, ResultKind.PDF)}
    with session_scope(world["db"]) as session:
        replaced = session.scalars(
            select(ResultObject).where(ResultObject.revision == 1, ResultObject.kind == ResultKind.SR)
        ).one()
        replaced_at = analysis_time(replaced.created_at.replace(tzinfo=UTC))

    (study,) = new[ResultKind.SR].PredecessorDocumentsSequence
    assert study.StudyInstanceUID == study_uid_of(world, study_pk)
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old[ResultKind.SR].SeriesInstanceUID
    (item,) = series.ReferencedSOPSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (
        old[ResultKind.SR].SOPClassUID, old[ResultKind.SR].SOPInstanceUID)
    assert "PredecessorDocumentsSequence" not in old[ResultKind.SR]
    for kind, number in ((ResultKind.SR, 9001), (ResultKind.PDF, 9002)):
        assert (old[kind].InstanceNumber, new[kind].InstanceNumber) == (1, 2)
        assert (old[kind].SeriesNumber, new[kind].SeriesNumber) == (number, number + 10)
        description = new[kind].SeriesDescription
        assert " rev 2, replaces " in description and len(description) <= 64
        assert description != old[kind].SeriesDescription
    assert "(revision 2, replaces the report of " in new[ResultKind.PDF].DocumentTitle

    def text(ds: pydicom.Dataset) -> str:
        reader = PdfReader(BytesIO(bytes(ds.EncapsulatedDocument)))
        return " ".join(" ".join(page.extract_text().split()) for page in reader.pages)

    assert f"REVISION 2 — REPLACES THE REPORT OF {replaced_at}" in text(new[ResultKind.PDF])
    assert "REPLACES" not in text(old[ResultKind.PDF])
    early = next(iter(tracked(world, first[ResultKind.SR][1])))
    assert tracked(world, second[ResultKind.SR][1])[early] == tracked(world, first[ResultKind.SR][1])[early]

    # once retention removed revision 1's file, its row gives the same reference
    pipeline = make_pipeline(world)
    from_file = pipeline._predecessor(replaced, study_uid_of(world, study_pk))
    (results / replaced.file_path).unlink()
    from_row = pipeline._predecessor(replaced, study_uid_of(world, study_pk))
    keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
    assert [from_row[k].value for k in keywords] == [from_file[k].value for k in keywords]

    from tests.interop.test_reporting_dicom_tools import assert_valid  # needs dciodvfy: last

    assert_valid(results / second[ResultKind.SR][1], "Comprehensive3DSR")
    assert_valid(results / second[ResultKind.PDF][1], "EncapsulatedPDF")


def test_results_made_before_revisions_existed_still_get_a_revision_for_a_late_image(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """Rows made before migration 0008 have no ``covers``; they were taken to cover any set of images,
    so on an upgraded database a late image of such a study was classified and its finding never sent:
    the first SR and PDF were reused for ever (review). They cover what the study had when they were
    made, so re-processing without a new image still reuses them."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first = result_rows(world, study_pk)
    with session_scope(world["db"]) as session:  # as migration 0008 leaves an older database
        for row in session.scalars(select(ResultObject)):
            row.covers = None
    with session_scope(world["db"]) as session:
        session.get_one(Study, study_pk).state = StudyState.READY
    make_pipeline(world).process([study_pk])
    assert result_rows(world, study_pk) == first and len(peer.received) == 2

    second = late_image(world, study_pk)
    for kind in (ResultKind.SR, ResultKind.PDF):
        assert second[kind][0] != first[kind][0]
        assert evidence(world, second[kind][1]) == instance_uids(world, study_pk)
    assert len(peer.received) == 4


def test_results_rebuilt_after_retention_removed_an_image_keep_the_patient_and_study_it_belongs_to(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """A late image after retention removed the study's first image: the new SR and PDF take their patient
    and study modules from that first image, now rebuilt from the database. The old code rebuilt it from
    UIDs alone, so the revision the PACS got named no patient (an empty Patient's Name and ID), and the
    same Study Instance UID came to stand under two patients in Orthanc."""
    def accession(ds: pydicom.Dataset) -> None:
        ds.AccessionNumber, ds.PatientID, ds.PatientSex = "ACC-7", "PID-7", "F"
        ds.TimezoneOffsetFromUTC = "+0930"

    study_pk = receive(world, "RG1_UNCI.dcm", edit=accession)
    make_pipeline(world).process([study_pk])
    with session_scope(world["db"]) as session:  # what dicom_node.retention does
        first = session.scalars(select(Instance)).one()
        (world["config"].storage_dir / first.file_path).unlink()
        first.purged_at = utcnow()

    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk), edit=accession)
    make_pipeline(world).process([study_pk])
    rows = result_rows(world, study_pk)
    assert evidence(world, rows[ResultKind.SR][1]) == instance_uids(world, study_pk)
    for kind in (ResultKind.SR, ResultKind.PDF):
        ds = pydicom.dcmread(world["config"].results_dir / rows[kind][1])
        assert (str(ds.PatientName), ds.PatientID, ds.PatientSex) == (SENTINEL, "PID-7", "F"), kind
        study = (ds.AccessionNumber, ds.StudyDate, ds.StudyID, ds.ReferringPhysicianName)
        assert study == ("ACC-7", "20040826", "9RG1", "ward"), kind
        assert (ds.PatientBirthDate, ds.TimezoneOffsetFromUTC) == ("19400305", "+0930"), kind


def _other_ids_and_issuer(ds: pydicom.Dataset) -> None:
    """Attributes the database does not keep: an Other Patient ID and an Issuer of Accession Number."""
    issuer = pydicom.Dataset()
    issuer.LocalNamespaceEntityID = "HOSP-A"
    ds.IssuerOfAccessionNumberSequence = [issuer]
    other = pydicom.Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "OTHER-1", "HOSP-B", "TEXT"
    ds.OtherPatientIDsSequence = [other]


def _retention_removes_the_only_image(world: dict[str, Any]) -> str:
    """What dicom_node.retention does to the one image received so far; returns its SOP Instance UID."""
    with session_scope(world["db"]) as session:
        removed = session.scalars(select(Instance)).one()
        (world["config"].storage_dir / removed.file_path).unlink()
        removed.purged_at = utcnow()
        return removed.sop_instance_uid


def test_a_revision_after_retention_keeps_the_patient_and_study_attributes_the_database_does_not_hold(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """Once retention removed the study's first image, revision 2 took its patient and study modules from
    that image's rows: the Other Patient IDs, the Patient's Birth Time and the Issuer of Accession Number
    that revision 1 carried were gone, though the late image's file on disk holds them (review). They
    come from the image on disk now; "Image 1" and the references stay the removed image's. The removed
    image, without its Request Attributes, no longer adds a second order under the same accession."""
    def rich(ds: pydicom.Dataset) -> None:
        ds.AccessionNumber, ds.PatientID, ds.PatientBirthTime = "ACC-7", "PID-7", "093000"
        _other_ids_and_issuer(ds)
        request = pydicom.Dataset()
        request.AccessionNumber, request.RequestedProcedureID = "ACC-7", "RP-7"
        ds.RequestAttributesSequence = [request]

    study_pk = receive(world, "RG1_UNCI.dcm", edit=rich)
    make_pipeline(world).process([study_pk])
    first = result_rows(world, study_pk)
    removed_uid = _retention_removes_the_only_image(world)
    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk), edit=rich)
    make_pipeline(world).process([study_pk])
    second = result_rows(world, study_pk)
    results = world["config"].results_dir
    keywords = ("OtherPatientIDsSequence", "PatientBirthTime", "IssuerOfAccessionNumberSequence",
                "PatientName", "PatientID", "AccessionNumber", "StudyID", "StudyDate",
                "ReferencedRequestSequence")
    for kind in (ResultKind.SR, ResultKind.PDF):
        old, new = (pydicom.dcmread(results / rows[kind][1]) for rows in (first, second))
        assert [new.get(k) for k in keywords] == [old.get(k) for k in keywords], kind
        assert new.OtherPatientIDsSequence[0].PatientID == "OTHER-1", kind
    assert tracked(world, second[ResultKind.SR][1])[removed_uid][0] == "Image 1 classification"

    from tests.interop.test_reporting_dicom_tools import assert_valid  # needs dciodvfy: last

    assert_valid(results / second[ResultKind.SR][1], "Comprehensive3DSR")
    assert_valid(results / second[ResultKind.PDF][1], "EncapsulatedPDF")


def test_the_not_analysed_notice_says_its_page_names_no_patient(world: dict[str, Any], peer: StorePeer) -> None:
    """The "not analysed" notice's page holds no patient identification (build_not_analysed_pdf), but its
    Encapsulated PDF said Burned In Annotation YES, as the report does: a de-identifying export drops or
    redacts such a document for nothing (DICOM engineer's review). The report, which names the patient,
    still says YES."""
    study_pk = receive(world, "RG3_UNCI.dcm")  # a leg: skipped
    make_pipeline(world, send_skipped=True).process([study_pk])
    notice = pydicom.dcmread(world["config"].results_dir / result_rows(world, study_pk)[ResultKind.PDF][1])
    text = " ".join(page.extract_text() for page in PdfReader(BytesIO(bytes(notice.EncapsulatedDocument))).pages)
    assert "SENTINEL" not in text and "not analysed" in text
    assert notice.BurnedInAnnotation == "NO"

    analysed_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world, send_skipped=True).process([analysed_pk])
    report = pydicom.dcmread(world["config"].results_dir / result_rows(world, analysed_pk)[ResultKind.PDF][1])
    assert "SENTINEL-ID" in PdfReader(BytesIO(bytes(report.EncapsulatedDocument))).pages[0].extract_text()
    assert report.BurnedInAnnotation == "YES"


def test_a_notice_revision_after_retention_keeps_the_patient_and_study_attributes_of_an_image_on_disk(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """As the report's: a second leg image after retention removed the first; the notice's revision took
    its patient and study modules from the removed image's rows and lost the Other Patient IDs and the
    Issuer of Accession Number, though the second image's file holds them (review)."""
    study_pk = receive(world, "RG3_UNCI.dcm", edit=_other_ids_and_issuer)  # a leg: skipped
    make_pipeline(world, send_skipped=True).process([study_pk])
    first = result_rows(world, study_pk)[ResultKind.PDF]
    _retention_removes_the_only_image(world)
    receive(world, "RG3_UNCI.dcm", study_uid=study_uid_of(world, study_pk), edit=_other_ids_and_issuer)
    make_pipeline(world, send_skipped=True).process([study_pk])
    second = result_rows(world, study_pk)[ResultKind.PDF]
    assert second != first
    old, new = (pydicom.dcmread(world["config"].results_dir / path) for _, path in (first, second))
    for keyword in ("OtherPatientIDsSequence", "IssuerOfAccessionNumberSequence", "PatientID"):
        assert new.get(keyword) == old.get(keyword), keyword
    assert new.OtherPatientIDsSequence[0].PatientID == "OTHER-1"


def test_a_chest_image_after_a_skipped_one_replaces_the_not_analysed_notice(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """The "not analysed" PDF of a study whose first image was a leg is followed, once its chest image
    arrives, by an SR and a PDF with the finding; the old code kept the notice as the only PDF."""
    study_pk = receive(world, "RG3_UNCI.dcm")
    make_pipeline(world, send_skipped=True).process([study_pk])
    notice = result_rows(world, study_pk)
    assert set(notice) == {ResultKind.PDF}

    rows = late_image(world, study_pk, send_skipped=True)
    assert set(rows) == {ResultKind.SR, ResultKind.PDF} and rows[ResultKind.PDF] != notice[ResultKind.PDF]
    pdf = pydicom.dcmread(world["config"].results_dir / rows[ResultKind.PDF][1])
    text = PdfReader(BytesIO(bytes(pdf.EncapsulatedDocument))).pages[0].extract_text()
    assert "not analysed" not in text and "Image 1 of 1" in text
    assert sorted(peer.received) == sorted([notice[ResultKind.PDF][0], *(uid for uid, _ in rows.values())])
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.ANALYSED


def test_a_covid_non_covid_model_reports_its_own_two_classes(
    world: dict[str, Any], peer: StorePeer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Nie et al.'s task: a two-class artifact trained with --relabel runs in the node like the default, and
    its classes, not the default's three, reach the database, the SR and the PDF."""
    from classifier.inference import Classifier

    merge = {"normal": "non-covid", "pneumonia": "non-covid"}
    folder = tiny_model(tmp_path_factory.getbasetemp(), relabel=merge)
    binary = Classifier.load(folder)
    assert binary.info.classes == ("covid", "non-covid")
    study_pk = receive(world, "RG1_UNCI.dcm")
    Pipeline(world["db"], world["config"], lambda: binary, outbox=world["outbox"]).process([study_pk])

    with session_scope(world["db"]) as session:
        finding = session.scalars(select(Finding)).one()
        assert set(finding.probabilities) == {"covid", "non-covid"}
        assert finding.label in ("covid", "non-covid", "indeterminate")
        assert {d.state for d in session.scalars(select(Delivery))} == {DeliveryState.DELIVERED}
    rows = result_rows(world, study_pk)
    sr = pydicom.dcmread(world["config"].results_dir / rows[ResultKind.SR][1])
    measured = {item.ConceptNameCodeSequence[0].CodeValue for item in hd.sr.utils.find_content_items(
        sr, value_type=hd.sr.ValueTypeValues.NUM, recursive=True)}
    assert {"CXR-P-COVID", "CXR-P-NONCOVID"} <= measured and "CXR-P-NORMAL" not in measured
    _, pdf_text = doubt_in_results(world, study_pk)
    assert "No COVID-19 pattern" in pdf_text and "Pneumonia" not in pdf_text
    assert sorted(peer.received) == sorted(uid for uid, _ in rows.values())


def test_a_late_image_while_the_pacs_is_down_sends_only_the_latest_results(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """Results waiting for a PACS that is down are replaced by the revision a late image brings: the old
    code sent both once the PACS was back, so the viewer listed an SR that leaves the late image out."""
    pacs_pk = pacs_down(world)
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first = result_rows(world, study_pk)
    second = late_image(world, study_pk)
    with session_scope(world["db"]) as session:
        states = {
            d.result_object.sop_instance_uid: (d.state, d.last_error) for d in session.scalars(select(Delivery))
        }
        session.get(RemoteAe, pacs_pk).port = peer.port  # type: ignore[union-attr]  # the PACS is back
        for delivery in session.scalars(select(Delivery)):
            delivery.next_attempt_at = utcnow()
    superseded = (DeliveryState.SUPERSEDED, "superseded by revision 2")
    assert {states[uid] for uid, _ in first.values()} == {superseded}
    assert {states[uid][0] for uid, _ in second.values()} == {DeliveryState.RETRYING}
    world["outbox"].deliver_due(pacs_pk)
    assert sorted(peer.received) == sorted(uid for uid, _ in second.values())


def test_a_delivery_superseded_while_it_was_being_tried_stays_superseded(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox was waiting on the PACS that is down when the late image's revision superseded what it
    was sending; the failed attempt then set the old deliveries RETRYING again (found by review)."""
    from dicom_node import scu

    pacs_pk = pacs_down(world)
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first = result_rows(world, study_pk)
    send = scu.send
    late: list[int] = []

    def send_while_a_late_image_comes(*args: Any, **kwargs: Any) -> list[int]:
        if not late:
            late.append(receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk)))
            make_pipeline(world).process([study_pk])  # its revision supersedes what is being sent
        return send(*args, **kwargs)

    with session_scope(world["db"]) as session:
        for delivery in session.scalars(select(Delivery)):
            delivery.next_attempt_at = utcnow()
    monkeypatch.setattr(scu, "send", send_while_a_late_image_comes)
    world["outbox"].deliver_due(pacs_pk)
    with session_scope(world["db"]) as session:
        states = {d.result_object.sop_instance_uid: d.state for d in session.scalars(select(Delivery))}
    assert late and {states[uid] for uid, _ in first.values()} == {DeliveryState.SUPERSEDED}


def test_results_whose_files_were_lost_before_delivery_are_made_again_as_a_new_revision(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """A restore drill: the database restored from a later time than results/, while the PACS was down.
    The outbox found the SR and PDF missing, retried them for three days and left them DEAD; the node
    never made them again. Now the study goes round once more: a new revision (new UIDs, naming the lost
    one as its predecessor) is made from the database and sent, and it supersedes the lost objects."""
    pacs_pk = pacs_down(world)
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first = result_rows(world, study_pk)
    shutil.rmtree(world["config"].results_dir / str(study_pk))  # results/ restored from an older backup
    pacs_back(world, pacs_pk, peer)
    assert peer.received == []

    settled(world, study_pk)  # the outbox reopened the study; its settle timer readies it
    make_pipeline(world).process([study_pk])
    second = result_rows(world, study_pk)
    assert sorted(peer.received) == sorted(uid for uid, _ in second.values())
    for kind in (ResultKind.SR, ResultKind.PDF):
        assert second[kind][0] != first[kind][0]
        assert evidence(world, second[kind][1]) == instance_uids(world, study_pk)
    sr = pydicom.dcmread(world["config"].results_dir / second[ResultKind.SR][1])
    [predecessor] = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert predecessor.ReferencedSOPInstanceUID == first[ResultKind.SR][0]
    with session_scope(world["db"]) as session:
        states = {d.result_object.sop_instance_uid: (d.state, d.last_error)
                  for d in session.scalars(select(Delivery))}
        study = session.get_one(Study, study_pk)
        assert (study.state, study.state_reason) == (StudyState.ANALYSED, "")
    superseded = (DeliveryState.SUPERSEDED, "superseded by revision 2")
    assert {states[uid] for uid, _ in first.values()} == {superseded}


def test_result_files_a_disk_damaged_are_made_again_not_sent(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """A result file cut short by a damaged disk still parses (pydicom reads a truncated Encapsulated
    Document as a shorter one), so the outbox sent the broken PDF to the PACS; a byte flipped in the SR
    went unseen too. The node now records each file's SHA-256 when it writes it: the outbox sends
    neither, the study's results are made again as a new revision, and `storage check --verify` lists
    the damaged files."""
    pacs_pk = pacs_down(world)
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first = result_rows(world, study_pk)
    results_dir = world["config"].results_dir
    with session_scope(world["db"]) as session:
        for row in session.scalars(select(ResultObject)):  # what the node wrote
            assert row.sha256 == hashlib.sha256((results_dir / row.file_path).read_bytes()).hexdigest()
    pdf_file, sr_file = results_dir / first[ResultKind.PDF][1], results_dir / first[ResultKind.SR][1]
    pdf_file.write_bytes(pdf_file.read_bytes()[:-4096])
    assert len(pydicom.dcmread(pdf_file).EncapsulatedDocument) > 0  # still reads, as a shorter document
    damaged = bytearray(sr_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0x20
    sr_file.write_bytes(bytes(damaged))
    with session_scope(world["db"]) as session:
        verified = storage.check(session, world["config"].storage_dir, results_dir, verify=True)
        assert storage.check(session, world["config"].storage_dir, results_dir).damaged == 0  # no file read
    damage = "damaged (its content is not what the node wrote)"
    found = sorted((kind, why) for _, kind, _, why in verified.damaged_results)
    assert found == [("pdf", damage), ("sr", damage)]

    pacs_back(world, pacs_pk, peer)
    assert peer.received == []  # neither damaged file went out
    with session_scope(world["db"]) as session:
        errors = {d.last_error for d in session.scalars(select(Delivery))}
    assert errors == {f"result file {damage}: {REMAKING}"}

    settled(world, study_pk)  # the outbox reopened the study; its settle timer readies it
    make_pipeline(world).process([study_pk])
    second = result_rows(world, study_pk)
    assert sorted(peer.received) == sorted(uid for uid, _ in second.values())
    assert all(second[kind][0] != first[kind][0] for kind in (ResultKind.SR, ResultKind.PDF))
    with session_scope(world["db"]) as session:
        states = {d.result_object.sop_instance_uid: d.state for d in session.scalars(select(Delivery))}
    assert {states[uid] for uid, _ in first.values()} == {DeliveryState.SUPERSEDED}


def test_an_image_file_a_disk_damaged_is_found_and_mended_by_the_same_image_sent_again(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """`storage check --verify` finds a received file that is no longer the bytes the sender sent, and
    the operator's remedy, "have the PACS send the image again", mends it. Before, the copy sent again was
    a duplicate and the damaged file stayed."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    with session_scope(world["db"]) as session:
        instance_pk, relative = session.execute(select(Instance.id, Instance.file_path)).one()
    image = world["config"].storage_dir / relative
    sent = image.read_bytes()
    damaged = bytearray(sent)
    damaged[-1000] ^= 0x01  # one bit of the pixel data
    image.write_bytes(bytes(damaged))

    def verified() -> list[int]:
        with session_scope(world["db"]) as session:
            return storage.check(session, world["config"].storage_dir, world["config"].results_dir,
                                 verify=True).damaged_instances

    assert verified() == [instance_pk]
    with caplog.at_level(logging.WARNING, logger="dicom_node.ingest"):
        again = ingest_bytes(world["db"], world["store"], sent, calling_ae="ORTHANC", source="dimse",
                             results_dir=world["config"].results_dir)
    assert (again.duplicate, again.study_pk, image.read_bytes() == sent) == (True, study_pk, True)
    assert f"instance {instance_pk}'s file was damaged; replaced by the same copy sent again" in caplog.text
    assert verified() == []


def test_an_image_sent_again_after_a_restore_brings_back_its_file_and_the_studys_results(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """The operator guide's remedy for lost files, "send an image of the study again": the image's file
    came back ("instance had lost its file; restored"), but the copy was only a duplicate: no new
    revision was made, the lost results stayed lost. Now the study is reopened and its results are made
    again and sent; an image sent again while the results are intact changes nothing."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first = result_rows(world, study_pk)
    with session_scope(world["db"]) as session:
        image = world["config"].storage_dir / session.scalars(select(Instance.file_path)).one()
    sent = image.read_bytes()  # the file is the bytes the sender sent
    image.unlink()  # the files restored from a backup older than the database
    shutil.rmtree(world["config"].results_dir / str(study_pk))

    def send_again() -> IngestResult:
        return ingest_bytes(world["db"], world["store"], sent, calling_ae="ORTHANC", source="dimse",
                            results_dir=world["config"].results_dir)

    again = send_again()
    assert again.duplicate and again.reopened and image.read_bytes() == sent
    settled(world, study_pk)
    make_pipeline(world).process([study_pk])
    second = result_rows(world, study_pk)
    assert all(second[kind][0] != first[kind][0] for kind in (ResultKind.SR, ResultKind.PDF))
    assert sorted(peer.received) == sorted(uid for rows in (first, second) for uid, _ in rows.values())
    pdf = pydicom.dcmread(world["config"].results_dir / second[ResultKind.PDF][1])
    assert "Image 1 of 1" in PdfReader(BytesIO(bytes(pdf.EncapsulatedDocument))).pages[0].extract_text()

    assert not send_again().reopened  # the results are there: a duplicate is a duplicate
    with session_scope(world["db"]) as session:
        assert session.get_one(Study, study_pk).state is StudyState.ANALYSED


def test_an_image_that_failed_for_want_of_its_file_is_analysed_once_it_is_sent_again(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """The files restored from a backup older than the database, before a backlog was processed: the
    image failed ("stored file unreadable") and its study with it. The operator guide's remedy, "have the
    PACS send the image again", brought the file back, but the image stayed FAILED and the study with no
    result for good. Now the copy that restores the file opens the image and its study again."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    with session_scope(world["db"]) as session:
        image = world["config"].storage_dir / session.scalars(select(Instance.file_path)).one()
    sent = image.read_bytes()
    image.unlink()
    make_pipeline(world).process([study_pk])
    with session_scope(world["db"]) as session:
        assert session.get_one(Study, study_pk).state is StudyState.FAILED
        assert session.scalars(select(Instance.state)).one() is InstanceState.FAILED

    again = ingest_bytes(world["db"], world["store"], sent, calling_ae="ORTHANC", source="dimse",
                         results_dir=world["config"].results_dir)
    assert (again.duplicate, again.restored, again.reopened) == (True, True, True)
    settled(world, study_pk)
    make_pipeline(world).process([study_pk])
    with session_scope(world["db"]) as session:
        assert session.get_one(Study, study_pk).state is StudyState.ANALYSED
        assert session.scalars(select(Instance.state)).one() is InstanceState.ANALYSED
    assert len(peer.received) == 2
    assert not ingest_bytes(world["db"], world["store"], sent, calling_ae="ORTHANC", source="dimse",
                            results_dir=world["config"].results_dir).reopened  # now only a duplicate


def test_an_image_that_arrives_while_the_results_are_built_is_analysed_and_reported(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study is PROCESSING while its SR and PDF are built, so an image stored then does not reopen
    it, and its settle timer finds nothing to ready. The old code finished the study ANALYSED with that
    image left RECEIVED for good (and a restart did not pick it up): never classified, missing from the
    results. Now the study goes round again, and only results that cover both images are sent."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    pipeline = make_pipeline(world)
    build = pipeline._build_missing
    late: list[int] = []

    def build_while_an_image_arrives(*args: Any, **kwargs: Any) -> list[int]:
        if not late:
            late.append(receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk), settle=False))
        return build(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_build_missing", build_while_an_image_arrives)
    pipeline.start()
    assert pipeline.wait_idle(120)
    pipeline.stop()

    assert late == [study_pk]
    both = instance_uids(world, study_pk)
    assert len(both) == 2
    with session_scope(world["db"]) as session:
        assert session.scalars(select(Study.state)).all() == [StudyState.ANALYSED]
        assert set(session.scalars(select(Instance.state))) == {InstanceState.ANALYSED}
        sent = set(session.scalars(select(ResultObject.sop_instance_uid).join(Delivery)))
    latest = result_rows(world, study_pk)
    for kind in (ResultKind.SR, ResultKind.PDF):
        assert evidence(world, latest[kind][1]) == both
    assert sorted(peer.received) == sorted(sent) == sorted(uid for uid, _ in latest.values())


def test_a_full_results_disk_holds_the_study_until_there_is_room_again(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """Out of space for the results: the old code gave up after five tries (about two minutes) and left
    the study FAILED for good, its images acknowledged to the PACS and never reported. It now waits,
    trying again with a growing delay, and says why."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    pipeline = make_pipeline(world)
    pipeline.results.min_free_bytes = 10**18  # the results' file system is full
    for _ in range(7):
        pipeline.process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.READY, study.state
        assert study.state_reason.startswith("waiting to try again in ")
        assert "free-space reserve" in study.state_reason
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.PENDING and job.attempts == 7
    assert retry_delay(1) == 30 and retry_delay(7) == 600  # doubling, at most ten minutes

    pipeline.results.min_free_bytes = 0  # room again
    pipeline.process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.ANALYSED and study.state_reason == ""
    assert len(peer.received) == 2
    # a late image opens a new round: its first retry waits 30 s again, not the ten minutes reached before
    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk))
    with session_scope(world["db"]) as session:
        job = session.scalars(select(Job)).one()
        assert job.state is JobState.PENDING and job.attempts == 0


def test_a_database_error_no_wait_mends_fails_the_study_at_once(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """SQLite reports a schema bug as an OperationalError, as it does a locked database: the study waited
    READY for ever, retried every ten minutes, and no failure count or health check showed it."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    engine = world["db"].kw["bind"]
    with engine.begin() as conn:  # the schema is not what this version of the node expects
        conn.exec_driver_sql("ALTER TABLE finding RENAME COLUMN novelty TO novelty_elsewhere")
    make_pipeline(world).process([study_pk])
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE finding RENAME COLUMN novelty_elsewhere TO novelty")
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.FAILED, (study.state, study.state_reason)
        assert session.scalars(select(Job)).one().state is JobState.FAILED


def _analysed(world: dict[str, Any], study_pk: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(world["db"]) as session:
            if session.get_one(Study, study_pk).state is StudyState.ANALYSED:
                return True
        time.sleep(0.2)
    return False


def test_a_study_met_while_the_database_is_away_is_tried_again_not_dropped(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL restarted under a backlog (review): claiming the study failed, which dropped it from
    the queue, and a failure that could not be written "resumed at the next start". 133 acknowledged
    studies waited for a restart while /healthz said "ok"."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    monkeypatch.setattr(pipeline_module, "RETRY_DELAY_SECONDS", 0.5)
    pipeline = make_pipeline(world)
    away = make_engine("postgresql+psycopg://cxr@127.0.0.1:1/gone")  # nothing listens: refused at once
    pipeline.session_factory = make_session_factory(away)
    pipeline.process([study_pk])  # neither the claim nor its failure can be written
    pipeline.session_factory = world["db"]  # the database is back
    pipeline.start()  # nothing unfinished is queued at start: the study's job was never claimed
    try:
        assert _analysed(world, study_pk)
    finally:
        pipeline.stop()
        away.dispose()
    assert len(peer.received) == 2


def test_an_open_job_nothing_works_on_is_found_when_the_worker_is_idle(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever else drops a study from the queue while its job stays open, the worker finds it."""
    monkeypatch.setattr(pipeline_module, "IDLE_SWEEP_SECONDS", 0.5)
    pipeline = make_pipeline(world)
    pipeline.start()
    try:
        study_pk = receive(world, "RG1_UNCI.dcm")  # READY with a pending job, and nobody told the worker
        assert _analysed(world, study_pk)
    finally:
        pipeline.stop()
    assert len(peer.received) == 2


def test_a_model_that_loads_after_a_failed_start_is_taken_up_with_the_studies_held_for_it(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The model folder was still being copied when the node started: model_ready stayed False for good,
    and the study held at start-up waited for a restart (review)."""
    from classifier.errors import ModelArtifactError

    monkeypatch.setattr(pipeline_module, "IDLE_SWEEP_SECONDS", 0.2)
    copied = threading.Event()

    def loader() -> ImageClassifier:
        if not copied.is_set():
            raise ModelArtifactError("model.keras does not match the sha256 recorded in model.json")
        loaded: ImageClassifier = world["classifier"]
        return loaded

    held = receive(world, "RG1_UNCI.dcm")
    pipeline = Pipeline(world["db"], world["config"], loader, outbox=world["outbox"])
    pipeline.start()
    try:
        pipeline.submit(held)
        assert pipeline.wait_idle(30) and not pipeline.model_ready
        with session_scope(world["db"]) as session:
            assert "model unavailable" in session.get_one(Study, held).state_reason
        copied.set()
        assert _analysed(world, held)
        assert pipeline.model_ready
    finally:
        pipeline.stop()
    assert len(peer.received) == 2
    assert caplog.text.count("the classifier could not be loaded") == 1  # the sweep's tries are quiet


def test_the_sweep_s_tries_at_a_model_that_keeps_failing_space_out(world: dict[str, Any]) -> None:
    """A model refused after a full load cost 2 to 7 s of CPU, and a log line, every minute (review)."""
    from classifier.errors import ModelArtifactError

    tries: list[float] = []

    def refused() -> ImageClassifier:
        tries.append(time.monotonic())
        raise ModelArtifactError("the model's classes ['tuberculosis'] have no coded concept for the SR")

    pipeline = Pipeline(world["db"], world["config"], refused, outbox=world["outbox"])
    assert not pipeline._load_model(report=True)
    for _ in range(5):  # the sweep comes by again before the next try is due
        assert not pipeline._load_model(report=False)
    assert len(tries) == 1
    waits = []
    for _ in range(12):
        waits.append(pipeline._next_load_try - tries[-1])
        pipeline._next_load_try = 0.0  # as if that long had passed
        assert not pipeline._load_model(report=False)
    assert len(tries) == 13
    assert waits[:3] == pytest.approx([60.0, 120.0, 240.0], abs=1.0)
    assert max(waits) == pytest.approx(pipeline_module.MAX_LOAD_RETRY_SECONDS, abs=1.0)


def test_a_study_still_waiting_for_a_resource_after_a_day_fails_for_an_alert(
    world: dict[str, Any], peer: StorePeer
) -> None:
    study_pk = receive(world, "RG1_UNCI.dcm")
    pipeline = make_pipeline(world)
    pipeline.results.min_free_bytes = 10**18  # the results' file system is full, and stays full
    with session_scope(world["db"]) as session:  # held a day for a missing model: no resource waited for
        session.scalars(select(Job)).one().started_at = utcnow() - timedelta(hours=25)
    pipeline.process([study_pk])
    with session_scope(world["db"]) as session:  # so it waits (the review: it gave up at once)
        assert session.get_one(Study, study_pk).state is StudyState.READY
        session.scalars(select(Job)).one().attempts = 150  # 30 s doubling to 10 min: a day's tries
    pipeline.process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.FAILED
        assert study.state_reason.startswith("gave up after 24 hours: file store below its free-space")


@pytest.mark.parametrize(
    ("orig", "waits"),
    [
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("database or disk is full"), True),
        (sqlite3.OperationalError("no such column: study.study_id"), False),
    ],
)
def test_a_sqlite_error_waits_by_what_the_driver_said(orig: Exception, waits: bool) -> None:
    assert waits_for_a_resource(OperationalError("SELECT 1", {}, orig)) is waits


def test_a_postgresql_error_waits_by_its_sqlstate_class() -> None:
    """Every PostgreSQL OperationalError waited 24 hours, a program limit exceeded (54000) as much as a
    deadlock (40P01) or a full disk (53100) (review)."""
    class DriverError(Exception):
        def __init__(self, sqlstate: str) -> None:
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    for state, waits in (("40P01", True), ("53100", True), ("57014", True), ("08006", True), ("54000", False),
                         ("55000", False)):
        assert waits_for_a_resource(OperationalError("SELECT 1", {}, DriverError(state))) is waits, state


def test_a_cycle_keeps_no_classified_image_s_pixels_while_it_classifies_the_next(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """After a restart with a backlog, one cycle classifies up to ``batch_size`` studies before it
    reports any. The old code kept every classified data set, pixels and all (7 MB for this CR), until
    its study's report: 504 queued images took the node to 3.9 GB and an OOM kill. Now an image keeps
    its header and its preview; the pixel data held at once is one batch's."""
    import tracemalloc

    studies = [receive(world, "RG1_UNCI.dcm") for _ in range(11)]
    pipeline = make_pipeline(world, batch_size=2)
    pipeline.process(studies[:1])  # the model warmed up and its first allocations made

    def peak(pks: list[int]) -> int:
        tracemalloc.start()
        try:
            pipeline.process(pks)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    two, eight = peak(studies[1:3]), peak(studies[3:])
    pixel_data = 1955 * 1841 * 2
    assert eight - two < 2 * pixel_data, (eight - two) / pixel_data  # the old code: 6 more images' worth
    with session_scope(world["db"]) as session:
        assert {session.get_one(Study, pk).state for pk in studies} == {StudyState.ANALYSED}


def test_results_keep_their_uids_through_a_crash_before_building(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_pk = receive(world, "RG1_UNCI.dcm")
    first = make_pipeline(world)

    monkeypatch.setattr(first, "_build_missing", crash)
    with pytest.raises(Crash):
        first.process([study_pk])
    before = result_rows(world, study_pk)
    assert set(before) == {ResultKind.SR, ResultKind.PDF}
    assert not any((world["config"].results_dir / path).exists() for _, path in before.values())

    resumed = make_pipeline(world)
    assert resumed.unfinished_studies() == [study_pk]
    resumed.start()
    assert resumed.wait_idle(60)
    resumed.stop()

    assert result_rows(world, study_pk) == before
    sr = pydicom.dcmread(world["config"].results_dir / before[ResultKind.SR][1])
    assert sr.SOPInstanceUID == before[ResultKind.SR][0]
    assert sorted(peer.received) == sorted(uid for uid, _ in before.values())
    with session_scope(world["db"]) as session:
        assert session.scalar(select(func.count()).select_from(Finding)) == 1


def test_a_crash_after_writing_never_rebuilds_or_duplicates(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_pk = receive(world, "RG1_UNCI.dcm")
    first = make_pipeline(world)

    monkeypatch.setattr(first, "_finalise", crash)
    with pytest.raises(Crash):
        first.process([study_pk])
    rows = result_rows(world, study_pk)
    written = {kind: (world["config"].results_dir / path).read_bytes() for kind, (_, path) in rows.items()}

    second = make_pipeline(world)
    second.process([study_pk])
    second.process([study_pk])  # a duplicate "study ready" changes nothing

    assert result_rows(world, study_pk) == rows
    for kind, (_, path) in rows.items():
        assert (world["config"].results_dir / path).read_bytes() == written[kind]
    assert len(peer.received) == 2 and len(set(peer.received)) == 2
    with session_scope(world["db"]) as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 2


def assert_skipped_without_results(world: dict[str, Any], peer: StorePeer, study_pk: int, reason: str) -> None:
    """Processed by the default pipeline: SKIPPED with ``reason``, no finding, nothing sent."""
    make_pipeline(world).process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.SKIPPED
        assert study.state_reason == reason
        assert session.scalar(select(func.count()).select_from(Finding)) == 0
    assert peer.received == []


def test_the_not_analysed_notice_names_every_image_it_is_about_as_its_source(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """The notice gives the reasons for each of the study's images, but its Source Instance Sequence named
    the first only: a PACS or viewer following it found one of the two images the document is about."""
    study_pk = receive(world, "RG3_UNCI.dcm", settle=False)
    receive(world, "RG3_UNCI.dcm", study_uid=study_uid_of(world, study_pk))
    make_pipeline(world, send_skipped=True).process([study_pk])
    notice = pydicom.dcmread(world["config"].results_dir / result_rows(world, study_pk)[ResultKind.PDF][1])
    named = {item.ReferencedSOPInstanceUID for item in notice.SourceInstanceSequence}
    assert named == instance_uids(world, study_pk) and len(named) == 2


def test_non_chest_is_skipped_and_answered_only_when_configured(world: dict[str, Any], peer: StorePeer) -> None:
    assert_skipped_without_results(world, peer, receive(world, "RG3_UNCI.dcm"), "body part EXTREMITY is not CHEST")

    told = receive(world, "RG3_UNCI.dcm")
    make_pipeline(world, send_skipped=True).process([told])
    rows = result_rows(world, told)
    assert set(rows) == {ResultKind.PDF}
    notice = pydicom.dcmread(world["config"].results_dir / rows[ResultKind.PDF][1])
    text = PdfReader(BytesIO(bytes(notice.EncapsulatedDocument))).pages[0].extract_text()
    assert "body part EXTREMITY is not CHEST" in text
    assert peer.received == [rows[ResultKind.PDF][0]]


def test_a_header_value_that_refused_an_image_is_shown_but_not_logged(
    world: dict[str, Any], peer: StorePeer, caplog: pytest.LogCaptureFixture
) -> None:
    """Sites write free text into coded attributes (a patient's name in Body Part Examined): the console
    shows the reason with the value, the log names the check only."""
    caplog.set_level(logging.INFO)

    def free_text(ds: pydicom.Dataset) -> None:
        ds.BodyPartExamined = "ZQSMITHJ"

    assert_skipped_without_results(world, peer, receive(world, "RG1_UNCI.dcm", edit=free_text),
                                   "body part ZQSMITHJ is not CHEST")
    assert "ZQSMITHJ" not in caplog.text
    assert "skipped by the body part check" in caplog.text


def test_a_multi_frame_image_is_stored_but_not_classified(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header rows do not keep the frame count: the pipeline reads it before classifying. The old
    code classified the first frame and reported it as the finding of the image. It is refused from the
    file's header: read whole first, 5000 frames of 655 MB took 1.3 GB before the refusal (review)."""
    def two_frames(ds: pydicom.Dataset) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    def read_whole(path: Path) -> pydicom.Dataset:
        raise AssertionError(f"{path.name} read whole")

    monkeypatch.setattr(pipeline_module, "_read_dataset", read_whole)
    study_pk = receive(world, "RG1_UNCI.dcm", edit=two_frames)
    reason = "a multi-frame image (2 frames); the model reads single radiographs"
    assert_skipped_without_results(world, peer, study_pk, reason)


@pytest.mark.filterwarnings("ignore:A value of type 'str' cannot be assigned")  # a damaged header, as meant
@pytest.mark.parametrize(("rows", "columns", "refused"), [(8000, 8001, True), (8000, 8000, False),
                                                          ("", 9, False), ("x", 9, False)])
def test_an_image_too_large_to_decode_is_refused_from_its_header(
    rows: object, columns: int, refused: bool
) -> None:
    """Read whole before the classifier refused it: 16 images of 12000² in one batch took 4.3 GB, and
    those the memory did not hold were recorded as "stored file unreadable (MemoryError)" (review)."""
    header = pydicom.Dataset()
    header.Rows, header.Columns = rows, columns
    refusal = pipeline_module._size_refusal(header)
    if refused:
        assert refusal == (
            "image not supported: the image is too large to decode (8001 × 8000 pixels; at most 64 megapixels)"
        )
    else:
        assert refusal is None


def test_a_dx_image_for_processing_is_stored_but_not_classified(world: dict[str, Any], peer: StorePeer) -> None:
    def as_raw_dx(ds: pydicom.Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForProcessing
        ds.Modality, ds.PresentationIntentType = "DX", "FOR PROCESSING"

    assert_skipped_without_results(
        world,
        peer,
        receive(world, "RG1_UNCI.dcm", edit=as_raw_dx),
        "a DX image for processing (raw detector data), not for presentation",
    )


def test_a_child_is_stored_but_not_classified_unless_configured(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """By Patient Age when there is one, else by birth date and study date; the reason names no age."""

    def aged_four(ds: pydicom.Dataset) -> None:
        ds.PatientAge = "004Y"

    def born_three_years_before(ds: pydicom.Dataset) -> None:  # another patient: RG1's is born in 1940
        ds.PatientID, ds.PatientBirthDate, ds.StudyDate = "CHILD1", "20010826", "20040826"

    reason = "the patient is younger than 18 years by Patient Age or Birth Date"
    assert_skipped_without_results(world, peer, receive(world, "RG1_UNCI.dcm", edit=aged_four), reason)
    born_2001 = receive(world, "RG1_UNCI.dcm", edit=born_three_years_before)
    assert_skipped_without_results(world, peer, born_2001, reason)

    allowed = receive(world, "RG1_UNCI.dcm", edit=aged_four)
    make_pipeline(world, ages=AgePolicy(minimum_years=0.0)).process([allowed])
    with session_scope(world["db"]) as session:
        study = session.get(Study, allowed)
        assert study is not None and study.patient_age == "004Y"
        assert study.state is not StudyState.SKIPPED
        assert session.scalar(select(func.count()).select_from(Finding)) == 1


def test_a_header_without_an_age_is_classified_with_a_caution_or_skipped_when_configured(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """As many anonymised archives send them: no Patient Age, no birth date. The SR and the PDF ask the
    reader to confirm an adult; with ``pipeline.skip_unknown_age`` the image is stored, not classified."""

    def anonymised(ds: pydicom.Dataset) -> None:  # another patient: RG1's is born in 1940
        ds.PatientID, ds.PatientBirthDate = "NOAGE1", ""
        if "PatientAge" in ds:
            del ds.PatientAge

    unaged = receive(world, "RG1_UNCI.dcm", edit=anonymised)
    make_pipeline(world).process([unaged])
    quality, text = doubt_in_results(world, unaged)
    assert quality.count(codes.AGE_UNKNOWN.value) == 1
    assert AGE_UNKNOWN_HEADLINE in text and "Confirm the patient's age" in text

    aged = receive(world, "RG1_UNCI.dcm")  # born 1940, examined 2004
    make_pipeline(world).process([aged])
    quality, text = doubt_in_results(world, aged)
    assert codes.AGE_UNKNOWN.value not in quality and AGE_UNKNOWN_HEADLINE not in text

    skipped = receive(world, "RG1_UNCI.dcm", edit=anonymised)
    make_pipeline(world, ages=AgePolicy(skip_unknown=True)).process([skipped])
    with session_scope(world["db"]) as session:
        study = session.get(Study, skipped)
        assert study is not None and study.state is StudyState.SKIPPED
        assert study.state_reason == UNKNOWN_AGE
        assert session.scalar(select(func.count()).select_from(Finding)) == 2  # the two above
    assert len(peer.received) == 4  # an SR and a PDF for each classified study, none for the skipped one


def test_a_secondary_capture_with_a_bare_patient_age_is_judged_by_it(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """As the RSNA Pneumonia Detection Challenge's chest radiographs were converted: Secondary Capture
    Image Storage, Modality CR, and a Patient Age without its unit ("58", not "058Y"), read as years."""

    def converted(age: str) -> Callable[[pydicom.Dataset], None]:
        def edit(ds: pydicom.Dataset) -> None:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
            ds.ConversionType = "WSD"
            ds.add(DataElement(0x00101010, "AS", age, validation_mode=config.IGNORE))  # not a valid AS

        return edit

    reason = "the patient is younger than 18 years by Patient Age or Birth Date"
    assert_skipped_without_results(world, peer, receive(world, "RG1_UNCI.dcm", edit=converted("7")), reason)

    adult = receive(world, "RG1_UNCI.dcm", edit=converted("58"))
    make_pipeline(world).process([adult])
    with session_scope(world["db"]) as session:
        study = session.get(Study, adult)
        assert study is not None and study.state is StudyState.ANALYSED and study.patient_age == "58"
    rows = result_rows(world, adult)
    assert set(rows) == {ResultKind.SR, ResultKind.PDF}
    assert sorted(peer.received) == sorted(uid for uid, _ in rows.values())


def test_a_leg_labelled_chest_is_stored_but_not_classified_by_its_pixels(world: dict[str, Any], peer: StorePeer) -> None:
    """The header check passes a lower leg whose header says CHEST PA; the model's novelty check does not."""

    def mislabelled(ds: pydicom.Dataset) -> None:
        ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"

    assert getattr(world["classifier"], "novelty", None) is not None, "the shipped model has a novelty check"
    leg = receive(world, "RG3_UNCI.dcm", edit=mislabelled)
    make_pipeline(world).process([leg])
    with session_scope(world["db"]) as session:
        study = session.get(Study, leg)
        assert study is not None and study.state is StudyState.SKIPPED
        assert study.state_reason.startswith("the image does not look like the chest radiographs")
        assert session.scalar(select(func.count()).select_from(Finding)) == 0
    assert peer.received == []

    # An operator who turns the check off gets the model's answer, with the doubt in the SR and the PDF.
    again = receive(world, "RG3_UNCI.dcm", edit=mislabelled)
    make_pipeline(world, skip_unfamiliar=False).process([again])
    with session_scope(world["db"]) as session:
        study = session.get(Study, again)
        assert study is not None and study.state is StudyState.ANALYSED
        assert session.scalar(select(func.count()).select_from(Finding)) == 1
    quality, text = doubt_in_results(world, again)
    assert quality == [codes.UNFAMILIAR.value]
    assert "THE MODEL'S OWN CHECKS DOUBT THIS IMAGE" in text
    assert "does not look like the chest radiographs the model was trained on" in text


def test_an_image_upside_down_without_patient_orientation_is_stored_but_not_classified(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """Nothing in the header says which way is up, and the pixels are upside down: the model's turn check
    skips the image rather than reading a misplaced chest (it used to come out indeterminate)."""

    def upside_down(ds: pydicom.Dataset) -> None:
        ds.PixelData = np.ascontiguousarray(np.rot90(ds.pixel_array, 2)).tobytes()
        del ds.PatientOrientation

    assert_skipped_without_results(
        world,
        peer,
        receive(world, "RG1_UNCI.dcm", edit=upside_down),
        "the image looks the wrong way up: the model knows it better turned upside down; send it head up, "
        "or with a correct Patient Orientation",
    )

    # Classified anyway when the operator turns the checks off: the finding keeps the turn, and the SR and
    # the PDF say the model doubted the image.
    again = receive(world, "RG1_UNCI.dcm", edit=upside_down)
    make_pipeline(world, skip_unfamiliar=False).process([again])
    with session_scope(world["db"]) as session:
        assert session.scalars(select(Finding)).one().better_turn == 2
    quality, text = doubt_in_results(world, again)
    assert quality == [codes.WRONG_WAY_UP.value]
    assert "THE MODEL'S OWN CHECKS DOUBT THIS IMAGE" in text
    assert "the model knows it better turned upside down" in text


def test_a_negative_is_stored_but_not_classified(world: dict[str, Any], peer: StorePeer) -> None:
    """RG1 is MONOCHROME1. Relabelled MONOCHROME2 on the way, it reaches the model as a negative; it passes
    the novelty check (0.95) and used to be called covid. The negative check skips it with a reason that
    names the header to fix; classified anyway, the SR and the PDF say so."""

    def relabelled(ds: pydicom.Dataset) -> None:
        ds.PhotometricInterpretation = "MONOCHROME2"
        if "PresentationLUTShape" in ds:
            del ds.PresentationLUTShape

    reason = (
        "the image looks like a negative (bone dark, lungs light): the model knows it better inverted; "
        "check its Photometric Interpretation (MONOCHROME1 or MONOCHROME2) and Presentation LUT Shape"
    )
    assert_skipped_without_results(world, peer, receive(world, "RG1_UNCI.dcm", edit=relabelled), reason)

    again = receive(world, "RG1_UNCI.dcm", edit=relabelled)
    make_pipeline(world, skip_unfamiliar=False).process([again])
    with session_scope(world["db"]) as session:
        assert session.scalars(select(Finding)).one().negative
    quality, text = doubt_in_results(world, again)
    assert quality == [codes.NEGATIVE.value]
    assert "THE MODEL'S OWN CHECKS DOUBT THIS IMAGE" in text
    assert "the model knows it better inverted" in text


def test_studies_ready_together_are_classified_in_one_batch(world: dict[str, Any], peer: StorePeer) -> None:
    studies = [receive(world, "RG1_UNCI.dcm") for _ in range(3)]
    pipeline = make_pipeline(world)
    for pk in studies:
        pipeline.submit(pk)  # all three ready before the worker looks
    pipeline.start()
    assert pipeline.wait_idle(120)
    pipeline.stop()
    with session_scope(world["db"]) as session:
        findings = list(session.scalars(select(Finding)))
        assert len(findings) == 3
        assert [f.timings_ms["batch_size"] for f in findings] == [3, 3, 3]
        assert {s.state for s in session.scalars(select(Study))} == {StudyState.ANALYSED}
    assert len(peer.received) == 6


def test_a_corrupt_image_whose_decoder_panics_is_skipped_and_the_worker_goes_on(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """pylibjpeg-rle panics on some corrupt RLE data, and a panic is not an Exception: before it was
    turned into a refusal it ended the worker thread, and every later study waited for a restart that
    would have met the same image first."""
    corrupt = receive(world, "RG1_UNCI.dcm", edit=with_corrupt_rle_pixels)
    pipeline = make_pipeline(world)
    pipeline.submit(corrupt)
    # one batch: the corrupt image must not sink its neighbour either
    pipeline.submit(receive(world, "RG1_UNCI.dcm"))
    pipeline.start()
    try:
        assert pipeline.wait_idle(60)
        pipeline.submit(receive(world, "RG1_UNCI.dcm"))  # the same worker takes the next study
        assert pipeline.wait_idle(60)
    finally:
        pipeline.stop()
    with session_scope(world["db"]) as session:
        skipped = session.get(Study, corrupt)
        assert skipped is not None and skipped.state is StudyState.SKIPPED
        assert skipped.state_reason.startswith(
            "image not supported: pixel data cannot be decoded (the decoder failed: PanicException"
        )
        states = [study.state for study in session.scalars(select(Study).where(Study.id != corrupt))]
        assert states == [StudyState.ANALYSED, StudyState.ANALYSED]
        assert session.scalar(select(func.count()).select_from(Finding)) == 2


def test_an_image_that_cannot_be_read_leaves_its_batch_decoded_once(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch went to the model as a whole, and one refused image made the node decode every image
    again, one by one, to find it: 2× the decoding (a JPEG 2000 CR costs 80 ms) for each image of the
    batch. The refused image now has its reason in its place and the others are one batch."""
    import classifier.inference

    decoded: list[int] = []
    real = classifier.inference.dataset_to_gray

    def counting(ds: pydicom.Dataset, *args: Any, **kwargs: Any) -> Any:
        decoded.append(id(ds))
        return real(ds, *args, **kwargs)

    monkeypatch.setattr(classifier.inference, "dataset_to_gray", counting)
    first = receive(world, "RG1_UNCI.dcm")
    corrupt = receive(world, "RG1_UNCI.dcm", edit=with_corrupt_rle_pixels)
    last = receive(world, "RG1_UNCI.dcm")
    pipeline = make_pipeline(world)
    for study in (first, corrupt, last):
        pipeline.submit(study)
    pipeline.start()
    try:
        assert pipeline.wait_idle(60)
    finally:
        pipeline.stop()
    assert len(decoded) == len(set(decoded)) == 3
    assert "classifying one by one" not in caplog.text
    with session_scope(world["db"]) as session:
        assert [f.timings_ms["batch_size"] for f in session.scalars(select(Finding))] == [3, 3]
        skipped = session.get(Study, corrupt)
        assert skipped is not None and skipped.state is StudyState.SKIPPED
        assert skipped.state_reason.startswith("image not supported: pixel data cannot be decoded")

def test_the_worker_outlives_a_cycle_ended_by_something_that_is_not_an_exception(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The second line behind the decoder boundary: whatever else escapes a cycle as a BaseException
    (another native library's panic) is logged, without its message, and the worker goes on."""

    class Panic(BaseException):
        pass

    pipeline = make_pipeline(world)
    process = pipeline.process
    calls: list[list[int]] = []
    message = f"{SENTINEL} quoted in a message"

    def first_cycle_panics(study_pks: list[int]) -> None:
        calls.append(list(study_pks))
        if len(calls) == 1:
            raise Panic(message)
        process(study_pks)

    monkeypatch.setattr(pipeline, "process", first_cycle_panics)
    pipeline.start()
    try:
        pipeline.submit(receive(world, "RG1_UNCI.dcm"))
        assert pipeline.wait_idle(60)
        pipeline.submit(second := receive(world, "RG1_UNCI.dcm"))
        assert pipeline.wait_idle(60)
        assert pipeline.alive
    finally:
        pipeline.stop()
    with session_scope(world["db"]) as session:
        study = session.get(Study, second)
        assert study is not None and study.state is StudyState.ANALYSED
    assert "Panic" in caplog.text and "SENTINEL" not in caplog.text


@pytest.mark.parametrize(("threshold", "warned"), [(0.5, True), (0.0, False), (0.6, False)])
def test_a_threshold_no_image_of_the_model_can_fall_below_is_named_at_load(
    threshold: float, warned: bool, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A two-class model's top probability is at least 0.5: at the default threshold no image was ever
    indeterminate, and a coin toss was reported as a COVID-19 finding without a word (review)."""
    merge = {"normal": "non-covid", "pneumonia": "non-covid"}
    folder = tiny_model(tmp_path_factory.getbasetemp(), relabel=merge)
    settings = Settings(node={"data_dir": tmp_path_factory.mktemp("node")},
                        pipeline={"model_path": folder, "indeterminate_threshold": threshold})
    caplog.set_level(logging.WARNING, logger="dicom_node.pipeline")
    load_classifier(settings)
    assert ("marks no image indeterminate with this model of 2 classes" in caplog.text) is warned


def test_a_model_with_a_class_the_reports_cannot_code_is_refused_when_it_is_loaded(tmp_path: Path) -> None:
    """A site may train its own classes; the node must say at start-up that it cannot report them, not
    classify every study and then fail to build each SR and PDF."""
    from classifier.errors import ModelArtifactError

    lesion = tiny_model(tmp_path, relabel={"covid": "lesion", "normal": "clear", "pneumonia": "lesion"})
    settings = Settings(node={"data_dir": tmp_path}, pipeline={"model_path": lesion})
    with pytest.raises(ModelArtifactError, match=r"classes \['clear', 'lesion'\] have no coded concept"):
        load_classifier(settings)


def test_without_a_model_studies_stay_queued_for_the_next_start(world: dict[str, Any], peer: StorePeer) -> None:
    from classifier.errors import ModelArtifactError

    study_pk = receive(world, "RG1_UNCI.dcm")

    def missing_model() -> ImageClassifier:
        raise ModelArtifactError("model.json missing")

    Pipeline(world["db"], world["config"], missing_model, outbox=world["outbox"]).process([study_pk])
    with session_scope(world["db"]) as session:
        assert session.scalars(select(Job)).one().state is JobState.PENDING
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.READY
        assert "model unavailable" in study.state_reason
    resumed = make_pipeline(world)
    assert resumed.unfinished_studies() == [study_pk]
    resumed.process([study_pk])
    assert len(peer.received) == 2


def test_after_a_model_change_a_late_image_s_report_covers_the_study_s_earlier_images(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """The first image was classified by version 1, the late one by version 2: version 2's report held
    the late image alone, "Images analysed 1", while its covers said both (review)."""
    import copy

    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first = world["classifier"]
    upgraded = copy.copy(first)
    upgraded._metadata = replace(first._metadata, version=first._metadata.version + "-upgraded")
    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk))
    Pipeline(world["db"], world["config"], lambda: upgraded, outbox=world["outbox"]).process([study_pk])
    with session_scope(world["db"]) as session:
        versions = [finding.model_version for finding in session.scalars(select(Finding))]
        assert sorted(versions) == sorted([first.info.version, upgraded.info.version, upgraded.info.version])
        [path] = session.scalars(
            select(ResultObject.file_path).where(
                ResultObject.kind == ResultKind.SR, ResultObject.model_version == upgraded.info.version
            )
        )
    assert len(tracked(world, path)) == 2
    assert len(peer.received) == 4


def test_after_a_model_change_an_earlier_image_whose_file_was_removed_is_named_in_the_late_report(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """Version 1 classified the first image, then retention removed its file, then a late image came to
    a node running version 2. Version 2 cannot read the first image again, and its report held the late
    image alone, "Images analysed 1 of 1": the first image was in neither the analysed nor the not
    analysed list, without a word. Now the PDF names it as not analysed by this model, with why."""
    import copy

    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    with session_scope(world["db"]) as session:  # what dicom_node.retention does
        first = session.scalars(select(Instance)).one()
        (world["config"].storage_dir / first.file_path).unlink()
        first.purged_at = utcnow()
    upgraded = copy.copy(world["classifier"])
    upgraded._metadata = replace(upgraded._metadata, version=upgraded._metadata.version + "-upgraded")
    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk))
    Pipeline(world["db"], world["config"], lambda: upgraded, outbox=world["outbox"]).process([study_pk])
    with session_scope(world["db"]) as session:
        assert session.get_one(Study, study_pk).state is StudyState.ANALYSED
        [path] = session.scalars(
            select(ResultObject.file_path).where(
                ResultObject.kind == ResultKind.PDF, ResultObject.model_version == upgraded.info.version
            )
        )
    pdf = pydicom.dcmread(world["config"].results_dir / path)
    reader = PdfReader(BytesIO(bytes(pdf.EncapsulatedDocument)))
    text = " ".join(" ".join(page.extract_text().split()) for page in reader.pages)
    assert "Images analysed 1 of 2" in text
    assert "1 OTHER IMAGE OF THIS STUDY NOT ANALYSED" in text
    assert "its file was removed before this model could read it" in text


def test_a_revision_made_under_another_threshold_labels_every_image_by_the_threshold_it_records(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """The first image was labelled COVID-19 at threshold 0.5; a late one came after the threshold was set
    to 0.99. The revision recorded 0.99 for both images, yet coded the first COVID-19 and the second, with
    the same probabilities, Indeterminate (review)."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    with session_scope(world["db"]) as session:
        assert session.scalars(select(Finding.label)).one() == "covid"
    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk))
    make_pipeline(world, indeterminate_threshold=0.99).process([study_pk])
    with session_scope(world["db"]) as session:
        assert sorted(session.scalars(select(Finding.label))) == ["indeterminate", "indeterminate"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(
        pydicom.dcmread(world["config"].results_dir / result_rows(world, study_pk)[ResultKind.SR][1])
    )
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        [evaluation] = group.get_qualitative_evaluations(name=codes.IMAGING_FINDING)
        assert evaluation.value == codes.INDETERMINATE_CODE


def test_an_image_skipped_beside_a_classified_one_is_named_in_the_pdf_with_its_reason(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """A lateral view beside a PA one: the report covered the PA image, said "Images analysed 1", and
    the lateral view and the reason it was skipped were in the console only (review)."""
    study_pk = receive(world, "RG1_UNCI.dcm", settle=False)

    def lateral(ds: pydicom.Dataset) -> None:
        ds.ViewPosition = "LL"

    def key_object(ds: pydicom.Dataset) -> None:  # no image: stored for the study, and not named
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"

    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk), edit=lateral, settle=False)
    receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk), edit=key_object)
    make_pipeline(world).process([study_pk])
    with session_scope(world["db"]) as session:
        assert sorted(i.state for i in session.scalars(select(Instance))) == [
            InstanceState.ANALYSED, InstanceState.SKIPPED, InstanceState.SKIPPED
        ]
    _, text = doubt_in_results(world, study_pk)
    assert "Images analysed 1 of 2" in text
    assert "1 OTHER IMAGE OF THIS STUDY NOT ANALYSED" in text
    assert "view position LL is not frontal (PA/AP)" in text


def test_optional_heat_map_secondary_capture_is_built_and_sent(world: dict[str, Any], peer: StorePeer) -> None:
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world, heatmap=True, secondary_capture=True).process([study_pk])
    rows = result_rows(world, study_pk)
    assert set(rows) == {ResultKind.SR, ResultKind.PDF, ResultKind.HEATMAP_SC}
    sc = pydicom.dcmread(world["config"].results_dir / rows[ResultKind.HEATMAP_SC][1])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.SOPInstanceUID == rows[ResultKind.HEATMAP_SC][0]
    with session_scope(world["db"]) as session:
        finding = session.scalars(select(Finding)).one()
        assert finding.heatmap_path and (world["config"].results_dir / finding.heatmap_path).is_file()
    assert sorted(peer.received) == sorted(uid for uid, _ in rows.values())


def test_a_heat_map_without_a_preview_leaves_the_sc_out_and_sends_the_sr_and_pdf(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optional heat-map SC needs a preview of the image; when there is none (here the display
    conversion fails), the SR and PDF still go out and the study is ANALYSED. The SC used to raise
    NoHeatmapError, which failed the whole study with its SR and PDF already written and never sent."""

    def no_picture(*_args: Any, **_kwargs: Any) -> None:
        raise ValueError("no picture")

    monkeypatch.setattr("classifier.preprocess.display_image", no_picture)
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world, heatmap=True, secondary_capture=True).process([study_pk])
    rows = result_rows(world, study_pk)
    assert set(rows) == {ResultKind.SR, ResultKind.PDF}
    assert sorted(peer.received) == sorted(uid for uid, _ in rows.values())
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.ANALYSED


# Non-image objects and the node's own results sent back (a study-level send from the PACS) -----------------


def send_non_image(
    world: dict[str, Any], study_pk: int | None, sop_class: str, *, modality: str = "SR"
) -> Any:
    """Ingest a non-image object of ``sop_class`` into the study (None: a new study), as ORTHANC sends it."""
    from tests.node_datasets import make_non_image, to_bytes

    if study_pk is None:
        like = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
        like.PatientID, like.PatientName, like.StudyInstanceUID = "SENTINEL-ID", SENTINEL, generate_uid()
    else:
        with session_scope(world["db"]) as session:
            instance = session.scalars(
                select(Instance).join(Series).where(Series.study_pk == study_pk)).first()
            assert instance is not None
            like = pydicom.dcmread(world["config"].storage_dir / instance.file_path)
    ds = make_non_image(sop_class, like=like, modality=modality)
    return ingest_bytes(world["db"], world["store"], to_bytes(ds), calling_ae="ORTHANC", source="dimse")


DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"


def test_the_nodes_own_results_sent_back_are_success_and_not_stored_again(
    world: dict[str, Any], peer: StorePeer, caplog: pytest.LogCaptureFixture
) -> None:
    """Orthanc sends a whole study back to the node ("send study to AI", a viewer's C-MOVE) once the node's
    SR, PDF and heat map are in it. The old node refused the SR and PDF (Orthanc then aborts the whole
    transfer) and stored its own heat-map SC as a new instance, which reopened the analysed study."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world, heatmap=True, secondary_capture=True).process([study_pk])
    with session_scope(world["db"]) as session:
        own = {row.id: row.file_path for row in session.scalars(select(ResultObject))}
    assert len(own) == 3
    sent = len(peer.received)
    caplog.set_level(logging.INFO, logger="dicom_node.ingest")
    stored: list[Any] = []
    for object_pk, path in own.items():
        result = ingest_bytes(world["db"], world["store"], (world["config"].results_dir / path).read_bytes(),
                              calling_ae="ORTHANC", source="dimse", on_stored=stored.append)
        assert result.own_result == object_pk and result.study_pk == study_pk and result.duplicate
        line = f"result object {object_pk} sent back by ORTHANC: the node's own, not stored again"
        assert line in caplog.text
    assert stored == []  # no settle timer armed
    with session_scope(world["db"]) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.ANALYSED
        assert session.scalar(select(func.count()).select_from(ResultObject)) == 3
    assert len([path for path in world["store"].root.rglob("*") if path.is_file()]) == 1
    assert len(peer.received) == sent
    assert "SENTINEL" not in caplog.text

    # a copy of its SR filed under another study (a PACS merged studies): refused, as for any instance
    sr = pydicom.dcmread(world["config"].results_dir / result_rows(world, study_pk)[ResultKind.SR][1])
    sr.StudyInstanceUID = generate_uid()
    with pytest.raises(IdentityConflictError, match="a result of another study"):
        ingest_bytes(world["db"], world["store"], dataset_bytes(sr), calling_ae="ORTHANC", source="dimse")

    # a copy of its SR in the same study but under another Patient ID (a PACS re-identified it): refused
    sr = pydicom.dcmread(world["config"].results_dir / result_rows(world, study_pk)[ResultKind.SR][1])
    sr.PatientID = "SOMEONE-ELSE"
    with pytest.raises(IdentityConflictError, match="under another Patient ID"):
        ingest_bytes(world["db"], world["store"], dataset_bytes(sr), calling_ae="ORTHANC", source="dimse")


def test_a_dose_sr_under_another_patient_id_is_an_identity_conflict(world: dict[str, Any]) -> None:
    """A non-image object is checked as an image is: a study belongs to one patient."""
    study_pk = receive(world, "RG1_UNCI.dcm", settle=False)
    from tests.node_datasets import make_non_image, to_bytes

    with session_scope(world["db"]) as session:
        instance = session.scalars(select(Instance)).one()
        like = pydicom.dcmread(world["config"].storage_dir / instance.file_path)
    like.PatientID = "SOMEONE-ELSE"
    with pytest.raises(IdentityConflictError, match="another Patient ID"):
        ingest_bytes(world["db"], world["store"], to_bytes(make_non_image(DOSE_SR, like=like)),
                     calling_ae="ORTHANC", source="dimse")
    assert instance_uids(world, study_pk) == {instance.sop_instance_uid}


def test_a_dose_sr_and_a_foreign_pdf_are_stored_skipped_and_leave_an_analysed_study_as_it_was(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """A modality's dose SR and an outside PDF in a study-level send: stored (file and row) before Success,
    SKIPPED as not images; the analysed study is not reopened and gets no new revision of its results."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    before = result_rows(world, study_pk)
    sent = sorted(peer.received)
    with session_scope(world["db"]) as session:
        last_image = session.get_one(Study, study_pk).last_received_at
    dose = send_non_image(world, study_pk, DOSE_SR)
    pdf = send_non_image(world, study_pk, PDF_STORAGE, modality="DOC")
    assert not dose.duplicate and not pdf.duplicate and dose.study_pk == pdf.study_pk == study_pk
    with session_scope(world["db"]) as session:
        reasons = {}
        for pk in (dose.instance_pk, pdf.instance_pk):
            instance = session.get(Instance, pk)
            assert instance is not None and instance.state is InstanceState.SKIPPED
            assert (world["config"].storage_dir / instance.file_path).is_file()
            reasons[pk] = instance.state_reason
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.ANALYSED and study.state_reason == ""
        assert session.scalars(select(Job)).one().state is JobState.DONE  # no new job
        # retention and the dashboard count from a study's last image: a re-sent dose SR moved that on
        assert study.last_received_at == last_image
    assert reasons == {dose.instance_pk: "not an image (X-Ray Radiation Dose SR Storage): not analysed",
                       pdf.instance_pk: "not an image (Encapsulated PDF Storage): not analysed"}
    make_pipeline(world).process([study_pk])  # even asked to, the pipeline makes nothing new
    assert result_rows(world, study_pk) == before
    assert sorted(peer.received) == sent


def test_a_cr_with_a_dose_sr_is_analysed_and_a_study_of_only_a_dose_sr_is_skipped_with_that_reason(
    world: dict[str, Any], peer: StorePeer
) -> None:
    study_pk = receive(world, "RG1_UNCI.dcm", settle=False)
    image_uids = instance_uids(world, study_pk)
    send_non_image(world, study_pk, DOSE_SR)
    settled(world, study_pk)
    make_pipeline(world, send_skipped=True).process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.ANALYSED, study.state_reason if study else ""
    rows = result_rows(world, study_pk)
    assert set(rows) == {ResultKind.SR, ResultKind.PDF}
    assert evidence(world, rows[ResultKind.SR][1]) == image_uids  # the dose SR is not reported on

    # a dose SR on its own (sent before the images, or without them): SKIPPED, and no "not analysed" notice
    other_pk = send_non_image(world, None, DOSE_SR).study_pk
    settled(world, other_pk)
    make_pipeline(world, send_skipped=True).process([other_pk])
    with session_scope(world["db"]) as session:
        study = session.get(Study, other_pk)
        assert study is not None and study.state is StudyState.SKIPPED
        assert study.state_reason == "not an image (X-Ray Radiation Dose SR Storage): not analysed"
    assert result_rows(world, other_pk) == {}


@pytest.mark.parametrize("by", ["age", "birth date"])
def test_a_childs_radiograph_after_a_non_image_without_an_age_is_not_classified(
    world: dict[str, Any], peer: StorePeer, by: str
) -> None:
    """The study and patient rows took their values from the first object only. A key-object note or dose
    SR, whose Patient Study module is optional, came first without an age, and the radiograph of an
    eight-year-old that followed was classified with an "age unknown" caution (review). Values the first
    object left empty are now taken from the next."""
    from tests.node_datasets import make_non_image, to_bytes

    like = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    like.PatientID, like.PatientName, like.StudyInstanceUID = "SENTINEL-ID", SENTINEL, generate_uid()
    del like.PatientBirthDate
    note_bytes = to_bytes(make_non_image(KEY_OBJECT, like=like, modality="KO"))
    note = ingest_bytes(world["db"], world["store"], note_bytes, calling_ae="ORTHANC", source="dimse")

    def a_child(ds: pydicom.Dataset) -> None:  # eight years old at the study (2004-08-26)
        if by == "age":
            ds.PatientAge = "008Y"
            del ds.PatientBirthDate
        else:
            ds.PatientBirthDate = "19960301"

    study_pk = receive(world, "RG1_UNCI.dcm", study_uid=like.StudyInstanceUID, edit=a_child)
    assert study_pk == note.study_pk
    make_pipeline(world).process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None
        expected = ("008Y", "") if by == "age" else ("", "19960301")
        assert (study.patient_age, study.patient.birth_date) == expected
        image = session.scalars(select(Instance).where(Instance.sop_class_uid != KEY_OBJECT)).one()
        assert image.state is InstanceState.SKIPPED
        assert "younger than 18 years" in image.state_reason
        assert session.scalar(select(func.count()).select_from(Finding)) == 0
    assert peer.received == []


KEY_OBJECT = "1.2.840.10008.5.1.4.1.1.88.59"


def test_the_not_analysed_notice_gives_the_images_reason_not_a_dose_srs(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """A leg radiograph sent with the modality's dose SR: the "not analysed" notice to the PACS said
    "body part EXTREMITY is not CHEST; not an image (X-Ray Radiation Dose SR Storage)…" (review)."""
    study_pk = receive(world, "RG3_UNCI.dcm", settle=False)
    send_non_image(world, study_pk, DOSE_SR)
    settled(world, study_pk)
    make_pipeline(world, send_skipped=True).process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get(Study, study_pk)
        assert study is not None and study.state is StudyState.SKIPPED
        assert study.state_reason == "body part EXTREMITY is not CHEST"
    rows = result_rows(world, study_pk)
    assert set(rows) == {ResultKind.PDF}
    notice = pydicom.dcmread(world["config"].results_dir / rows[ResultKind.PDF][1])
    assert b"not an image" not in bytes(notice.EncapsulatedDocument)


def test_a_read_error_that_passes_holds_back_its_study_only_and_it_is_tried_again(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error of a network file system, or memory short for a moment, while an image was read:
    the image failed for good ("stored file unreadable") and its study with it, with no result, until an
    image of it was sent again (review). Now that study waits to be tried again, its image RECEIVED; the
    other study of the same cycle is analysed and reported."""
    held = receive(world, "RG1_UNCI.dcm")
    other = receive(world, "RG1_UNCI.dcm")
    with failing_reads(monkeypatch, "_read_dataset", errno.EIO, only=first_file(world, held)):
        make_pipeline(world).process([held, other])
    with session_scope(world["db"]) as session:
        study = session.get_one(Study, held)
        assert study.state is StudyState.READY and "could not be read now (OSError)" in study.state_reason
        assert session.scalars(
            select(Instance.state).join(Series).where(Series.study_pk == held)
        ).one() is InstanceState.RECEIVED
        assert session.get_one(Study, other).state is StudyState.ANALYSED
    assert len(peer.received) == 2  # the other study's SR and PDF

    make_pipeline(world).process([held])  # the file system is back
    with session_scope(world["db"]) as session:
        assert session.get_one(Study, held).state is StudyState.ANALYSED
    assert len(peer.received) == 4


def test_after_a_model_change_a_study_whose_every_analysed_image_was_removed_is_not_failed(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """Version 1 classified the study's only chest image, retention removed its file, and a leg image of
    the study came to a node running version 2. Version 2 had no image to report on, and the study was
    FAILED, "analysed images could not be reloaded", an alert for a study whose results stand. It stays
    ANALYSED, with the earlier model's results, and says why this model made none."""
    import copy

    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    assert len(peer.received) == 2
    with session_scope(world["db"]) as session:  # what dicom_node.retention does
        first = session.scalars(select(Instance)).one()
        (world["config"].storage_dir / first.file_path).unlink()
        first.purged_at = utcnow()
    upgraded = copy.copy(world["classifier"])
    upgraded._metadata = replace(upgraded._metadata, version=upgraded._metadata.version + "-upgraded")
    receive(world, "RG3_UNCI.dcm", study_uid=study_uid_of(world, study_pk))  # a leg: skipped
    Pipeline(world["db"], world["config"], lambda: upgraded, outbox=world["outbox"]).process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get_one(Study, study_pk)
        assert study.state is StudyState.ANALYSED, study.state_reason
        assert pipeline_module.EARLIER_MODEL_ONLY in study.state_reason
        assert pipeline_module.FILE_REMOVED in study.state_reason, study.state_reason
        assert session.scalars(select(Job.state).order_by(Job.id.desc()).limit(1)).one() is JobState.DONE
        assert session.scalars(
            select(ResultObject).where(ResultObject.model_version == upgraded.info.version)
        ).all() == []
    assert len(peer.received) == 2  # the earlier model's SR and PDF stand; nothing new is sent


@contextlib.contextmanager
def failing_reads(
    monkeypatch: pytest.MonkeyPatch, reader: str, code: int, *, only: Path | None = None
) -> Iterator[None]:
    """Inside the block the pipeline's ``reader`` (``_read_dataset``, ``_read_header``) fails with the
    error ``code`` of a network file system that passes (of ``only``, else of every file); after it, the
    file system is back."""
    read = getattr(pipeline_module, reader)

    def flaky(path: Path) -> pydicom.Dataset:
        if only is None or path.name == only.name:
            raise OSError(code, os.strerror(code))
        return cast(pydicom.Dataset, read(path))

    monkeypatch.setattr(pipeline_module, reader, flaky)
    try:
        yield
    finally:
        monkeypatch.setattr(pipeline_module, reader, read)


def first_file(world: dict[str, Any], study_pk: int) -> Path:
    """The stored file of the study's first image."""
    with session_scope(world["db"]) as session:
        path = session.scalars(
            select(Instance.file_path).join(Series).where(Series.study_pk == study_pk).order_by(Instance.id)
        ).first()
    assert path is not None
    return world["config"].storage_dir / path


def test_a_read_error_that_passes_while_a_report_rereads_an_image_holds_the_study_back(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A late image's revision reads the study's earlier image again for its picture; an I/O error of a
    network file system there failed the study for good, though the same error while classifying holds
    the study back to be tried again (review). Now it does here too."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    held = first_file(world, study_pk)
    with failing_reads(monkeypatch, "_read_dataset", errno.EIO, only=held):
        receive(world, "RG1_UNCI.dcm", study_uid=study_uid_of(world, study_pk))
        make_pipeline(world).process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get_one(Study, study_pk)
        assert study.state is StudyState.READY, study.state_reason
        assert "could not be read now (OSError)" in study.state_reason
    make_pipeline(world).process([study_pk])  # the file system is back
    with session_scope(world["db"]) as session:
        assert session.get_one(Study, study_pk).state is StudyState.ANALYSED
    assert len(peer.received) == 4


def test_an_analysed_image_whose_file_was_damaged_is_reported_from_its_rows_in_a_revision(
    world: dict[str, Any], peer: StorePeer
) -> None:
    """The earlier image's file damaged on disk after it was classified: a late image's revision could not
    read it again and the study FAILED, the late image unreported. Its findings stand: the revision
    reports on it from the database, as on an image retention removed (without its picture)."""
    study_pk = receive(world, "RG1_UNCI.dcm")
    make_pipeline(world).process([study_pk])
    first_file(world, study_pk).write_bytes(b"not DICOM any more")
    late = late_image(world, study_pk)
    with session_scope(world["db"]) as session:
        study = session.get_one(Study, study_pk)
        assert study.state is StudyState.ANALYSED, study.state_reason
    assert evidence(world, late[ResultKind.SR][1]) == instance_uids(world, study_pk)
    assert len(peer.received) == 4


def test_a_read_error_that_passes_while_a_not_analysed_notice_reads_its_image_holds_the_study_back(
    world: dict[str, Any], peer: StorePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With send_skipped, the "not analysed" notice takes its patient and study from the image's header,
    read again; an I/O error of a network file system there failed the study for good, and no notice was
    ever sent (review). The study now waits to be tried again, and the notice follows."""
    study_pk = receive(world, "RG3_UNCI.dcm")  # a leg: skipped
    with failing_reads(monkeypatch, "_read_header", errno.ESTALE):
        make_pipeline(world, send_skipped=True).process([study_pk])
    with session_scope(world["db"]) as session:
        study = session.get_one(Study, study_pk)
        assert study.state is StudyState.READY, study.state_reason
        assert "could not be read now (OSError)" in study.state_reason
    assert peer.received == []
    make_pipeline(world, send_skipped=True).process([study_pk])  # the file system is back
    with session_scope(world["db"]) as session:
        assert session.get_one(Study, study_pk).state is StudyState.SKIPPED
    assert peer.received == [result_rows(world, study_pk)[ResultKind.PDF][0]]


def test_heat_maps_of_models_whose_names_meet_in_a_file_name_are_kept_apart() -> None:
    """A model's heat maps are files named by the model's name and version, made safe for a file name: two
    versions alike in their first 48 characters, or told apart only by characters a file name does not
    keep, named the same file, and the later model's maps replaced the earlier's under its findings. Each
    name is still one ``cxr-node storage check`` takes for the node's own."""
    from dicom_node.storage import _RESULT_NAME

    long = "2026.12.07-" + "x" * 40
    pairs = [(long + "-a", long + "-b"), ("m+1", "m 1"), ("cxr-duo-1", "cxr-duo-1 ")]
    for first, second in pairs:
        assert pipeline_module._safe(first) != pipeline_module._safe(second)
        for version in (first, second):
            name = f"heatmaps/7-{pipeline_module._safe('cxr-compact+efficientnet-lite0-transfer')}-"
            assert _RESULT_NAME.fullmatch(f"{name}{pipeline_module._safe(version)}.npy")
    assert pipeline_module._safe("cxr-duo-1") == "cxr-duo-1"  # a plain name keeps its name


def test_a_stop_while_the_model_loads_does_not_wait_for_a_warm_up(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (Ctrl-C of `make run`, systemctl stop) while the model loaded at start-up: the pipeline then
    warmed the model up (a throw-away prediction, SR and PDF: 3-8 s on a busy host) before it looked at the
    stop, and the node took that much longer to exit."""
    loading, release = threading.Event(), threading.Event()

    def loader() -> ImageClassifier:
        loading.set()
        release.wait(30)
        loaded: ImageClassifier = world["classifier"]
        return loaded

    warmed: list[object] = []
    monkeypatch.setattr(Pipeline, "_warm_up", lambda self, classifier: warmed.append(classifier))
    pipeline = Pipeline(world["db"], world["config"], loader, outbox=world["outbox"])
    pipeline.start()
    assert loading.wait(30)
    stopper = threading.Thread(target=pipeline.stop, name="test-stop")
    stopper.start()
    try:
        assert pipeline._stopping.wait(10)
    finally:
        release.set()
        stopper.join(30)
    assert not stopper.is_alive()
    assert warmed == []
