"""SQLAlchemy 2.0 typed models: the node's durable state.

Every step of the data path is a row with a state, so a crash or restart resumes where it stopped.
Schema changes go through Alembic (``dicom_node/store/migrations``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    Unicode,
    UniqueConstraint,
    event,
    false,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from dicom_node.store import folding

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


PERSON_NAME_LENGTH = 324  # five 64-character PN components and the four "^" between them


def folded_name(name: str) -> str:
    """``name`` as ``patient.name_folded`` holds it."""
    return folding.fold(name)[:PERSON_NAME_LENGTH]


def _folded(column: str, fold: Callable[[str], str]) -> Callable[[Any], str]:
    """The default of a column that holds ``column``'s value folded: an insert that gives only the value
    gets its folded form too."""
    def folded(context: Any) -> str:
        return fold(context.get_current_parameters().get(column) or "")
    return folded


def _folded_column(length: int) -> String:
    """A folded identifier's type. On SQLite its index is NOCASE, as SQLite's LIKE needs to search an
    index (the values are lower case already); on PostgreSQL the index takes varchar_pattern_ops."""
    size = length * folding.IDENTIFIER_GROWTH
    return String(size).with_variant(String(size, collation="NOCASE"), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as VARCHAR + CHECK so that adding a value is a plain migration on every backend.
    return Enum(cls, native_enum=False, length=24, values_callable=lambda e: [m.value for m in e])


# ---------------------------------------------------------------------------------------------
# Remote application entities
# ---------------------------------------------------------------------------------------------


class AeRole(enum.StrEnum):
    CALLER = "caller"  # may open associations to the node (C-STORE / C-ECHO)
    DESTINATION = "destination"  # receives results from the node (C-STORE SCU)


class RemoteAe(Base):
    """An allowed caller or a result destination. Callers are default-deny."""

    __tablename__ = "remote_ae"
    __table_args__ = (UniqueConstraint("ae_title", "role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    role: Mapped[AeRole] = mapped_column(_enum(AeRole))
    host: Mapped[str | None] = mapped_column(String(255))  # callers: optional bound host/IP
    port: Mapped[int | None] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    # destinations only: after delivering, ask the PACS to commit to keeping the objects (PS3.4 Annex J)
    storage_commitment: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    # callers only: the destination that results for studies from this caller go back to
    reply_to_id: Mapped[int | None] = mapped_column(ForeignKey("remote_ae.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    reply_to: Mapped[RemoteAe | None] = relationship(remote_side=[id])


# ---------------------------------------------------------------------------------------------
# Received objects: patient / study / series / instance
# ---------------------------------------------------------------------------------------------


class StudyState(enum.StrEnum):
    RECEIVED = "received"  # instances arriving; settle timer armed
    READY = "ready"  # settled; a study_ready job exists
    PROCESSING = "processing"
    ANALYSED = "analysed"  # findings and result objects exist
    SKIPPED = "skipped"  # nothing eligible; reason kept
    FAILED = "failed"


class InstanceState(enum.StrEnum):
    RECEIVED = "received"
    ANALYSED = "analysed"
    SKIPPED = "skipped"
    FAILED = "failed"


class Patient(Base):
    __tablename__ = "patient"
    # One row per Patient ID in its issuer's domain. An empty Patient ID (Type 2: allowed) identifies no
    # one, so those studies each get their own row rather than sharing one name and birth date.
    __table_args__ = (
        Index(
            "uq_patient_patient_id",
            "patient_id",
            "issuer_of_patient_id",
            unique=True,
            sqlite_where=text("patient_id != ''"),
            postgresql_where=text("patient_id != ''"),
        ),
        # the results search by Patient ID, from its start (migration 0012)
        Index(
            "ix_patient_patient_id_folded",
            "patient_id_folded",
            postgresql_ops={"patient_id_folded": "varchar_pattern_ops"},
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String(PERSON_NAME_LENGTH), default="")
    # The name as the console's search compares it (dicom_node.store.folding); an insert that gives only
    # the name gets it folded, an update of the name must set it too.
    name_folded: Mapped[str] = mapped_column(String(PERSON_NAME_LENGTH), default=_folded("name", folded_name))
    # The Patient ID as the search compares it (folding.identifier); set with it, as the name's.
    patient_id_folded: Mapped[str] = mapped_column(
        _folded_column(64), default=_folded("patient_id", folding.identifier)
    )
    birth_date: Mapped[str] = mapped_column(String(8), default="")  # DICOM DA
    sex: Mapped[str] = mapped_column(String(16), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class PatientNameWord(Base):
    """One word of a patient's folded name (:func:`dicom_node.store.folding.name_words`), so that the
    results search by name finds a word from its start in an index instead of reading every patient's
    name (migration 0014). Kept with the name: dicom_node.store.name_words."""

    __tablename__ = "patient_name_word"
    __table_args__ = (
        # the search: a word's prefix, then its patients, from the index alone
        Index(
            "ix_patient_name_word_word",
            "word",
            "patient_pk",
            postgresql_ops={"word": "varchar_pattern_ops"},
        ),
    )

    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"), primary_key=True)
    word: Mapped[str] = mapped_column(
        String(PERSON_NAME_LENGTH).with_variant(String(PERSON_NAME_LENGTH, collation="NOCASE"), "sqlite"),
        primary_key=True,
    )


@event.listens_for(Patient, "after_insert")
def _patient_inserted(_mapper: Any, connection: Connection, target: Patient) -> None:
    """An ORM insert of a patient gets its name's words for the search, as the ingest's inserts do."""
    from dicom_node.store import name_words  # imports this module

    name_words.keep(connection, target.id)


@event.listens_for(Patient, "after_update")
def _patient_updated(_mapper: Any, connection: Connection, target: Patient) -> None:
    if inspect(target).attrs.name_folded.history.has_changes():
        from dicom_node.store import name_words  # imports this module

        name_words.keep(connection, target.id)


class Study(Base):
    __tablename__ = "study"
    # The dashboard's counts of today's studies by state (migration 0011)
    __table_args__ = (
        Index("ix_study_state_analysed_at", "state", "analysed_at"),
        Index("ix_study_state_last_received_at", "state", "last_received_at"),
        # the results search by accession number, from its start (migration 0012)
        Index(
            "ix_study_accession_number_folded",
            "accession_number_folded",
            postgresql_ops={"accession_number_folded": "varchar_pattern_ops"},
        ),
        # a patient's studies, and those of the patients a search by name finds, newest first from the
        # index alone (migration 0016)
        Index("ix_study_patient_pk_first_received_at", "patient_pk", "first_received_at", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"))
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    # The accession as the search compares it (folding.identifier); set with it.
    accession_number_folded: Mapped[str] = mapped_column(
        _folded_column(16), default=_folded("accession_number", folding.identifier)
    )
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)  # DICOM DA
    patient_age: Mapped[str] = mapped_column(String(16), default="")  # DICOM AS, at this study
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")  # DICOM SH Study ID
    timezone_offset: Mapped[str] = mapped_column(String(16), default="")  # as sent, e.g. "+0100"
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(PERSON_NAME_LENGTH), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVED, index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column()
    analysed_at: Mapped[datetime | None] = mapped_column()

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer)
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    # the metrics' counts by state, and retention's files not yet removed (migration 0012)
    __table_args__ = (Index("ix_instance_state_purged_at", "state", "purged_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    view_position: Mapped[str] = mapped_column(String(16), default="")
    image_laterality: Mapped[str] = mapped_column(String(16), default="")
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    file_path: Mapped[str] = mapped_column(String(1024))  # relative to the storage directory
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    source: Mapped[str] = mapped_column(String(16), default="dimse")  # dimse | upload
    # indexed for the dashboard's images today (migration 0011)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    state: Mapped[InstanceState] = mapped_column(_enum(InstanceState), default=InstanceState.RECEIVED)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    purged_at: Mapped[datetime | None] = mapped_column()  # pixel file removed by retention

    series: Mapped[Series] = relationship(back_populates="instances")
    findings: Mapped[list[Finding]] = relationship(back_populates="instance")


# ---------------------------------------------------------------------------------------------
# Work: jobs, findings, result objects, deliveries
# ---------------------------------------------------------------------------------------------


class JobKind(enum.StrEnum):
    STUDY_READY = "study_ready"


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Job(Base):
    """A unit of pipeline work. ``dedupe_key`` makes creation idempotent (exactly once)."""

    __tablename__ = "job"
    __table_args__ = (UniqueConstraint("kind", "dedupe_key"), Index("ix_job_state_kind", "state", "kind"))

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind))
    dedupe_key: Mapped[str] = mapped_column(String(128))
    study_pk: Mapped[int | None] = mapped_column(ForeignKey("study.id"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class Finding(Base):
    """The classifier's output for one instance and one model version."""

    __tablename__ = "finding"
    __table_args__ = (UniqueConstraint("instance_pk", "model_name", "model_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instance.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(32), index=True)
    top_class: Mapped[str] = mapped_column(String(32))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    timings_ms: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    heatmap_path: Mapped[str | None] = mapped_column(String(1024))
    # How unlike the training images (Prediction.novelty; 1.0 = the model's limit); None: no check
    novelty: Mapped[float | None] = mapped_column(Float)
    # Counter-clockwise quarter turns that bring the image the model read head up, when it looked turned
    # (Prediction.better_turn); 0: it looked upright, or was not checked
    better_turn: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The image looked inverted (bone dark) and familiar inverted back (Prediction.negative)
    negative: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="findings")


class ResultKind(enum.StrEnum):
    SR = "sr"
    PDF = "pdf"  # the Encapsulated PDF instance (the raw PDF is kept beside it)
    HEATMAP_SC = "heatmap_sc"


class ResultObject(Base):
    """A DICOM object the node created for a study: one per (study, kind, model version, revision).

    ``covers`` lists the instances the object reports on (the analysed ones; for a "not analysed" PDF the
    skipped ones). When an image of the study arrives after its results were made, the set changes and
    the next revision is a new object (new UIDs) that is built and sent; earlier revisions stay as sent.
    None on rows made before revisions existed: they are taken to cover what the study had then."""

    __tablename__ = "result_object"
    __table_args__ = (UniqueConstraint("study_pk", "kind", "model_name", "model_version", "revision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    kind: Mapped[ResultKind] = mapped_column(_enum(ResultKind))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(String(1024))  # relative to the results directory
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    covers: Mapped[list[int] | None] = mapped_column(JSON, default=None)
    # SHA-256 of the DICOM file as the node wrote it (migration 0013): a file damaged since then is made
    # again, not sent. None until the file is written, and on rows made before the column existed.
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result_object")


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    DEAD = "dead"
    # Not sent, and never to be: a later revision of the object (a late image) replaced it first.
    SUPERSEDED = "superseded"


class CommitmentState(enum.StrEnum):
    """Whether a delivered object's destination has taken responsibility for keeping it (Storage
    Commitment Push Model, PS3.4 Annex J). NULL: the destination was not asked (it is not set to)."""

    DUE = "due"  # delivered; the N-ACTION asking for commitment is still to be sent
    # the PACS answered the N-ACTION, its N-EVENT-REPORT is awaited; or the N-ACTION failed, and it is asked
    # again after the time-out as when no report came
    REQUESTED = "requested"
    COMMITTED = "committed"  # the PACS reported that it keeps the object
    # no report after outbox.commitment_requests requests, or the PACS would not take the request
    UNCONFIRMED = "unconfirmed"


class Delivery(Base):
    """One result object to one destination; retried with back-off until delivered or dead."""

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("result_object_pk", "destination_pk"),
        Index("ix_delivery_state_next", "state", "next_attempt_at"),
        # the outbox's lease and next-retry lookups of one destination (migration 0011)
        Index("ix_delivery_destination_state_next", "destination_pk", "state", "next_attempt_at"),
        # the outbox's sweep for storage commitment to ask for or overdue (migration 0017)
        Index("ix_delivery_commitment_at", "commitment", "commitment_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    result_object_pk: Mapped[int] = mapped_column(ForeignKey("result_object.id"), index=True)
    # indexed first in ix_delivery_destination_state_next
    destination_pk: Mapped[int] = mapped_column(ForeignKey("remote_ae.id"))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()
    # Storage commitment of a delivered object (migration 0017; see CommitmentState). The transaction UID
    # of the last request, indexed for the PACS's report; when it was asked or answered; how often asked.
    commitment: Mapped[CommitmentState | None] = mapped_column(_enum(CommitmentState))
    commitment_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    commitment_at: Mapped[datetime | None] = mapped_column()
    commitment_requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    commitment_note: Mapped[str] = mapped_column(Text, default="", server_default="")

    result_object: Mapped[ResultObject] = relationship(back_populates="deliveries")
    destination: Mapped[RemoteAe] = relationship()
    attempt_history: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="delivery", order_by="DeliveryAttempt.id"
    )


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempt"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_pk: Mapped[int] = mapped_column(ForeignKey("delivery.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status, None if no response
    # delivered | warning | failed | error | not kept (commitment.NOT_KEPT); indexed for the metrics' count
    # of failures (migration 0011)
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str] = mapped_column(Text, default="")

    delivery: Mapped[Delivery] = relationship(back_populates="attempt_history")


# ---------------------------------------------------------------------------------------------
# People and audit
# ---------------------------------------------------------------------------------------------


class UserRole(enum.StrEnum):
    ADMIN = "admin"
    RADIOLOGIST = "radiologist"


class User(Base):
    __tablename__ = "app_user"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[UserRole] = mapped_column(_enum(UserRole))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column()


class WebSession(Base):
    """A console login. The cookie carries a random token; only its hash is stored."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("app_user.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()

    user: Mapped[User] = relationship()


class AuditEvent(Base):
    """Who changed what, when. ``details`` must not hold PHI (use row ids)."""

    __tablename__ = "audit_event"
    # The audit log's filters, each value from its start, with the log's order after it so that the page
    # is sought from the index (migration 0015). On SQLite the columns are NOCASE, as its LIKE needs to
    # search an index; on PostgreSQL the index takes varchar_pattern_ops.
    __table_args__ = (
        Index("ix_audit_event_action", "action", "at", "id",
              postgresql_ops={"action": "varchar_pattern_ops"}),
        Index("ix_audit_event_actor", "actor", "at", "id", postgresql_ops={"actor": "varchar_pattern_ops"}),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # "user:<name>", "cli:<os user>", "system"
    actor: Mapped[str] = mapped_column(String(128).with_variant(String(128, collation="NOCASE"), "sqlite"))
    # e.g. "ae.add", "retention.purge"
    action: Mapped[str] = mapped_column(String(64).with_variant(String(64, collation="NOCASE"), "sqlite"))
    target: Mapped[str] = mapped_column(String(255), default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


#: APScheduler's persistent job store (settle timers), declared here so that Alembic creates and
#: migrates it like every other table; the columns are those SQLAlchemyJobStore 3.x defines, and it
#: finds the table already there.
SCHEDULER_JOBS = Table(
    "apscheduler_jobs",
    Base.metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True),
    Column("job_state", LargeBinary, nullable=False),
)
