"""Small synthetic CR instances for node tests (made here, no external data)."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from tests import peers


def make_cr(
    *,
    rows: int = 64,
    columns: int = 64,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str = "Doe^Jane",
    patient_id: str = "PID-1",
    seed: int = 0,
) -> Dataset:
    """A valid little CR image (MONOCHROME1, 12 bits stored) with fresh UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC123"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.StudyDescription = "CHEST PA"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    pixels = np.random.default_rng(seed).integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """Part 10 encoding of ``ds`` (preamble, file meta, dataset)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(to_bytes(ds))
    return path


_OPPOSITE = {"L": "R", "R": "L", "H": "F", "F": "H", "A": "P", "P": "A"}


def stored_turned(ds: Dataset, turns: int) -> Dataset:
    """A copy of ``ds`` whose pixels are stored ``turns`` quarter turns counter-clockwise (numpy.rot90),
    uncompressed, with its Patient Orientation following: after one turn the screen's right shows what was
    at the bottom, and the bottom what was on the left."""
    pixels = np.ascontiguousarray(np.rot90(ds.pixel_array, turns))
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.PixelData = pixels.tobytes()
    out.Rows, out.Columns = pixels.shape
    row, column = list(ds.PatientOrientation)
    for _ in range(turns % 4):
        row, column = column, _OPPOSITE[row]
    out.PatientOrientation = [row, column]
    return out


def with_corrupt_rle_pixels(ds: Dataset) -> Dataset:
    """``ds`` (changed in place and returned) with the pixels of pydicom's RLE test image, 200 bytes of
    its second segment zeroed: the Rust RLE decoder (pylibjpeg-rle) then writes past its output and
    panics (pyo3's PanicException, a BaseException) instead of raising an error."""
    source = pydicom.dcmread(peers.pydicom_data_file("MR_small_RLE.dcm"))
    frame = bytearray(next(generate_frames(source.PixelData, number_of_frames=1)))
    frame[3000:3200] = bytes(200)
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):  # fmt: skip
        setattr(ds, keyword, source[keyword].value)
    ds.pop("NumberOfFrames", None)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    return ds


def set_raw(ds: Dataset, keyword: str, value: bytes) -> None:
    """Set ``keyword`` to ``value`` as a file carries it, unchecked and decoded only when read: pydicom
    refuses to *write* an invalid value, but it reads one (with a warning), and so does the node."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    value += b" " * (len(value) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


def make_non_image(
    sop_class: str, *, like: Dataset, modality: str = "SR", series_uid: str | None = None
) -> Dataset:
    """A non-image object of ``sop_class`` in the study of ``like`` (same patient and study): an SR with
    a one-item content tree, or, for Encapsulated PDF Storage, a one-page PDF. Fresh series and instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        if keyword in like:
            setattr(ds, keyword, like[keyword].value)
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    if sop_class == "1.2.840.10008.5.1.4.1.1.104.1":  # Encapsulated PDF Storage
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.DocumentTitle = "Outside report"
        ds.BurnedInAnnotation = "YES"
        ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
        return ds
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "113701", "DCM"
    concept.CodeMeaning = "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentSequence = []
    return ds
