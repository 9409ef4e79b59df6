"""Rows for received objects: patient, study, series, instance (Core statements, one transaction).

Core rather than ORM flushes: this runs once per received image, and the ORM's unit of work cost more
CPU than writing the 7 MB file. Display values are read tolerantly: an undecodable name never fails an
ingest, it is stored empty.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pydicom import Dataset
from pydicom.uid import UID
from sqlalchemy import Connection, CursorResult, Table, case, delete, exists, func, insert, select, update

from dicom_node.errors import DatabaseUnavailableError, IdentityConflictError
from dicom_node.sop_classes import not_an_image
from dicom_node.store import header_columns, name_words
from dicom_node.store.files import StoredFile
from dicom_node.store.folding import identifier
from dicom_node.store.models import (
    Instance,
    InstanceState,
    Patient,
    Series,
    Study,
    StudyState,
    folded_name,
    utcnow,
)

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExistingInstance:
    """An instance already on record (found by SOP Instance UID)."""

    instance_pk: int
    study_pk: int
    size_bytes: int
    file_path: str
    purged: bool  # its pixel file was removed by the retention policy
    sha256: str  # of the file as first received
    transfer_syntax_uid: str
    source: str  # dimse | upload: the file meta is the node's own, or the uploaded file's


@dataclass(frozen=True)
class ParsedInstance:
    """Validated facts about an instance; rows are built from this, never from a half-read dataset."""

    ds: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: UID


_PATIENT = cast(Table, Patient.__table__)
_STUDY = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCE = cast(Table, Instance.__table__)


def _new_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None:
        raise DatabaseUnavailableError("database returned no primary key")
    return int(key[0])


def find_existing(conn: Connection, parsed: ParsedInstance) -> ExistingInstance | None:
    """The stored instance with this SOP Instance UID, if any. A copy is held to what the first one was:
    one that names another study, series or SOP class, or its study under another Patient ID (a PACS that
    corrected a patient's identity and kept the UIDs), is a conflict, as a new image of the study would be;
    the first copy is what was analysed and reported."""
    row = conn.execute(
        select(_INSTANCE.c.id, _INSTANCE.c.size_bytes, _SERIES.c.study_pk, _INSTANCE.c.file_path,
               _INSTANCE.c.purged_at, _STUDY.c.study_instance_uid, _INSTANCE.c.sha256,
               _INSTANCE.c.transfer_syntax_uid, _INSTANCE.c.source, _SERIES.c.series_instance_uid,
               _INSTANCE.c.sop_class_uid, _STUDY.c.patient_pk)
        .join(_SERIES, _INSTANCE.c.series_pk == _SERIES.c.id)
        .join(_STUDY, _SERIES.c.study_pk == _STUDY.c.id)
        .where(_INSTANCE.c.sop_instance_uid == parsed.sop_instance_uid)
    ).first()
    if row is None:
        return None
    for stored, sent, what in ((row.study_instance_uid, parsed.study_uid, "study"),
                               (row.series_instance_uid, parsed.series_uid, "series"),
                               (row.sop_class_uid, parsed.sop_class_uid, "SOP class")):
        if stored != sent:
            LOGGER.warning("refused a copy of instance %d that names another %s", row.id, what)
            raise IdentityConflictError(f"SOP Instance UID already stored in another {what}")
    _check_same_patient(conn, row.study_pk, row.patient_pk, parsed.ds)
    return ExistingInstance(instance_pk=row.id, study_pk=row.study_pk, size_bytes=row.size_bytes,
                            file_path=str(row.file_path), purged=row.purged_at is not None,
                            sha256=str(row.sha256), transfer_syntax_uid=str(row.transfer_syntax_uid),
                            source=str(row.source))


def insert_rows(conn: Connection, parsed: ParsedInstance, stored: StoredFile, calling_ae: str, source: str,
                 cached: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
    """Instance row plus its parents; returns (instance pk, (study pk, series pk)).

    A non-image object (a dose SR, a report, a PDF) is recorded SKIPPED with its reason: it is never
    analysed, so it neither reopens a finished study nor keeps a study waiting for its analysis."""
    skipped = not_an_image(parsed.sop_class_uid)
    image = skipped is None
    parents = _touch_parents(conn, parsed, cached, image=image)
    if parents is None:  # not cached, or the cached row disappeared: full upsert
        parents = _upsert_parents(conn, parsed, calling_ae, image=image)
    if image:
        _reopen_finished_study(conn, parents[0])
    instance_pk = _insert_instance(conn, parsed, stored, parents[1], calling_ae, source, skipped=skipped)
    return instance_pk, parents


def describe_file(conn: Connection, instance_pk: int, described: str, parsed: ParsedInstance,
                  stored: StoredFile, source: str) -> None:
    """Make an instance row describe ``stored``, the copy sent again that restores its lost file: its
    digest, size, transfer syntax and kind of file meta (``source``). Only while the row still describes
    the file it described (``described``: its SHA-256 then)."""
    conn.execute(
        update(_INSTANCE)
        .where(_INSTANCE.c.id == instance_pk, _INSTANCE.c.sha256 == described)
        .values(sha256=stored.sha256, size_bytes=stored.size_bytes,
                transfer_syntax_uid=str(parsed.transfer_syntax), source=source[:16])
    )


_FINISHED = (StudyState.ANALYSED, StudyState.SKIPPED, StudyState.FAILED)


def retry_failed_instance(conn: Connection, instance_pk: int, study_pk: int) -> bool:
    """An image whose processing failed (its file missing or unreadable) got its file back from a copy
    sent again: it is RECEIVED again, and its study, if finished, with it, so that it is classified. The
    file was what failed it; a copy that only restored a file was a duplicate, and the image stayed FAILED
    and its study without results for good. Returns whether the image was FAILED."""
    retried = conn.execute(
        update(_INSTANCE)
        .where(_INSTANCE.c.id == instance_pk, _INSTANCE.c.state == InstanceState.FAILED)
        .values(state=InstanceState.RECEIVED, state_reason="")
    )
    if not retried.rowcount:
        return False
    LOGGER.info("instance %d: its file was brought back; it is processed again", instance_pk)
    _reopen_finished_study(conn, study_pk)
    return True


def _reopen_finished_study(conn: Connection, study_pk: int) -> None:
    """A new image of a study that was already finished (a re-take, a second association minutes later)
    makes it RECEIVED again: its settle timer then readies it, the pipeline classifies the new image and
    sends results that include it. A study READY or PROCESSING picks the image up in its current round."""
    reopened = conn.execute(
        update(_STUDY)
        .where(_STUDY.c.id == study_pk, _STUDY.c.state.in_(_FINISHED))
        .values(state=StudyState.RECEIVED, state_reason="")
    )
    if reopened.rowcount:
        LOGGER.info("study %d reopened: a new image arrived after it was finished", study_pk)


def _touch_parents(conn: Connection, parsed: ParsedInstance, cached: tuple[int, int] | None, *,
                   image: bool) -> tuple[int, int] | None:
    """Known series: bump the study's last_received_at (for an image: retention and the dashboard count
    from a study's last image); None if the cached study row is gone."""
    if cached is None:
        return None
    where = (_STUDY.c.id == cached[0], _STUDY.c.study_instance_uid == parsed.study_uid)
    if not image:
        return cached if conn.execute(select(_STUDY.c.id).where(*where)).first() is not None else None
    updated = conn.execute(update(_STUDY).where(*where).values(last_received_at=utcnow()))
    return cached if updated.rowcount == 1 else None


def parents_key(parsed: ParsedInstance) -> tuple[str, str, str, str]:
    """What an image says its series belongs to: a cache of known series is looked up by all of it, so an
    image that names a known series under another study or patient takes the path that checks."""
    return (parsed.series_uid, parsed.study_uid, *_identity(parsed.ds))


def _check_same_patient(conn: Connection, study_pk: int, patient_pk: int, ds: Dataset) -> None:
    """A study belongs to one patient: an image of it under another Patient ID (in the same issuer's
    domain, when both name one) is refused. An empty Patient ID or issuer identifies no one and
    contradicts nothing: the study takes the fuller identity a later image gives, and holds to it."""
    patient_id, issuer = _identity(ds)
    row = conn.execute(select(_PATIENT).where(_PATIENT.c.id == patient_pk)).first()
    if row is None or not patient_id:
        return
    if row.patient_id and (
        patient_id != row.patient_id
        or (issuer and row.issuer_of_patient_id and issuer != row.issuer_of_patient_id)
    ):
        LOGGER.warning("refused an image of study %d under another Patient ID", study_pk)
        raise IdentityConflictError("Study Instance UID already stored under another Patient ID")
    if not row.patient_id or (issuer and not row.issuer_of_patient_id):
        _refile(conn, study_pk, row, ds)


def _refile(conn: Connection, study_pk: int, earlier: Any, ds: Dataset) -> None:
    """File the study under the identity ``ds`` gives, keeping what the ``earlier`` patient row knew
    (a name, a birth date the new image leaves out), and drop that row once no study uses it. The study
    row moves only if it is still under ``earlier``: on PostgreSQL a concurrent image may have re-filed it
    meanwhile (its UPDATE waits for ours), and this image is then checked against that identity."""
    identified = _upsert_patient(conn, ds)
    _fill_missing(conn, identified, {key: getattr(earlier, key) for key in _DEMOGRAPHICS},
                  conn.execute(select(_PATIENT).where(_PATIENT.c.id == identified)).one())
    moved = conn.execute(
        update(_STUDY).where(_STUDY.c.id == study_pk, _STUDY.c.patient_pk == earlier.id)
        .values(patient_pk=identified)
    )
    if moved.rowcount != 1:  # another image re-filed it first
        now = conn.execute(select(_STUDY.c.patient_pk).where(_STUDY.c.id == study_pk)).scalar_one()
        _check_same_patient(conn, study_pk, now, ds)
        return
    conn.execute(
        delete(_PATIENT).where(
            _PATIENT.c.id == earlier.id, ~exists().where(_STUDY.c.patient_pk == earlier.id)
        )
    )
    LOGGER.info("study %d: filed under the Patient ID or issuer a later image gives", study_pk)


def _upsert_parents(conn: Connection, parsed: ParsedInstance, calling_ae: str, *,
                    image: bool) -> tuple[int, int]:
    ds = parsed.ds
    now = utcnow()
    study = conn.execute(
        select(_STUDY.c.id, _STUDY.c.patient_pk).where(_STUDY.c.study_instance_uid == parsed.study_uid)
    ).first()
    study_pk = None if study is None else study.id
    if study is not None:
        _check_same_patient(conn, study.id, study.patient_pk, ds)
    if study_pk is None:
        patient_pk = _upsert_patient(conn, ds)
        study_pk = _new_id(conn.execute(insert(_STUDY).values(
            study_instance_uid=parsed.study_uid,
            patient_pk=patient_pk,
            **header_columns.values(ds, Study, header_columns.STUDY),
            calling_ae=calling_ae[:16],
            state=StudyState.RECEIVED,
            first_received_at=now,
            last_received_at=now,
        )))
    else:
        _fill_study(conn, study_pk, ds, received_at=now if image else None)
    series = conn.execute(
        select(_SERIES.c.id, _SERIES.c.study_pk).where(_SERIES.c.series_instance_uid == parsed.series_uid)
    ).first()
    if series is not None and series.study_pk != study_pk:
        LOGGER.warning("refused an image of series %d (study %d) that names another study", series.id,
                       series.study_pk)
        raise IdentityConflictError("Series Instance UID already stored in another study")
    series_pk = None if series is None else series.id
    if series_pk is None:
        series_pk = _new_id(conn.execute(insert(_SERIES).values(
            series_instance_uid=parsed.series_uid,
            study_pk=study_pk,
            **header_columns.values(ds, Series, header_columns.SERIES),
        )))
    return int(study_pk), int(series_pk)


def _insert_instance(conn: Connection, parsed: ParsedInstance, stored: StoredFile, series_pk: int,
                     calling_ae: str, source: str, *, skipped: str | None = None) -> int:
    ds = parsed.ds
    return _new_id(conn.execute(insert(_INSTANCE).values(
        sop_instance_uid=parsed.sop_instance_uid,
        sop_class_uid=parsed.sop_class_uid,
        series_pk=series_pk,
        transfer_syntax_uid=str(parsed.transfer_syntax),
        **header_columns.values(ds, Instance, header_columns.INSTANCE),
        rows=header_columns.integer(ds, "Rows"),
        columns=header_columns.integer(ds, "Columns"),
        file_path=stored.relative_path,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        calling_ae=calling_ae[:16],
        source=source[:16],
        received_at=utcnow(),
        state=InstanceState.RECEIVED if skipped is None else InstanceState.SKIPPED,
        state_reason=skipped or "",
    )))


def _fill_study(conn: Connection, study_pk: int, ds: Dataset, *, received_at: datetime | None) -> None:
    """A stored study takes the values its first object left empty from a later one: a dose SR or a
    key-object note, whose Patient Study module is optional, may come first, and the study then had no
    Patient Age, so a child's radiograph that followed with 008Y was classified (review). The same goes
    for the patient's birth date, name and sex.

    Each column is filled in the UPDATE itself, only while it is empty, and the patient is the one the
    study row names once its lock is held: on PostgreSQL a concurrent image may fill the same column or
    re-file the study meanwhile, and a read before the UPDATE lost the first value or named a patient row
    that was gone (review)."""
    fields: dict[str, Any] = _only_if_empty(_STUDY, header_columns.values(ds, Study, header_columns.STUDY))
    if received_at is not None:
        fields["last_received_at"] = received_at
    where = _STUDY.c.id == study_pk
    demographics = header_columns.values(ds, Patient, header_columns.PATIENT_DEMOGRAPHICS)
    if fields:
        statement: Any = update(_STUDY).where(where).values(**fields).returning(_STUDY.c.patient_pk)
    elif any(demographics.values()):
        statement = select(_STUDY.c.patient_pk).where(where)
    else:
        return
    _fill_missing(conn, conn.execute(statement).scalar_one(), demographics)


#: Columns that hold another's value as the console's search compares it (migrations 0010, 0012).
_FOLDED: dict[str, tuple[str, Callable[[str], str]]] = {
    "name": ("name_folded", folded_name),
    "accession_number": ("accession_number_folded", identifier),
}


def _only_if_empty(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """SET clauses that give each column its value only while the column is empty; a folded column
    (:data:`_FOLDED`) follows its column, under its column's guard."""
    clauses: dict[str, Any] = {}
    for key, value in values.items():
        if value in (None, ""):
            continue
        empty = func.coalesce(table.c[key], "") == ""
        clauses[key] = case((empty, value), else_=table.c[key])
        if key in _FOLDED and _FOLDED[key][0] in table.c:
            folded, fold = _FOLDED[key]
            clauses[folded] = case((empty, fold(value)), else_=table.c[folded])
    return clauses


_DEMOGRAPHICS = tuple(column for column, _ in header_columns.PATIENT_DEMOGRAPHICS)


def _identity(ds: Dataset) -> tuple[str, str]:
    """(Patient ID, Issuer of Patient ID) as the patient table holds them."""
    row = header_columns.values(ds, Patient, header_columns.PATIENT_IDENTITY)
    return row["patient_id"], row["issuer_of_patient_id"]


def _fill_missing(conn: Connection, patient_pk: int, fields: dict[str, Any], row: Any = None) -> None:
    """Keep what the patient knows; fill its empty demographics from ``fields`` (a later image, or the
    row a study was filed under before, may know more), each only while still empty in the UPDATE itself:
    a concurrent image may have filled it first. With ``row`` (the patient as read), nothing is written
    when it lacks none of them."""
    missing = {key: value for key, value in fields.items() if row is None or not getattr(row, key)}
    guarded = _only_if_empty(_PATIENT, missing)
    if guarded:
        conn.execute(update(_PATIENT).where(_PATIENT.c.id == patient_pk).values(**guarded))
        if "name" in guarded:  # the name may have been empty: its words for the search (migration 0014)
            name_words.keep(conn, patient_pk)


def _upsert_patient(conn: Connection, ds: Dataset) -> int:
    patient_id, issuer = _identity(ds)
    fields = header_columns.values(ds, Patient, header_columns.PATIENT_DEMOGRAPHICS)
    # An empty Patient ID identifies no one: never looked up, so the study gets its own row.
    row = conn.execute(
        select(_PATIENT.c.id, _PATIENT.c.name, _PATIENT.c.birth_date, _PATIENT.c.sex)
        .where(_PATIENT.c.patient_id == patient_id, _PATIENT.c.issuer_of_patient_id == issuer)
    ).first() if patient_id else None
    if row is None:
        patient_pk = _new_id(conn.execute(insert(_PATIENT).values(
            patient_id=patient_id, issuer_of_patient_id=issuer, **fields)))
        name_words.keep(conn, patient_pk, folded_name(fields.get("name") or ""))
        return patient_pk
    _fill_missing(conn, row.id, fields, row)
    return int(row.id)
