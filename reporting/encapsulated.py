"""Encapsulated PDF instance: the PDF summary as a DICOM object, so the PACS files it with the study."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
import pydicom
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from reporting import codes
from reporting.study import (
    FIRST,
    UTF8,
    date_result,
    dicom_date,
    dicom_datetime,
    dicom_time,
    header,
    in_study_time,
    revision_description,
    revision_series_number,
)
from reporting.types import NodeIdentity, Revision

LOGGER = logging.getLogger(__name__)

DEFAULT_TITLE = "Chest X-ray AI analysis (decision support, not a diagnosis)"
SERIES_DESCRIPTION = "AI chest X-ray report (PDF, decision support)"
SHORT_DESCRIPTION = "AI chest X-ray report (PDF)"  # a later revision's, with its number


def build_encapsulated_pdf(
    pdf: bytes,
    source: pydicom.Dataset,
    node: NodeIdentity,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9002,
    title: str = DEFAULT_TITLE,
    created_at: datetime | None = None,
    referenced: Sequence[pydicom.Dataset] = (),
    revision: Revision = FIRST,
    identifies_patient: bool = True,
) -> pydicom.Dataset:
    """An Encapsulated PDF Storage instance in ``source``'s study, in a new series.

    Patient and study modules are copied from ``source``. ``referenced`` lists the instances the document
    is about (Source Instance Sequence: those analysed, or for a notice each one not analysed); ``source``
    alone when empty. ``created_at`` (default: now) sets Content
    Date/Time; pass the analysis time to make rebuilds byte-identical. A later ``revision`` is told apart
    as the SR's is (:func:`reporting.sr.build_sr`): Instance Number, Series Number, Series Description,
    and a Document Title that names the report it replaces.

    ``identifies_patient`` says whether the pages name the patient (Burned In Annotation, PS3.3 C.24.2:
    YES for the report; NO for a "not analysed" notice, whose page holds no patient identification).
    """
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("not a PDF document")
    study = header(source)
    moment, offset = in_study_time(created_at or datetime.now().astimezone(), source)
    ds = hd.SOPClass(
        study_instance_uid=str(study.StudyInstanceUID),
        series_instance_uid=series_instance_uid,
        series_number=revision_series_number(series_number, revision),
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=EncapsulatedPDFStorage,
        instance_number=revision.number,
        modality="DOC",
        manufacturer=node.manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=revision_description(SERIES_DESCRIPTION, SHORT_DESCRIPTION, revision, source),
        manufacturer_model_name=node.model_name,
        software_versions=node.software_version,
        institution_name=node.institution_name or None,
        content_date=dicom_date(moment),
        content_time=dicom_time(moment),
        series_date=dicom_date(moment),
        series_time=dicom_time(moment),
        specific_character_set=UTF8,
    )
    ds.copy_patient_and_study_information(study)
    ds.SpecificCharacterSet = UTF8
    date_result(ds, moment, offset)
    if node.station_name:
        ds.StationName = node.station_name
    # SC Equipment module: the document was made by software, not digitised
    ds.ConversionType = "SYN"
    # Encapsulated Document module
    ds.AcquisitionDateTime = dicom_datetime(moment)
    # whether the pages carry patient identifiers: de-identification (PS3.15 E.1) drops or redacts a YES
    ds.BurnedInAnnotation = "YES" if identifies_patient else "NO"
    ds.DocumentTitle = title + replacement_note(revision, source)
    ds.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(codes.DIAGNOSTIC_IMAGING_REPORT)]
    ds.VerificationFlag = "UNVERIFIED"
    ds.SourceInstanceSequence = DicomSequence([_reference(item) for item in (referenced or [source])])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf
    ds.EncapsulatedDocumentLength = len(pdf)
    LOGGER.debug("built Encapsulated PDF of %d bytes", len(pdf))
    return ds


def replacement_note(revision: Revision, source: pydicom.Dataset) -> str:
    """What a later revision's Document Title adds: which revision, and the analysis time (in the study's
    time) of the report it replaces; "" for the first."""
    if revision.number <= 1:
        return ""
    if revision.replaces is None:
        return f" (revision {revision.number})"
    moment, _ = in_study_time(revision.replaces, source)
    return f" (revision {revision.number}, replaces the report of {moment:%Y-%m-%d %H:%M:%S})"


def _reference(instance: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = instance.SOPClassUID
    item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
    return item
