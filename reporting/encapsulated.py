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
from reporting.study import UTF8, date_result, dicom_date, dicom_datetime, dicom_time, header, in_study_time
from reporting.types import NodeIdentity

LOGGER = logging.getLogger(__name__)

DEFAULT_TITLE = "Chest X-ray AI analysis (decision support, not a diagnosis)"
SERIES_DESCRIPTION = "AI chest X-ray report (PDF, decision support)"


def build_encapsulated_pdf(
    pdf: bytes,
    source: pydicom.Dataset,
    node: NodeIdentity,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9002,
    title: str = DEFAULT_TITLE,
    instance_number: int = 1,
    created_at: datetime | None = None,
    referenced: Sequence[pydicom.Dataset] = (),
) -> pydicom.Dataset:
    """An Encapsulated PDF Storage instance in ``source``'s study, in a new series.

    Patient and study modules are copied from ``source``. ``referenced`` lists the analysed instances
    (Source Instance Sequence); ``source`` alone when empty. ``created_at`` (default: now) sets Content
    Date/Time; pass the analysis time to make rebuilds byte-identical.
    """
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("not a PDF document")
    study = header(source)
    moment, offset = in_study_time(created_at or datetime.now().astimezone(), source)
    ds = hd.SOPClass(
        study_instance_uid=str(study.StudyInstanceUID),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=EncapsulatedPDFStorage,
        instance_number=instance_number,
        modality="DOC",
        manufacturer=node.manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
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
    ds.BurnedInAnnotation = "YES"  # the pages carry patient identifiers
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(codes.DIAGNOSTIC_IMAGING_REPORT)]
    ds.VerificationFlag = "UNVERIFIED"
    ds.SourceInstanceSequence = DicomSequence([_reference(item) for item in (referenced or [source])])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf
    ds.EncapsulatedDocumentLength = len(pdf)
    LOGGER.debug("built Encapsulated PDF of %d bytes", len(pdf))
    return ds


def _reference(instance: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = instance.SOPClassUID
    item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
    return item
