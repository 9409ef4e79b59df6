"""Acceptance with a real Orthanc as the hospital PACS (Debian package, own config, loopback ports).

Orthanc forwards what a modality sends to the node with a Lua routing script; the node answers with an SR
and an Encapsulated PDF in the same study. The node runs as a subprocess (``python -m dicom_node serve``),
so it can be killed with SIGKILL and restarted on the same state. Besides Orthanc, every result also goes
to a fixed destination BACKUP where, until a test starts a second Orthanc there, nothing listens.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicom_node.store.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Finding,
    Instance,
    RemoteAe,
    ResultKind,
    ResultObject,
    Series,
    Study,
    StudyState,
)
from tests import peers
from tests.node_process import NODE_AET, NodeProcess, configured_node, wait_until
from tests.orthanc import NodeAddress, OrthancServer

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SETTLE = 1.0
MODALITY_AET = "MODALITY"


@dataclass
class Stack:
    orthanc: OrthancServer
    node: NodeProcess
    backup_port: int
    root: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    peers.executable("storescu")
    root = tmp_path_factory.mktemp("orthanc-stack")
    orthanc = OrthancServer(root / "orthanc")
    backup_port = peers.free_port()
    node = configured_node(
        root / "node",
        model_path=model_path,
        callers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "reply_to": "ORTHANC"},
                 {"ae_title": MODALITY_AET, "host": "127.0.0.1"}],
        destinations=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
                      {"ae_title": "BACKUP", "host": "127.0.0.1", "port": backup_port}],
        settle_seconds=SETTLE,
        extra={"pipeline": {"fixed_destinations": ["BACKUP"]},
               "outbox": {"max_attempts": 10, "backoff_initial_seconds": 1.0, "backoff_max_seconds": 2.0}},
    )
    orthanc.set_node(NodeAddress(NODE_AET, node.dicom_port))
    orthanc.start()
    node.start()
    try:
        node.wait_model_ready()
        yield Stack(orthanc, node, backup_port, root)
    finally:
        node.stop()
        orthanc.stop()


def fresh_copy(name: str, folder: Path) -> tuple[Path, str]:
    """A copy of a pydicom-data file with new study/series/instance UIDs (a new study each time)."""
    ds = pydicom.dcmread(peers.pydicom_data_file(name))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    return path, str(ds.StudyInstanceUID)


def storescu(paths: list[Path], port: int, called: str, calling: str = MODALITY_AET) -> None:
    result = subprocess.run(
        [peers.executable("storescu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]


def node_study(stack: Stack, study_uid: str) -> Study | None:
    with stack.node.session() as session:
        return session.scalar(select(Study).where(Study.study_instance_uid == study_uid))


def deliveries(stack: Stack, study_uid: str, destination: str) -> list[Delivery]:
    with stack.node.session() as session:
        rows = session.scalars(
            select(Delivery)
            .join(ResultObject)
            .join(Study, Study.id == ResultObject.study_pk)
            .join(RemoteAe, RemoteAe.id == Delivery.destination_pk)
            .where(Study.study_instance_uid == study_uid, RemoteAe.ae_title == destination)
        )
        return list(rows)


def delivered_attempts(stack: Stack, delivery_pk: int) -> int:
    with stack.node.session() as session:
        return int(session.scalar(select(func.count()).select_from(DeliveryAttempt).where(
            DeliveryAttempt.delivery_pk == delivery_pk, DeliveryAttempt.outcome.in_(("delivered", "warning")))) or 0)


def results_in(orthanc: OrthancServer, study_uid: str) -> tuple[list[str], list[str]]:
    return orthanc.by_modality(study_uid, "SR"), orthanc.by_modality(study_uid, "DOC")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_orthanc_routes_a_chest_cr_and_gets_sr_and_pdf_back_in_the_same_study(stack: Stack) -> None:
    from reporting.codes import finding_for

    path, study_uid = fresh_copy("RG1_UNCI.dcm", stack.root / "t1")
    storescu([path], stack.orthanc.dicom_port, "ORTHANC")

    found = wait_until(lambda: all(results_in(stack.orthanc, study_uid)), SETTLE + 90)
    assert found, "no SR and PDF in Orthanc within settle + 90 s"
    srs, docs = results_in(stack.orthanc, study_uid)
    assert len(srs) == 1 and len(docs) == 1
    assert stack.orthanc.remote_aet(srs[0]) == NODE_AET
    assert stack.orthanc.remote_aet(docs[0]) == NODE_AET

    with stack.node.session() as session:
        finding = session.scalars(
            select(Finding).join(Instance).join(Series).join(Study).where(Study.study_instance_uid == study_uid)
        ).one()
        label, version = finding.label, finding.model_version
        assert abs(sum(finding.probabilities.values()) - 1.0) < 1e-3
    sr_tags = stack.orthanc.get(f"/instances/{srs[0]}/tags?simplify")
    text = set(_strings(sr_tags))
    assert finding_for(label).code.meaning in text, "the SR does not name the finding"
    assert version in text, "the SR does not name the model version"
    assert sr_tags["StudyInstanceUID"] == study_uid
    doc_tags = stack.orthanc.tags(docs[0])
    assert doc_tags["MIMETypeOfEncapsulatedDocument"] == "application/pdf"

    observed = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(stack.node.metrics())
        for sample in family.samples
    }
    assert observed[("cxr_node_receipt_to_delivery_seconds_count", (("kind", "sr"),))] >= 1
    assert observed[("cxr_node_instances_analysed", ())] >= 1


def test_a_re_take_after_the_results_gets_a_new_sr_and_pdf_that_report_on_both_images(stack: Stack) -> None:
    """A second image of the study (a re-take in a new series) reaches the node after the first results
    were filed in Orthanc: the node classifies it and sends a second SR and PDF that report on both images.
    The old node stored the re-take and never classified it; the PACS kept the first report only."""
    first, study_uid = fresh_copy("RG1_UNCI.dcm", stack.root / "retake")
    storescu([first], stack.orthanc.dicom_port, "ORTHANC")
    assert wait_until(lambda: all(results_in(stack.orthanc, study_uid)), SETTLE + 90), "no first results"

    retake = pydicom.dcmread(first)
    retake.SeriesInstanceUID = generate_uid()
    retake.SOPInstanceUID = retake.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    second = stack.root / "retake" / "second.dcm"
    retake.save_as(second)
    storescu([second], stack.orthanc.dicom_port, "ORTHANC")
    assert wait_until(lambda: [len(found) for found in results_in(stack.orthanc, study_uid)] == [2, 2],
                      SETTLE + 90), "no second SR and PDF"

    images = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in (first, second)}
    srs, _ = results_in(stack.orthanc, study_uid)
    referenced = sorted(len(images & set(_strings(stack.orthanc.get(f"/instances/{sr}/tags?simplify"))))
                        for sr in srs)
    assert referenced == [1, 2]  # the first SR as it was sent, the second one on both images
    study = node_study(stack, study_uid)
    assert study is not None and study.state is StudyState.ANALYSED


def test_a_study_level_send_of_a_study_holding_the_results_and_a_dose_sr_succeeds(stack: Stack) -> None:
    """"Send study to AI" once the node has answered: Orthanc sends the CR, the modality's dose SR and the
    node's own SR and PDF. The old node refused the SR and PDF contexts and Orthanc failed the whole send
    (HTTP 500 "Cannot transcode from 1.2.840.10008.1.2.1 to one of [ ]", PACS administrator's review).
    Now it succeeds: the dose SR is stored SKIPPED, the node's own objects are not stored again, and the
    analysed study is neither reopened nor given new results."""
    from tests.node_datasets import make_non_image

    path, study_uid = fresh_copy("RG1_UNCI.dcm", stack.root / "whole-study")
    dose = make_non_image("1.2.840.10008.5.1.4.1.1.88.67", like=pydicom.dcmread(path))
    dose_path = stack.root / "whole-study" / "dose.dcm"
    dose.save_as(dose_path, enforce_file_format=True)
    storescu([path, dose_path], stack.orthanc.dicom_port, "ORTHANC")  # Orthanc forwards the CR only

    def from_node() -> list[int]:  # the node's SRs and PDFs in Orthanc (the dose SR is an SR too)
        return [len([i for i in found if stack.orthanc.remote_aet(i) == NODE_AET])
                for found in results_in(stack.orthanc, study_uid)]

    assert wait_until(lambda: from_node() == [1, 1], SETTLE + 90), "no SR and PDF"
    [orthanc_study] = stack.orthanc.post("/tools/find",
                                         {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    assert len(stack.orthanc.get(f"/studies/{orthanc_study}/instances")) == 4  # CR, dose SR, SR, PDF

    stack.orthanc.post("/modalities/node/store", {"Resources": [orthanc_study]})  # raises on HTTP 500

    with stack.node.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study is not None and study.state is StudyState.ANALYSED
        instances = {row.sop_class_uid: row for row in session.scalars(
            select(Instance).join(Series).where(Series.study_pk == study.id))}
        assert set(instances) == {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.88.67"}
        skipped = instances["1.2.840.10008.5.1.4.1.1.88.67"]
        assert skipped.state_reason == "not an image (X-Ray Radiation Dose SR Storage): not analysed"
        assert session.scalar(select(func.count()).select_from(ResultObject).where(
            ResultObject.study_pk == study.id)) == 2

    def reopened() -> bool:
        now = node_study(stack, study_uid)
        return now is None or now.state is not StudyState.ANALYSED

    assert not wait_until(reopened, SETTLE + 3)
    log = stack.node.log_path.read_text(encoding="utf-8", errors="replace")
    assert log.count("sent back by ORTHANC: the node's own, not stored again") >= 2
    assert [len(found) for found in results_in(stack.orthanc, study_uid)] == [2, 1]  # no new result sent
    assert from_node() == [1, 1]


def test_non_chest_cr_is_stored_skipped_with_its_reason_and_nothing_is_sent(stack: Stack) -> None:
    path, study_uid = fresh_copy("RG3_UNCI.dcm", stack.root / "t2")
    storescu([path], stack.orthanc.dicom_port, "ORTHANC")

    def final() -> Study | None:
        study = node_study(stack, study_uid)
        return study if study is not None and study.state not in (
            StudyState.RECEIVED, StudyState.READY, StudyState.PROCESSING) else None

    study = wait_until(final, SETTLE + 90)
    assert study is not None and study.state is StudyState.SKIPPED
    assert study.state_reason == "body part EXTREMITY is not CHEST"
    with stack.node.session() as session:
        instance = session.scalars(select(Instance).join(Series).where(Series.study_pk == study.id)).one()
        assert instance.state_reason == "body part EXTREMITY is not CHEST"
        assert (stack.node.storage_dir / instance.file_path).is_file()
        assert session.scalar(select(func.count()).select_from(ResultObject).where(
            ResultObject.study_pk == study.id)) == 0
    assert results_in(stack.orthanc, study_uid) == ([], [])


def test_results_for_a_stopped_orthanc_are_retried_and_arrive_once(stack: Stack) -> None:
    path, study_uid = fresh_copy("RG1_UNCI.dcm", stack.root / "t3")
    stack.orthanc.stop()
    try:
        # The study reaches the node from Orthanc's AE title while Orthanc itself is down.
        storescu([path], stack.node.dicom_port, NODE_AET, calling="ORTHANC")
        retrying = wait_until(
            lambda: [d for d in deliveries(stack, study_uid, "ORTHANC") if d.state is DeliveryState.RETRYING
                     and d.attempts >= 1], SETTLE + 90, interval=0.1)
        assert len(retrying) == 2, "SR and PDF deliveries should be waiting for Orthanc"
    finally:
        stack.orthanc.start()
    delivered = wait_until(
        lambda: all(d.state is DeliveryState.DELIVERED for d in deliveries(stack, study_uid, "ORTHANC")), 30)
    assert delivered
    for delivery in deliveries(stack, study_uid, "ORTHANC"):
        assert delivery.attempts >= 2
        assert delivered_attempts(stack, delivery.id) == 1
    srs, docs = results_in(stack.orthanc, study_uid)
    assert len(srs) == 1 and len(docs) == 1


def test_a_dead_destination_is_delivered_by_resend_once_fixed(stack: Stack) -> None:
    path, study_uid = fresh_copy("RG1_UNCI.dcm", stack.root / "t4")
    storescu([path], stack.orthanc.dicom_port, "ORTHANC")
    dead = wait_until(lambda: [d.id for d in deliveries(stack, study_uid, "BACKUP")
                               if d.state is DeliveryState.DEAD], SETTLE + 120)
    assert len(dead) == 2, "SR and PDF to BACKUP should be DEAD after 10 attempts"

    listing = stack.node.cli("resend")
    assert listing.returncode == 1
    assert all(f"{pk}\t" in listing.stdout for pk in dead)

    backup = OrthancServer(stack.root / "backup", ae_title="BACKUP", dicom_port=stack.backup_port)
    backup.start()
    try:
        result = stack.node.cli("resend", *map(str, dead))
        assert result.returncode == 0, result.stdout + result.stderr
        srs, docs = results_in(backup, study_uid)
        assert len(srs) == 1 and len(docs) == 1
    finally:
        backup.stop()
    for pk in dead:
        assert delivered_attempts(stack, pk) == 1
    with stack.node.session() as session:
        from dicom_node.store.models import AuditEvent

        targets = set(session.scalars(select(AuditEvent.target).where(AuditEvent.action == "delivery.resend")))
        assert {f"delivery:{pk}" for pk in dead} <= targets


def test_kill_9_with_20_studies_in_flight_loses_and_repeats_nothing(stack: Stack) -> None:
    folder = stack.root / "t5"
    copies = [fresh_copy("RG1_UNCI.dcm", folder) for _ in range(20)]
    study_uids = [uid for _, uid in copies]
    storescu([path for path, _ in copies], stack.node.dicom_port, NODE_AET, calling="ORTHANC")

    def received() -> int:
        with stack.node.session() as session:
            return int(session.scalar(select(func.count()).select_from(Study).where(
                Study.study_instance_uid.in_(study_uids))) or 0)

    assert received() == 20  # acknowledged means stored
    # Kill while results are being produced and sent: some studies done, most not.
    started = wait_until(lambda: sum(bool(results_in(stack.orthanc, uid)[0]) for uid in study_uids[:5]),
                         SETTLE + 90, interval=0.05)
    assert started, "no result reached Orthanc before the kill"
    stack.node.kill()
    done_before = sum(bool(results_in(stack.orthanc, uid)[0]) for uid in study_uids)
    assert done_before < 20, "everything finished before the kill; the test proves nothing"

    stack.node.start()
    complete = wait_until(lambda: all(all(results_in(stack.orthanc, uid)) for uid in study_uids), 120, interval=0.5)
    assert complete, "not every study got its SR and PDF after the restart"
    for uid in study_uids:
        srs, docs = results_in(stack.orthanc, uid)
        assert (len(srs), len(docs)) == (1, 1), uid
    with stack.node.session() as session:
        per_instance = session.execute(
            select(Instance.id, func.count(Finding.id)).join(Series).join(Study).outerjoin(Finding)
            .where(Study.study_instance_uid.in_(study_uids)).group_by(Instance.id)).all()
        assert len(per_instance) == 20 and all(count == 1 for _, count in per_instance)
        srs_made = session.scalar(select(func.count()).select_from(ResultObject).join(Study, Study.id == ResultObject.study_pk)
                                  .where(Study.study_instance_uid.in_(study_uids), ResultObject.kind == ResultKind.SR))
        assert srs_made == 20
        to_orthanc = list(session.scalars(
            select(Delivery).join(ResultObject).join(Study, Study.id == ResultObject.study_pk)
            .join(RemoteAe, RemoteAe.id == Delivery.destination_pk)
            .where(Study.study_instance_uid.in_(study_uids), RemoteAe.ae_title == "ORTHANC")))
        assert len(to_orthanc) == 40 and all(d.state is DeliveryState.DELIVERED for d in to_orthanc)
    # Each delivery is recorded delivered exactly once. (A kill between Orthanc's answer and the node's
    # commit re-sends that object with the same SOP Instance UID, which Orthanc stores once: counted above.)
    assert [d.id for d in to_orthanc if delivered_attempts(stack, d.id) != 1] == []
    assert stack.orthanc.get("/statistics")["CountInstances"] >= 40  # Orthanc still answers, results kept
