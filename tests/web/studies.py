"""Rows a PACS and the pipeline would have produced, inserted through the real session factory."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.store.db import session_scope
from dicom_node.store.models import (
    AeRole,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Finding,
    Instance,
    InstanceState,
    Patient,
    RemoteAe,
    ResultKind,
    ResultObject,
    Series,
    Study,
    StudyState,
)

_counter = itertools.count(1)

ANALYSED_AFTER = timedelta(seconds=20)  # a seeded ANALYSED study was analysed this long after receipt


@dataclass
class StudySpec:
    patient_name: str = "DOE^JANE"
    patient_id: str = "PID-0001"
    accession: str = "ACC0001"
    study_date: str = "20260110"
    birth_date: str = "19600101"  # "": with no Patient Age either, the header gives no age
    state: StudyState = StudyState.ANALYSED
    state_reason: str = ""
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    label: str | None = "pneumonia"
    probabilities: dict[str, float] = field(
        default_factory=lambda: {"covid": 0.05, "normal": 0.11, "pneumonia": 0.84}
    )
    model_version: str = "1.2.0"
    deliveries: dict[str, DeliveryState] = field(default_factory=dict)  # destination title -> state
    file_path: str = "missing/instance.dcm"
    heatmap_path: str | None = None
    novelty: float | None = None
    better_turn: int = 0  # the model's turn check: how it would have read the image better
    negative: bool = False  # the model's negative check: the image looked inverted
    result_files: dict[ResultKind, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyIds:
    study: int
    instance: int
    finding: int | None
    results: dict[ResultKind, int]
    deliveries: dict[tuple[ResultKind, str], int]


def destination(session: Session, title: str) -> RemoteAe:
    ae = session.query(RemoteAe).filter_by(ae_title=title, role=AeRole.DESTINATION).one_or_none()
    if ae is None:
        ae = RemoteAe(ae_title=title, role=AeRole.DESTINATION, host="127.0.0.1", port=104)
        session.add(ae)
        session.flush()
    return ae


def add_study(factory: sessionmaker[Session], spec: StudySpec) -> StudyIds:
    n = next(_counter)
    with session_scope(factory) as session:
        patient = session.query(Patient).filter_by(patient_id=spec.patient_id).one_or_none()
        if patient is None:
            patient = Patient(
                patient_id=spec.patient_id, name=spec.patient_name, birth_date=spec.birth_date, sex="F"
            )
            session.add(patient)
            session.flush()
        study = Study(
            study_instance_uid=generate_uid(),
            patient_pk=patient.id,
            accession_number=spec.accession,
            study_date=spec.study_date,
            study_time="101500",
            study_description="XR CHEST PA",
            calling_ae="MODALITY1",
            state=spec.state,
            state_reason=spec.state_reason,
            first_received_at=spec.received_at,
            last_received_at=spec.received_at,
            analysed_at=spec.received_at + ANALYSED_AFTER
            if spec.state is StudyState.ANALYSED
            else None,
        )
        session.add(study)
        session.flush()
        series = Series(
            series_instance_uid=generate_uid(), study_pk=study.id, modality="CR", body_part_examined="CHEST"
        )
        session.add(series)
        session.flush()
        instance = Instance(
            sop_instance_uid=generate_uid(),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            series_pk=series.id,
            instance_number=1,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            view_position="PA",
            rows=2140,
            columns=1760,
            file_path=spec.file_path,
            sha256="0" * 64,
            size_bytes=1000,
            received_at=spec.received_at,
            state=InstanceState.SKIPPED if spec.state is StudyState.SKIPPED else InstanceState.ANALYSED,
            state_reason=spec.state_reason,
        )
        session.add(instance)
        session.flush()
        finding_id = None
        if spec.label is not None:
            top = max(spec.probabilities, key=lambda k: spec.probabilities[k])
            finding = Finding(
                instance_pk=instance.id,
                model_name="sugandi-cnn",
                model_version=spec.model_version,
                label=spec.label,
                top_class=top,
                confidence=spec.probabilities[top],
                probabilities=spec.probabilities,
                heatmap_path=spec.heatmap_path,
                novelty=spec.novelty,
                better_turn=spec.better_turn,
                negative=spec.negative,
            )
            session.add(finding)
            session.flush()
            finding_id = finding.id
        results: dict[ResultKind, int] = {}
        deliveries: dict[tuple[ResultKind, str], int] = {}
        kinds = set(spec.result_files) | ({ResultKind.SR, ResultKind.PDF} if spec.deliveries else set())
        for kind in sorted(kinds):
            obj = ResultObject(
                study_pk=study.id,
                kind=kind,
                model_name="sugandi-cnn",
                model_version=spec.model_version,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                sop_instance_uid=generate_uid(),
                series_instance_uid=generate_uid(),
                file_path=spec.result_files.get(kind, f"{n}/{kind.value}.dcm"),
            )
            session.add(obj)
            session.flush()
            results[kind] = obj.id
            for title, state in spec.deliveries.items():
                dest = destination(session, title)
                delivery = Delivery(
                    result_object_pk=obj.id,
                    destination_pk=dest.id,
                    state=state,
                    attempts=1 if state is not DeliveryState.PENDING else 0,
                    last_status=0xA700 if state in (DeliveryState.DEAD, DeliveryState.RETRYING) else None,
                    last_error="peer refused: out of resources" if state is DeliveryState.DEAD else "",
                )
                session.add(delivery)
                session.flush()
                if state is not DeliveryState.PENDING:
                    session.add(
                        DeliveryAttempt(
                            delivery_pk=delivery.id,
                            status=0x0000 if state is DeliveryState.DELIVERED else 0xA700,
                            outcome="delivered" if state is DeliveryState.DELIVERED else "failed",
                        )
                    )
                deliveries[(kind, title)] = delivery.id
        return StudyIds(study.id, instance.id, finding_id, results, deliveries)
