"""Ingest one received instance: parse, validate, write durably, record rows — then, and only then, succeed.

Shared by the C-STORE handler (:mod:`dicom_node.scp`) and web uploads. The bytes the sender encoded are
written as received (preamble + file meta + dataset) rather than re-encoded, so the stored file is exactly
what the modality produced. A repeated SOP Instance UID is a success without a second row; the first
file is kept. On any failure nothing is left behind: the file only takes its final name inside the
transaction that records it, and is removed again if that transaction cannot commit.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import parse_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    AllTransferSyntaxes,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import Connection, CursorResult, Engine, Table, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    InvalidDatasetError,
    UndecodableDatasetError,
    UnsupportedSopClassError,
)
from dicom_node.store.files import FileStore, StagedFile, StoredFile, instance_path
from dicom_node.store.models import Instance, InstanceState, Patient, Series, Study, StudyState, utcnow

LOGGER = logging.getLogger(__name__)

#: Image storage SOP classes the node accepts (chest radiography and its secondary captures).
ACCEPTED_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

IMPLEMENTATION_VERSION_NAME = f"CXRNODE_{__version__}"[:16]
_RETRIES_ON_CONFLICT = 3
_LOCK_STRIPES = 64
_PARENT_CACHE_SIZE = 256


def decodable_transfer_syntaxes() -> list[UID]:
    """Every transfer syntax whose pixel data pydicom can decode with the plugins installed here."""
    found: list[UID] = []
    for uid in AllTransferSyntaxes:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            continue
        if decoder.is_available:
            found.append(uid)
    # Commonest first: pynetdicom picks the first syntax both sides share for a context.
    preferred = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    return preferred + [uid for uid in found if uid not in preferred]


@dataclass(frozen=True)
class IngestResult:
    """Outcome of a successful ingest (also for a duplicate, which is a success)."""

    instance_pk: int
    study_pk: int
    duplicate: bool
    size_bytes: int


@dataclass(frozen=True)
class _Parsed:
    """Validated facts about an instance; rows are built from this, never from a half-read dataset."""

    ds: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: UID


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """A display value, or "" when absent or undecodable (display fields never fail an ingest)."""
    try:
        value = ds.get(keyword, "")
        return ("" if value is None else str(value)).strip()[:limit]
    except (ValueError, TypeError, LookupError, UnicodeError):
        LOGGER.warning("element %s could not be decoded; stored empty", keyword)
        return ""


def _integer(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError, LookupError):
        return None


def _require_uid(ds: Dataset, keyword: str) -> str:
    try:
        value = str(ds.get(keyword, "") or "").strip()
    except (ValueError, TypeError) as exc:
        raise UndecodableDatasetError(f"{keyword} cannot be read") from exc
    if not value:
        raise InvalidDatasetError(f"dataset has no {keyword}")
    if len(value) > 64 or not all(part.isdigit() for part in value.split(".")):
        raise InvalidDatasetError(f"{keyword} is not a valid UID")
    return value


def _check_pixel_data(ds: Dataset, transfer_syntax: UID) -> None:
    """Structural check of Pixel Data without decoding it (decoding a 7 MB JPEG 2000 costs ~1 s)."""
    if "PixelData" not in ds:
        raise InvalidDatasetError("dataset has no Pixel Data")
    try:
        rows = int(ds.Rows)
        columns = int(ds.Columns)
        bits_allocated = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidDatasetError("image pixel module incomplete (rows, columns, bits allocated)") from exc
    if min(rows, columns, bits_allocated, samples, frames) < 1:
        raise InvalidDatasetError("image pixel module has zero dimensions")
    data = ds.PixelData
    if not isinstance(data, bytes | bytearray):
        raise UndecodableDatasetError("pixel data cannot be read")
    if transfer_syntax.is_encapsulated:
        try:
            count, _offsets = parse_fragments(data)
        except (ValueError, TypeError) as exc:
            raise UndecodableDatasetError("encapsulated pixel data is malformed or truncated") from exc
        if count < 1:
            raise UndecodableDatasetError("encapsulated pixel data has no fragments")
        return
    expected = (rows * columns * samples * frames * bits_allocated + 7) // 8
    if len(data) < expected:
        raise UndecodableDatasetError("pixel data shorter than the image it describes (truncated)")


_PARSE_ERRORS = (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OverflowError, zlib.error)


def parse_instance(file_bytes: bytes, *, expect_sop_class: str | None = None,
                   expect_sop_instance: str | None = None) -> Dataset:
    """Parse a Part 10 byte stream; map every parse failure to a named error (no PHI in messages)."""
    try:
        ds = dcmread(BytesIO(file_bytes), force=True)
        meta = getattr(ds, "file_meta", None)
        syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
        deflated = syntax == DeflatedExplicitVRLittleEndian
        _check_complete(ds, len(file_bytes), file_bytes[-8:], check_end=not deflated)
        if syntax.is_transfer_syntax:
            _check_encoding(ds, syntax)
    except _PARSE_ERRORS as exc:
        raise UndecodableDatasetError(f"dataset cannot be parsed ({type(exc).__name__})") from exc
    except NotImplementedError as exc:
        raise UndecodableDatasetError("dataset uses an encoding that cannot be read") from exc
    _check_identity(ds, expect_sop_class, expect_sop_instance)
    return ds


def parse_network_dataset(dataset_bytes: bytes, *, transfer_syntax: str, sop_class_uid: str,
                          sop_instance_uid: str) -> Dataset:
    """Parse a C-STORE data set in its negotiated transfer syntax, without building a file first."""
    syntax = UID(transfer_syntax)
    if syntax == DeflatedExplicitVRLittleEndian or not syntax.is_transfer_syntax:
        prefix = part10_prefix(sop_class_uid, sop_instance_uid, syntax)
        return parse_instance(prefix + dataset_bytes, expect_sop_class=sop_class_uid,
                              expect_sop_instance=sop_instance_uid)
    try:
        ds = read_dataset(BytesIO(dataset_bytes), syntax.is_implicit_VR, syntax.is_little_endian)
        _check_complete(ds, len(dataset_bytes), dataset_bytes[-8:], check_end=True)
        _check_encoding(ds, syntax)
    except _PARSE_ERRORS as exc:
        raise UndecodableDatasetError(f"dataset cannot be parsed ({type(exc).__name__})") from exc
    except NotImplementedError as exc:
        raise UndecodableDatasetError("dataset uses an encoding that cannot be read") from exc
    _check_identity(ds, sop_class_uid, sop_instance_uid)
    return ds


def _check_identity(ds: Dataset, expect_sop_class: str | None, expect_sop_instance: str | None) -> None:
    sop_class = _require_uid(ds, "SOPClassUID")
    sop_instance = _require_uid(ds, "SOPInstanceUID")
    if expect_sop_class is not None and sop_class != expect_sop_class:
        raise InvalidDatasetError("SOP Class UID differs from the C-STORE request's")
    if expect_sop_instance is not None and sop_instance != expect_sop_instance:
        raise InvalidDatasetError("SOP Instance UID differs from the C-STORE request's")


_UNDEFINED_LENGTH = 0xFFFFFFFF
_DELIMITER = {True: b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", False: b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"}


def _check_complete(ds: Dataset, total_length: int, tail: bytes, *, check_end: bool) -> None:
    """Detect truncation, which pydicom tolerates silently (short values, a missing delimiter).

    Every top-level value must have its declared length, and the stream must end exactly where the
    last element ends (or with the sequence delimiter of undefined-length encapsulated pixel data).
    """
    last: RawDataElement | None = None
    for tag in ds.keys():
        element = ds.get_item(tag)
        if not isinstance(element, RawDataElement):
            continue
        if element.length != _UNDEFINED_LENGTH and element.value is not None:
            if len(element.value) != element.length:
                raise UndecodableDatasetError("dataset truncated inside a data element")
        last = element
    if last is None:
        raise UndecodableDatasetError("no data elements could be read")
    if not check_end:
        return  # deflated: offsets refer to the inflated stream; zlib reports truncation itself
    if last.length == _UNDEFINED_LENGTH:
        if tail != _DELIMITER[last.is_little_endian]:
            raise UndecodableDatasetError("dataset truncated before its final sequence delimiter")
    elif last.value_tell + last.length != total_length:
        raise UndecodableDatasetError("dataset truncated between data elements")


def _check_encoding(ds: Dataset, syntax: UID) -> None:
    """The bytes must be in the transfer syntax they claim; pydicom silently switches VR mode otherwise,
    and the file would then be stored under a transfer syntax other tools cannot read it with."""
    for tag in ds.keys():
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement):
            if element.is_implicit_VR != syntax.is_implicit_VR:
                raise UndecodableDatasetError("data set encoding does not match its transfer syntax")
            return


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and file meta for a dataset received over the network, to write before its bytes."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


class Ingestor:
    """Turns received bytes into a durable file plus committed rows.

    ``on_stored`` runs after the commit (the node arms the study's settle timer there); its failure is
    logged, never reported to the sender, because the instance is already safe.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        file_store: FileStore,
        *,
        on_stored: Callable[[IngestResult], None] | None = None,
        accepted_sop_classes: tuple[str, ...] = ACCEPTED_SOP_CLASSES,
    ) -> None:
        self.session_factory = session_factory
        engine = session_factory.kw.get("bind")
        if not isinstance(engine, Engine):
            raise ConfigurationError("the session factory must be bound to an engine")
        self._engine = engine
        self.file_store = file_store
        self.on_stored = on_stored
        self.accepted_sop_classes = frozenset(accepted_sop_classes)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        # series uid -> (study pk, series pk) of recently stored series
        self._parents: dict[str, tuple[int, int]] = {}
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
        return self._ingest(ds, [prefix, dataset_bytes], UID(transfer_syntax), calling_ae, "dimse")

    def ingest_bytes(self, data: bytes, *, calling_ae: str, source: str) -> IngestResult:
        """A Part 10 file (or a bare dataset) from an upload; written as given when it has file meta."""
        ds = parse_instance(data)
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
        if not transfer_syntax:
            # A bare dataset: pydicom guessed its encoding; keep it, add the file meta in front.
            implicit = ds.original_encoding[0]
            transfer_syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
            sop_class = _require_uid(ds, "SOPClassUID")
            chunks = [part10_prefix(sop_class, _require_uid(ds, "SOPInstanceUID"), transfer_syntax), data]
        elif _has_preamble(data):
            chunks = [data]
        else:
            chunks = [b"\x00" * 128, data]  # "DICM" + meta without preamble
        if _require_uid(ds, "SOPClassUID") not in self.accepted_sop_classes:
            raise UnsupportedSopClassError("SOP class not accepted by this node")
        return self._ingest(ds, chunks, transfer_syntax, calling_ae, source)

    # The common path ---------------------------------------------------------------------------

    def _ingest(
        self, ds: Dataset, chunks: list[bytes], transfer_syntax: UID, calling_ae: str, source: str
    ) -> IngestResult:
        if transfer_syntax not in AllTransferSyntaxes:
            raise UndecodableDatasetError("unknown transfer syntax")
        sop_class = _require_uid(ds, "SOPClassUID")
        sop_instance = _require_uid(ds, "SOPInstanceUID")
        study_uid = _require_uid(ds, "StudyInstanceUID")
        series_uid = _require_uid(ds, "SeriesInstanceUID")
        _check_pixel_data(ds, transfer_syntax)
        parsed = _Parsed(ds, sop_class, sop_instance, study_uid, series_uid, transfer_syntax)
        with self._locks[hash(sop_instance) % _LOCK_STRIPES]:
            staged = self.file_store.stage(instance_path(study_uid, series_uid, sop_instance), chunks)
            try:
                result = self._record_with_retries(parsed, staged, calling_ae, source)
            finally:
                staged.discard()  # a duplicate's copy, or a failed attempt's; no-op once published
        if result.duplicate:
            LOGGER.info("instance %d received again from %s: kept the first copy", result.instance_pk,
                        calling_ae)
        else:
            LOGGER.info("stored instance %d (study %d, %d bytes) from %s", result.instance_pk,
                        result.study_pk, result.size_bytes, calling_ae)
            if self.on_stored is not None:
                try:
                    self.on_stored(result)
                except Exception as exc:  # the instance is safe; the periodic sweep re-arms the study
                    LOGGER.error("post-store hook failed for instance %d: %s", result.instance_pk,
                                 type(exc).__name__)
        return result

    def _record(self, parsed: _Parsed, staged: StagedFile, calling_ae: str, source: str) -> IngestResult:
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
        cached = self._parents.get(parsed.series_uid)
        renamed = False
        inserted: tuple[int, tuple[int, int]] | None = None
        try:
            with self._engine.begin() as conn:
                existing = _find_existing(conn, parsed.sop_instance_uid)
                if existing is None:
                    inserted = _insert_rows(conn, parsed, stored, calling_ae, source, cached)
                    staged.rename()
                    renamed = True
        except BaseException:
            if renamed:  # renamed into place but the commit failed: take it back
                self.file_store.delete(stored.relative_path)
            raise
        if existing is not None:
            result, file_path = existing
            if not self.file_store.path(file_path).exists():
                LOGGER.warning("instance %d had lost its file; restored from the copy sent again",
                               result.instance_pk)
                staged.rename(file_path)
                staged.sync_directory()
            return result
        assert inserted is not None
        instance_pk, parents = inserted
        staged.sync_directory()
        self._remember(parsed.series_uid, parents)
        return IngestResult(instance_pk=instance_pk, study_pk=parents[0], duplicate=False,
                            size_bytes=stored.size_bytes)

    def _record_with_retries(self, parsed: _Parsed, staged: StagedFile, calling_ae: str,
                             source: str) -> IngestResult:
        for attempt in range(1, _RETRIES_ON_CONFLICT + 1):
            try:
                return self._record(parsed, staged, calling_ae, source)
            except IntegrityError as exc:
                # Another association created the same study/series meanwhile: retry sees its rows.
                with self._parents_lock:
                    self._parents.pop(parsed.series_uid, None)
                if attempt == _RETRIES_ON_CONFLICT:
                    raise DatabaseUnavailableError("database kept refusing the instance rows") from exc
            except DBAPIError as exc:
                with self._parents_lock:
                    self._parents.pop(parsed.series_uid, None)
                raise DatabaseUnavailableError(f"database unavailable ({type(exc.orig).__name__})") from exc
            except SQLAlchemyError as exc:
                raise DatabaseUnavailableError(f"database error ({type(exc).__name__})") from exc
        raise AssertionError("unreachable")

    def _remember(self, series_uid: str, parents: tuple[int, int]) -> None:
        with self._parents_lock:
            self._parents[series_uid] = parents
            while len(self._parents) > _PARENT_CACHE_SIZE:
                self._parents.pop(next(iter(self._parents)), None)


def _has_preamble(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


_PATIENT = cast(Table, Patient.__table__)
_STUDY = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCE = cast(Table, Instance.__table__)


def _new_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None:
        raise DatabaseUnavailableError("database returned no primary key")
    return int(key[0])


def _find_existing(conn: Connection, sop_instance: str) -> tuple[IngestResult, str] | None:
    """The stored instance with this SOP Instance UID (as a duplicate result) and its file path."""
    row = conn.execute(
        select(_INSTANCE.c.id, _INSTANCE.c.size_bytes, _SERIES.c.study_pk, _INSTANCE.c.file_path)
        .join(_SERIES, _INSTANCE.c.series_pk == _SERIES.c.id)
        .where(_INSTANCE.c.sop_instance_uid == sop_instance)
    ).first()
    if row is None:
        return None
    result = IngestResult(instance_pk=row[0], study_pk=row[2], duplicate=True, size_bytes=row[1])
    return result, str(row[3])


def _insert_rows(conn: Connection, parsed: _Parsed, stored: StoredFile, calling_ae: str, source: str,
                 cached: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
    """Instance row plus its parents; returns (instance pk, (study pk, series pk))."""
    parents = _touch_parents(conn, parsed, cached)
    if parents is None:  # not cached, or the cached row disappeared: full upsert
        parents = _upsert_parents(conn, parsed, calling_ae)
    return _insert_instance(conn, parsed, stored, parents[1], calling_ae, source), parents


def _touch_parents(conn: Connection, parsed: _Parsed,
                   cached: tuple[int, int] | None) -> tuple[int, int] | None:
    """Known series: bump the study's last_received_at; None if the cached study row is gone."""
    if cached is None:
        return None
    updated = conn.execute(
        update(_STUDY).where(_STUDY.c.id == cached[0], _STUDY.c.study_instance_uid == parsed.study_uid)
        .values(last_received_at=utcnow())
    )
    return cached if updated.rowcount == 1 else None


def _upsert_parents(conn: Connection, parsed: _Parsed, calling_ae: str) -> tuple[int, int]:
    ds = parsed.ds
    now = utcnow()
    study_pk = conn.execute(
        select(_STUDY.c.id).where(_STUDY.c.study_instance_uid == parsed.study_uid)
    ).scalar()
    if study_pk is None:
        patient_pk = _upsert_patient(conn, ds)
        study_pk = _new_id(conn.execute(insert(_STUDY).values(
            study_instance_uid=parsed.study_uid,
            patient_pk=patient_pk,
            accession_number=_text(ds, "AccessionNumber", 16),
            study_date=_text(ds, "StudyDate", 8),
            study_time=_text(ds, "StudyTime", 16),
            study_description=_text(ds, "StudyDescription", 64),
            referring_physician_name=_text(ds, "ReferringPhysicianName", 324),
            calling_ae=calling_ae[:16],
            state=StudyState.RECEIVED,
            first_received_at=now,
            last_received_at=now,
        )))
    else:
        conn.execute(update(_STUDY).where(_STUDY.c.id == study_pk).values(last_received_at=now))
    series_pk = conn.execute(
        select(_SERIES.c.id).where(_SERIES.c.series_instance_uid == parsed.series_uid)
    ).scalar()
    if series_pk is None:
        series_pk = _new_id(conn.execute(insert(_SERIES).values(
            series_instance_uid=parsed.series_uid,
            study_pk=study_pk,
            modality=_text(ds, "Modality", 16),
            series_number=_integer(ds, "SeriesNumber"),
            body_part_examined=_text(ds, "BodyPartExamined", 16),
            series_description=_text(ds, "SeriesDescription", 64),
        )))
    return int(study_pk), int(series_pk)


def _insert_instance(conn: Connection, parsed: _Parsed, stored: StoredFile, series_pk: int,
                     calling_ae: str, source: str) -> int:
    ds = parsed.ds
    laterality = _text(ds, "ImageLaterality", 16) or _text(ds, "Laterality", 16)
    return _new_id(conn.execute(insert(_INSTANCE).values(
        sop_instance_uid=parsed.sop_instance_uid,
        sop_class_uid=parsed.sop_class_uid,
        series_pk=series_pk,
        instance_number=_integer(ds, "InstanceNumber"),
        transfer_syntax_uid=str(parsed.transfer_syntax),
        view_position=_text(ds, "ViewPosition", 16),
        image_laterality=laterality,
        rows=_integer(ds, "Rows"),
        columns=_integer(ds, "Columns"),
        file_path=stored.relative_path,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        calling_ae=calling_ae[:16],
        source=source[:16],
        received_at=utcnow(),
        state=InstanceState.RECEIVED,
    )))


def _upsert_patient(conn: Connection, ds: Dataset) -> int:
    patient_id = _text(ds, "PatientID", 64)
    issuer = _text(ds, "IssuerOfPatientID", 64)
    fields: dict[str, Any] = {
        "name": _text(ds, "PatientName", 324),
        "birth_date": _text(ds, "PatientBirthDate", 8),
        "sex": _text(ds, "PatientSex", 16),
    }
    row = conn.execute(
        select(_PATIENT.c.id, _PATIENT.c.name, _PATIENT.c.birth_date, _PATIENT.c.sex)
        .where(_PATIENT.c.patient_id == patient_id, _PATIENT.c.issuer_of_patient_id == issuer)
    ).first()
    if row is None:
        return _new_id(conn.execute(insert(_PATIENT).values(
            patient_id=patient_id, issuer_of_patient_id=issuer, **fields)))
    # Keep what we knew; fill what was missing (a later image may carry more demographics).
    known = {"name": row.name, "birth_date": row.birth_date, "sex": row.sex}
    missing = {key: value for key, value in fields.items() if value and not known[key]}
    if missing:
        conn.execute(update(_PATIENT).where(_PATIENT.c.id == row.id).values(**missing))
    return int(row.id)


def ingest_bytes(
    session_factory: sessionmaker[Session],
    file_store: FileStore,
    data: bytes,
    *,
    calling_ae: str,
    source: str,
    on_stored: Callable[[IngestResult], None] | None = None,
) -> IngestResult:
    """Ingest a Part 10 file from an upload (the contract the web console uses)."""
    return Ingestor(session_factory, file_store, on_stored=on_stored).ingest_bytes(
        data, calling_ae=calling_ae, source=source
    )
