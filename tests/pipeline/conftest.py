"""Rows for the pipeline tests, made directly (the migrated databases are tests/conftest.py's ``db``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.store.files import instance_path
from dicom_node.store.models import Instance, InstanceState, Patient, Series, Study, StudyState, utcnow


def add_study(
    session: Session,
    storage_dir: Path,
    *,
    modality: str = "CR",
    body_part: str = "CHEST",
    view: str = "PA",
    images: int = 1,
    calling_ae: str = "ORTHANC",
    state: StudyState = StudyState.READY,
    instance_state: InstanceState = InstanceState.RECEIVED,
    received_at: datetime | None = None,
    content: bytes = b"pixels",
) -> Study:
    """A study with ``images`` instances whose files exist under ``storage_dir``."""
    received_at = received_at or utcnow()
    patient = Patient(patient_id=generate_uid()[-12:], name="TEST^PATIENT")
    study = Study(
        study_instance_uid=generate_uid(),
        patient=patient,
        calling_ae=calling_ae,
        state=state,
        first_received_at=received_at,
        last_received_at=received_at,
    )
    series = Series(series_instance_uid=generate_uid(), study=study, modality=modality, body_part_examined=body_part)
    session.add_all([patient, study, series])
    for number in range(images):
        uid = generate_uid()
        relative = instance_path(study.study_instance_uid, series.series_instance_uid, uid)  # as ingest does
        (storage_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (storage_dir / relative).write_bytes(content)
        session.add(
            Instance(
                sop_instance_uid=uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                series=series,
                instance_number=number + 1,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                view_position=view,
                file_path=relative,
                sha256=hashlib.sha256(content).hexdigest(),
                size_bytes=len(content),
                calling_ae=calling_ae,
                received_at=received_at,
                state=instance_state,
            )
        )
    session.flush()
    return study


@contextmanager
def write_transaction_open(factory: sessionmaker[Session]) -> Iterator[None]:
    """A write transaction held open for the block, as by the node storing an image or by another program
    holding the database (a backup, the sqlite3 shell): on SQLite it holds the write lock."""
    writer = factory()
    writer.connection()
    try:
        yield
    finally:
        writer.close()
