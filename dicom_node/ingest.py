"""Ingest one received instance: parse, validate, write durably, record rows — then, and only then, succeed.

Shared by the C-STORE handler (:mod:`dicom_node.scp`) and web uploads. The bytes the sender encoded are
written as received (preamble + file meta + dataset) rather than re-encoded, so the stored file is exactly
what the modality produced. A repeated SOP Instance UID is a success without a second row; the first
file is kept (or restored from the copy, when it was lost or damaged), and when the files of its study's
results are gone or damaged, the study is reopened to have them made again (:mod:`dicom_node.storage`).
Non-image objects (SRs, PDFs, presentation states: :mod:`dicom_node.sop_classes`) are stored the same way,
without the pixel data checks. On any failure nothing is left behind: the file only takes its final name
inside the transaction that records it, and is removed again if that transaction cannot commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

from pydicom import Dataset
from pydicom.uid import UID, AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import Engine, Table, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import storage
from dicom_node.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    IdentityConflictError,
    InvalidDatasetError,
    UndecodableDatasetError,
    UnsupportedSopClassError,
)
from dicom_node.part10 import (
    check_pixel_data,
    check_value_representations,
    data_set_offset,
    has_preamble,
    parse_instance,
    parse_network_dataset,
    part10_prefix,
    require_uid,
    without_file_meta,
)
from dicom_node.sop_classes import ACCEPTED_SOP_CLASSES, RESULT_SOP_CLASSES, is_image
from dicom_node.store import header_columns
from dicom_node.store.db import READ_ONLY, waits_for_a_resource
from dicom_node.store.files import FileStore, StagedFile, file_sha256, instance_path
from dicom_node.store.models import Patient, ResultObject, Study
from dicom_node.store.received import (
    ExistingInstance,
    ParsedInstance,
    describe_file,
    find_existing,
    insert_rows,
    parents_key,
    retry_failed_instance,
)

LOGGER = logging.getLogger(__name__)

_RESULT_SOP_CLASSES = frozenset(RESULT_SOP_CLASSES.values())
_RESULT = cast(Table, ResultObject.__table__)
_STUDY = cast(Table, Study.__table__)
_PATIENT = cast(Table, Patient.__table__)
_RETRIES_ON_CONFLICT = 3
_LOCK_STRIPES = 64
_PARENT_CACHE_SIZE = 256


@dataclass(frozen=True)
class IngestResult:
    """Outcome of a successful ingest (also for a duplicate, which is a success).

    ``own_result`` is the id of the node's result object (table result_object) the sender sent back: a
    duplicate of it, not stored (``instance_pk`` is then 0: no instance row holds it)."""

    instance_pk: int
    study_pk: int
    duplicate: bool
    size_bytes: int
    differs: bool = False  # a duplicate whose bytes differ from the first copy's (which is kept)
    restored: bool = False  # a duplicate whose copy restored the instance's lost file (and is kept)
    own_result: int | None = None
    # a duplicate image of a finished study whose results' files are gone, or whose copy brought back the
    # file of an image that failed for want of it: the study was reopened so that they are made again or
    # the image is classified (its settle timer must be armed, as for a new image)
    reopened: bool = False


class Ingestor:
    """Turns received bytes into a durable file plus committed rows.

    ``on_stored`` runs after the commit (the node arms the study's settle timer there); its failure is
    logged, never reported to the sender, because the instance is already safe. ``results_dir`` is where
    the node's results are: an image sent again for a study whose results' files are gone has them
    made again (without it, a duplicate is only a duplicate).
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        file_store: FileStore,
        *,
        on_stored: Callable[[IngestResult], None] | None = None,
        accepted_sop_classes: tuple[str, ...] = ACCEPTED_SOP_CLASSES,
        results_dir: Path | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.results_dir = results_dir
        engine = session_factory.kw.get("bind")
        if not isinstance(engine, Engine):
            raise ConfigurationError("the session factory must be bound to an engine")
        self._engine = engine
        self._reader = engine.execution_options(**{READ_ONLY: True})  # takes no SQLite write lock
        self.file_store = file_store
        self.on_stored = on_stored
        self.accepted_sop_classes = frozenset(accepted_sop_classes)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        # (series, study, patient ID, issuer) -> (study pk, series pk) of recently stored series
        self._parents: dict[tuple[str, str, str, str], tuple[int, int]] = {}
        self._parents_lock = threading.Lock()

    # Entry points ------------------------------------------------------------------------------

    def ingest_network(
        self,
        dataset_bytes: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str,
    ) -> IngestResult:
        """A C-STORE data set as received in its presentation context's transfer syntax."""
        if sop_class_uid not in self.accepted_sop_classes:
            raise UnsupportedSopClassError("SOP class not accepted by this node")
        try:
            prefix = part10_prefix(sop_class_uid, sop_instance_uid, transfer_syntax)
        except ValueError as exc:
            raise InvalidDatasetError("C-STORE request carries invalid UIDs") from exc
        ds = parse_network_dataset(dataset_bytes, transfer_syntax=transfer_syntax,
                                   sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid)
        dataset_bytes, stray = without_file_meta(ds, dataset_bytes, transfer_syntax)
        if stray:
            LOGGER.warning("C-STORE data set from %s carried %d File Meta Information elements (group 0002), "
                           "which belong in a file's meta only: left out of the stored file", calling_ae, stray)
        return self._ingest(ds, [prefix, dataset_bytes], UID(transfer_syntax), calling_ae, "dimse")

    def ingest_bytes(self, data: bytes, *, calling_ae: str, source: str) -> IngestResult:
        """A Part 10 file (or a bare dataset) from an upload; written as given when it has a file meta
        that names its data set (and the transfer syntax it is in)."""
        ds = parse_instance(data)
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
        sop_class, sop_instance = require_uid(ds, "SOPClassUID"), require_uid(ds, "SOPInstanceUID")
        if sop_class not in self.accepted_sop_classes:
            raise UnsupportedSopClassError("SOP class not accepted by this node")
        own_meta = bool(transfer_syntax) and _names(meta, sop_class, sop_instance)
        if not transfer_syntax:  # none given: pydicom found the data set's encoding
            implicit = ds.original_encoding[0]
            transfer_syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        if not own_meta:
            # A bare data set, a file meta without a Transfer Syntax UID, or one naming another instance or
            # SOP class than its data set (PS3.10 7.1: its own; an anonymiser that changed only the data
            # set's UIDs leaves it so): the data set's bytes are kept, behind the node's file meta.
            chunks = [part10_prefix(sop_class, sop_instance, transfer_syntax), data[data_set_offset(data):]]
        elif has_preamble(data):
            chunks = [data]
        else:
            chunks = [b"\x00" * 128 + b"DICM", data]  # a file meta at the first byte: no preamble
        return self._ingest(ds, chunks, transfer_syntax, calling_ae, source)

    # The common path ---------------------------------------------------------------------------

    def _ingest(
        self, ds: Dataset, chunks: list[bytes], transfer_syntax: UID, calling_ae: str, source: str
    ) -> IngestResult:
        if transfer_syntax not in AllTransferSyntaxes:
            raise UndecodableDatasetError("unknown transfer syntax")
        sop_class = require_uid(ds, "SOPClassUID")
        sop_instance = require_uid(ds, "SOPInstanceUID")
        study_uid = require_uid(ds, "StudyInstanceUID")
        series_uid = require_uid(ds, "SeriesInstanceUID")
        check_value_representations(ds)
        own = self._own_result(sop_class, sop_instance, study_uid, header_columns.text(ds, "PatientID", 64))
        if own is not None:
            # The node's own SR, PDF or heat map in a study-level send back to it: it holds the original.
            LOGGER.info("result object %d sent back by %s: the node's own, not stored again", own[0],
                        calling_ae)
            return IngestResult(instance_pk=0, study_pk=own[1], duplicate=True, size_bytes=0,
                                own_result=own[0])
        if is_image(sop_class):
            check_pixel_data(ds, transfer_syntax)
        parsed = ParsedInstance(ds, sop_class, sop_instance, study_uid, series_uid, transfer_syntax)
        with self._locks[hash(sop_instance) % _LOCK_STRIPES]:
            staged = self.file_store.stage(instance_path(study_uid, series_uid, sop_instance), chunks)
            try:
                result = self._record_with_retries(parsed, staged, calling_ae, source)
            finally:
                staged.discard()  # a duplicate's copy, or a failed attempt's; no-op once published
        if result.differs:
            # A sender that corrected an image (a name, the pixels) and kept its UID: the first copy is
            # what was analysed and reported. Changed content needs a new SOP Instance UID (PS3.3 C.12.1.1.1).
            LOGGER.warning("instance %d received again from %s with different content: kept the first copy",
                           result.instance_pk, calling_ae)
        elif result.duplicate and not result.restored:  # a restore was logged when it was made
            LOGGER.info("instance %d received again from %s: kept the first copy", result.instance_pk,
                        calling_ae)
        else:
            LOGGER.info("stored instance %d (study %d, %d bytes) from %s", result.instance_pk,
                        result.study_pk, result.size_bytes, calling_ae)
        if result.duplicate and is_image(sop_class):
            result = self._remake_lost_results(result)
        if (not result.duplicate or result.reopened) and self.on_stored is not None:
            try:
                self.on_stored(result)
            except Exception as exc:  # the instance is safe; the periodic sweep re-arms the study
                LOGGER.error("post-store hook failed for instance %d: %s", result.instance_pk,
                             type(exc).__name__)
        return result

    def _remake_lost_results(self, result: IngestResult) -> IngestResult:
        """An image sent again is how an operator asks for a study's results once their files are gone
        (restored from an older backup, a lost disk): the study is reopened, and its results are made
        again as a new revision and sent. A failure here is logged; the image itself is safe.

        The files are read and hashed in a read-only transaction: under SQLite's write lock every image of
        a study a PACS sends again waited for them, and every other association's images with it.
        reopen_to_remake changes only a study still finished (or failed), so a round begun meanwhile is left
        alone."""
        if self.results_dir is None:
            return result
        try:
            with self._reader.connect() as conn:
                lost = storage.lost_results(conn, self.results_dir, result.study_pk)
            if not lost:
                return result
            with self._engine.begin() as conn:
                reopened = storage.reopen_to_remake(conn, result.study_pk, failed=True)
        except SQLAlchemyError as exc:
            LOGGER.error("study %d: its results' files could not be checked (%s)", result.study_pk,
                         type(exc).__name__)
            return result
        return replace(result, reopened=True) if reopened else result

    def _own_result(
        self, sop_class: str, sop_instance: str, study_uid: str, patient_id: str
    ) -> tuple[int, int] | None:
        """(id, study pk) of the node's result object with this SOP Instance UID, if it is one. Looked for
        only for the SOP classes of its results; one that names another study, or another Patient ID
        than its study's (a copy the PACS re-identified, review), is an identity conflict, as for any
        stored instance."""
        if sop_class not in _RESULT_SOP_CLASSES:
            return None
        try:
            with self._reader.connect() as conn:
                row = conn.execute(
                    select(_RESULT.c.id, _RESULT.c.study_pk, _STUDY.c.study_instance_uid,
                           _PATIENT.c.patient_id)
                    .join(_STUDY, _RESULT.c.study_pk == _STUDY.c.id)
                    .join(_PATIENT, _STUDY.c.patient_pk == _PATIENT.c.id)
                    .where(_RESULT.c.sop_instance_uid == sop_instance)
                ).first()
        except SQLAlchemyError as exc:
            raise DatabaseUnavailableError(f"database unavailable ({type(exc).__name__})") from exc
        if row is None:
            return None
        if row[2] != study_uid:
            LOGGER.warning("refused a copy of result object %d that names another study", row[0])
            raise IdentityConflictError("SOP Instance UID is a result of another study")
        if row[3] and patient_id and patient_id != row[3]:
            LOGGER.warning("refused a copy of result object %d under another Patient ID", row[0])
            raise IdentityConflictError("a result of this node under another Patient ID")
        return int(row[0]), int(row[1])

    def _record(self, parsed: ParsedInstance, staged: StagedFile, calling_ae: str, source: str) -> IngestResult:
        """One transaction: duplicate check, rows and the rename of the staged file, then COMMIT;
        the directory fsync that makes the rename durable follows the commit, before success.

        A row never points at a name that was not renamed into place; if the commit fails the renamed
        file is removed again. Should power fail between the commit and the directory fsync, the
        sender got no success and sends again: the duplicate path then restores a missing file from
        the new copy. Keeping the fsync out of the transaction keeps it out of SQLite's write lock,
        which concurrent associations share.

        Core statements, not ORM flushes: this runs once per received image and the ORM's unit of work
        cost more CPU than the file write. The series -> (study, series) ids of recent series are
        cached, so an instance of a known series costs one SELECT, one UPDATE and one INSERT.
        """
        stored = staged.stored
        cached = self._parents.get(parents_key(parsed))
        renamed = False
        inserted: tuple[int, tuple[int, int]] | None = None
        try:
            with self._engine.begin() as conn:
                existing = find_existing(conn, parsed)
                if existing is None:
                    inserted = insert_rows(conn, parsed, stored, calling_ae, source, cached)
                    staged.rename()
                    renamed = True
        except BaseException:
            if renamed:  # renamed into place but the commit failed: take it back
                self.file_store.delete(stored.relative_path)
            raise
        if existing is not None:
            # A file retention removed stays removed (the copy sent again is discarded): putting it back
            # would leave patient data on disk that retention no longer looks at.
            kept = self.file_store.path(existing.file_path)
            restored = not existing.purged and not kept.exists()
            replaced = restored
            if restored:
                changed = stored.sha256 != existing.sha256
                if changed:
                    # The copy sent again (another transfer syntax, a correction) is what the file will
                    # hold: its row says so first, or `storage check --verify` calls the file damaged.
                    with self._engine.begin() as conn:
                        describe_file(conn, existing.instance_pk, existing.sha256, parsed, stored, source)
                LOGGER.warning("instance %d had lost its file; restored from the copy sent again%s",
                               existing.instance_pk, " (not the bytes of the first copy)" if changed else "")
                staged.rename(existing.file_path)
                staged.sync_directory()
            elif not existing.purged and stored.sha256 == existing.sha256 and \
                    file_sha256(kept) != existing.sha256:
                # A damaged disk (found by `cxr-node storage check --verify`): the same bytes sent again
                # are how an operator repairs it, and what the row has always described.
                LOGGER.warning("instance %d's file was damaged; replaced by the same copy sent again",
                               existing.instance_pk)
                staged.rename(existing.file_path)
                staged.sync_directory()
                replaced = True
            reopened = replaced and self._retry_failed(existing)
            # Bytes compare only within one encoding and one kind of file meta: a PACS re-sends an
            # unchanged image in another transfer syntax as a matter of course.
            alike = (existing.transfer_syntax_uid, existing.source) == (str(parsed.transfer_syntax), source)
            differs = not restored and alike and existing.sha256 != stored.sha256
            return IngestResult(instance_pk=existing.instance_pk, study_pk=existing.study_pk, duplicate=True,
                                size_bytes=stored.size_bytes if restored else existing.size_bytes,
                                differs=differs, restored=restored, reopened=reopened)
        assert inserted is not None
        instance_pk, parents = inserted
        staged.sync_directory()
        self._remember(parents_key(parsed), parents)
        return IngestResult(instance_pk=instance_pk, study_pk=parents[0], duplicate=False,
                            size_bytes=stored.size_bytes)

    def _retry_failed(self, existing: ExistingInstance) -> bool:
        """An image that failed for want of the file this copy brought back is tried again
        (:func:`retry_failed_instance`); whether its study was opened for it. A failure is logged: the
        copy is stored, and a sender told otherwise would send it again to no effect (the file is back)."""
        try:
            with self._engine.begin() as conn:
                return retry_failed_instance(conn, existing.instance_pk, existing.study_pk)
        except (SQLAlchemyError, DatabaseUnavailableError) as exc:
            LOGGER.error("instance %d: its file is back but it could not be opened for processing (%s)",
                         existing.instance_pk, type(exc).__name__)
            return False

    def _record_with_retries(self, parsed: ParsedInstance, staged: StagedFile, calling_ae: str,
                             source: str) -> IngestResult:
        for attempt in range(1, _RETRIES_ON_CONFLICT + 1):
            try:
                return self._record(parsed, staged, calling_ae, source)
            except IntegrityError as exc:
                # Another association created the same study/series meanwhile: retry sees its rows.
                with self._parents_lock:
                    self._parents.pop(parents_key(parsed), None)
                if attempt == _RETRIES_ON_CONFLICT:
                    raise DatabaseUnavailableError("database kept refusing the instance rows") from exc
            except DataError as exc:  # a value no retry will make storable: the sender must not retry
                raise InvalidDatasetError(
                    f"a header value the database cannot store ({type(exc.orig).__name__})"
                ) from exc
            except DBAPIError as exc:
                with self._parents_lock:
                    self._parents.pop(parents_key(parsed), None)
                if not waits_for_a_resource(exc):  # a REVOKE, a schema behind the code: no wait mends it
                    LOGGER.error("the database refused an instance's rows (%s, SQLSTATE %s): a configuration "
                                 "error; the sender is told to retry later", type(exc.orig).__name__,
                                 getattr(exc.orig, "sqlstate", None) or "-")
                    raise DatabaseUnavailableError(
                        f"node database refused the write ({type(exc.orig).__name__}); retry later"
                    ) from exc
                raise DatabaseUnavailableError(f"database unavailable ({type(exc.orig).__name__})") from exc
            except SQLAlchemyError as exc:
                raise DatabaseUnavailableError(f"database error ({type(exc).__name__})") from exc
        raise AssertionError("unreachable")

    def _remember(self, key: tuple[str, str, str, str], parents: tuple[int, int]) -> None:
        with self._parents_lock:
            self._parents[key] = parents
            while len(self._parents) > _PARENT_CACHE_SIZE:
                self._parents.pop(next(iter(self._parents)), None)


def _names(meta: Dataset | None, sop_class: str, sop_instance: str) -> bool:
    """Whether a file meta names this SOP class and instance (as its Media Storage SOP Class and Instance
    UIDs)."""
    if meta is None:
        return False
    named = (str(meta.get(keyword, "") or "").strip() for keyword in
             ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"))
    return tuple(named) == (sop_class, sop_instance)


def ingest_bytes(
    session_factory: sessionmaker[Session],
    file_store: FileStore,
    data: bytes,
    *,
    calling_ae: str,
    source: str,
    on_stored: Callable[[IngestResult], None] | None = None,
    results_dir: Path | None = None,
) -> IngestResult:
    """Ingest a Part 10 file from an upload (the contract the web console uses)."""
    return Ingestor(session_factory, file_store, on_stored=on_stored, results_dir=results_dir).ingest_bytes(
        data, calling_ae=calling_ae, source=source
    )
