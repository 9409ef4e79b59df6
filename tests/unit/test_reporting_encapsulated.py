"""Encapsulated PDF and heat-map Secondary Capture: filed in the source's study, identifiable, readable."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.uid import (
    EncapsulatedPDFStorage,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    SecondaryCaptureImageStorage,
)

from reporting.encapsulated import build_encapsulated_pdf
from reporting.heatmap import colourise, overlay
from reporting.pdf import build_pdf
from reporting.secondary_capture import (
    BAND_COLOUR,
    NOT_FOR_DIAGNOSIS,
    NoHeatmapError,
    build_heatmap_sc,
    heatmap_caption,
)
from reporting.types import AnalysedImage, Revision
from tests.unit.test_reporting_cases import (
    ANALYSED_AT,
    BINARY,
    EARLIER,
    MESSY_VALUES,
    NODE,
    analysed,
    heatmap,
    japanese_source,
    messy_source,
    prediction,
    preview,
    radiograph,
    sparse_source,
    unicode_source,
)

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")]


def reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    settings = config.settings
    saved = settings.writing_validation_mode
    settings.writing_validation_mode = config.RAISE
    try:
        ds.save_as(buffer, enforce_file_format=True)
    finally:
        settings.writing_validation_mode = saved
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize(
    "source_factory", [unicode_source, japanese_source, sparse_source], ids=["unicode", "iso2022", "sparse"]
)
def test_encapsulated_pdf_carries_the_pdf_in_the_source_study(source_factory: object) -> None:
    source = source_factory()  # type: ignore[operator]
    pdf = build_pdf([analysed(source)], NODE, analysed_at=ANALYSED_AT)
    ds = reread(
        build_encapsulated_pdf(
            pdf,
            source,
            NODE,
            series_instance_uid="1.2.826.0.1.3680043.8.498.2001",
            sop_instance_uid="1.2.826.0.1.3680043.8.498.2002",
            created_at=ANALYSED_AT,
        )
    )
    assert ds.SOPClassUID == EncapsulatedPDFStorage
    assert ds.file_meta.MediaStorageSOPClassUID == EncapsulatedPDFStorage
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID == "1.2.826.0.1.3680043.8.498.2001"
    assert ds.SeriesNumber == 9002 and ds.Modality == "DOC"
    assert str(ds.PatientName) == str(source.PatientName) and ds.PatientID == source.PatientID
    assert ds.AccessionNumber == source.get("AccessionNumber", "")
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength] == pdf
    assert ds.DocumentTitle.startswith("Chest X-ray AI analysis")
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.SpecificCharacterSet == "ISO_IR 192"


def test_encapsulated_pdf_refuses_what_is_not_a_pdf() -> None:
    with pytest.raises(ValueError):
        build_encapsulated_pdf(
            b"<html>", unicode_source(), NODE, series_instance_uid="1.2.3", sop_instance_uid="1.2.4"
        )


def test_heatmap_secondary_capture_is_marked_and_in_the_study() -> None:
    image = analysed(unicode_source())
    ds = reread(
        build_heatmap_sc(
            image,
            NODE,
            series_instance_uid="1.2.826.0.1.3680043.8.498.3001",
            sop_instance_uid="1.2.826.0.1.3680043.8.498.3002",
        )
    )
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.StudyInstanceUID == image.source.StudyInstanceUID and ds.SeriesNumber == 9003
    assert str(ds.PatientName) == "Müller^Zoë"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "YES"  # the source does not say; its preview may show a name
    assert "not for diagnosis" in ds.ImageComments and "not for diagnosis" in ds.DerivationDescription
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == image.source.SOPInstanceUID
    assert list(ds.PatientOrientation) == ["L", "F"]
    pixels = ds.pixel_array
    assert image.preview is not None
    assert pixels.shape[1] == image.preview.shape[1] and pixels.shape[0] > image.preview.shape[0]
    band = pixels[: pixels.shape[0] - image.preview.shape[0]]
    red = (band[..., 0] > 150) & (band[..., 1] < 80)
    assert red.mean() > 0.6  # a red band ...
    assert ((band[..., 0] > 240) & (band[..., 1] > 240)).any()  # ... with white text: NOT_FOR_DIAGNOSIS
    assert NOT_FOR_DIAGNOSIS.startswith("AI HEAT MAP")


def test_secondary_capture_is_dated_like_the_sr_and_rebuilds_identically() -> None:
    """Dated by the analysis time in the study's offset (it took the wall clock, with no offset, so no two
    builds were the same and its times disagreed with the SR's and PDF's); Conversion Type WSD: made by
    a workstation, not a digital interface."""
    source = radiograph()  # Timezone Offset From UTC -0400
    source.AcquisitionDateTime = "20040826185059"
    image = analysed(source)

    def build() -> bytes:
        ds = build_heatmap_sc(image, NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3021",
                              sop_instance_uid="1.2.826.0.1.3680043.8.498.3022", created_at=ANALYSED_AT)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    first = build()
    ds = pydicom.dcmread(io.BytesIO(first))
    assert (ds.ContentDate, ds.ContentTime, ds.TimezoneOffsetFromUTC) == ("20261122", "054107", "-0400")
    assert (ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture) == ("20261122", "054107")
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == ("20261122", "054107")
    assert ds.ConversionType == "WSD"
    stamps = {
        item.PurposeOfReferenceCodeSequence[0].CodeMeaning: str(item.ContributionDateTime)
        for item in ds.ContributingEquipmentSequence
    }
    assert stamps == {"Acquisition Equipment": "20040826185059", "Processing Equipment": "20261122054107"}
    assert build() == first


def test_heatmap_caption_names_the_class_an_indeterminate_result_leans_to() -> None:
    sure = analysed(probabilities={"covid": 0.874, "normal": 0.031, "pneumonia": 0.095}).prediction
    unsure = analysed(probabilities={"covid": 0.20, "normal": 0.32, "pneumonia": 0.48}).prediction
    assert heatmap_caption(sure) == "COVID-19 87.4 %"
    assert heatmap_caption(unsure) == "Indeterminate: most likely Pneumonia 48.0 %"


def test_the_heat_maps_burned_in_caption_stays_inside_the_image() -> None:
    """An indeterminate result of the binary model makes the longest caption ("Indeterminate: most likely
    No COVID-19 pattern 55.0 % · resnet152-transfer 2026.11.20-ef56789"): on a 1024-pixel-wide preview it
    ran off the right edge, the model's version cut off in the PACS viewer. Smaller type keeps it in, with
    the band's margin on the right as on the left."""
    unsure = prediction({"covid": 0.45, "non-covid": 0.55}, BINARY, threshold=0.6)
    image = AnalysedImage(source=radiograph(), prediction=unsure, preview=np.full((700, 1024), 90, np.uint8))
    ds = build_heatmap_sc(image, NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3021",
                          sop_instance_uid="1.2.826.0.1.3680043.8.498.3022", created_at=ANALYSED_AT)
    pixels = ds.pixel_array
    size = 1024 // 40
    band = pixels[: int(size * 3.2)]
    assert (band[:, -(size // 2):] == BAND_COLOUR).all()  # nothing drawn in the right margin
    assert (band[int(size * 1.7):, : size * 2] != BAND_COLOUR).any()  # the caption is there


def test_secondary_capture_keeps_the_sources_burned_in_annotation() -> None:
    source = unicode_source()
    source.BurnedInAnnotation = "NO"
    ds = build_heatmap_sc(
        analysed(source), NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3011",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.3012",
    )
    assert ds.BurnedInAnnotation == "NO"


def test_pdf_and_secondary_capture_carry_header_values_highdicom_refuses() -> None:
    image = analysed(messy_source())
    pdf = build_encapsulated_pdf(
        build_pdf([image], NODE, analysed_at=ANALYSED_AT),
        image.source,
        NODE,
        series_instance_uid="1.2.826.0.1.3680043.8.498.3101",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.3102",
    )
    sc = build_heatmap_sc(
        image, NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3201", sop_instance_uid="1.2.826.0.1.3680043.8.498.3202"
    )
    for ds in (pdf, sc):
        assert {keyword: str(ds.get(keyword)) for keyword in MESSY_VALUES} == MESSY_VALUES


def test_the_heat_map_carries_the_studys_patient_and_study_attributes_as_the_pdf_does() -> None:
    """highdicom's SCImage.from_ref_dataset copies nine patient and study values: the heat map lost the
    Issuer of Patient ID, the Other Patient IDs, the Patient Study module and the Study Description that
    the SR and the PDF carry, and the source's lossy compression (review)."""
    source = unicode_source()
    source.IssuerOfPatientID = "HOSP-A"
    other = pydicom.Dataset()
    other.PatientID, other.IssuerOfPatientID = "OTHER-1", "HOSP-B"
    source.OtherPatientIDsSequence = [other]
    source.PatientAge, source.PatientWeight, source.PatientSize = "054Y", "70", "1.72"
    source.StudyDescription = "THORAX PA"
    source.AdmissionID = "ADM-7"
    source.LossyImageCompression = "01"
    source.LossyImageCompressionRatio = [10, 2.5]
    source.LossyImageCompressionMethod = ["ISO_15444_1", "ISO_10918_1"]
    image = analysed(source)
    pdf = build_encapsulated_pdf(
        build_pdf([image], NODE, analysed_at=ANALYSED_AT), source, NODE,
        series_instance_uid="1.2.826.0.1.3680043.8.498.3301",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.3302",
    )
    sc = reread(build_heatmap_sc(image, NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3401",
                                 sop_instance_uid="1.2.826.0.1.3680043.8.498.3402"))
    for keyword in ("IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge", "PatientWeight",
                    "PatientSize",
                    "StudyDescription", "AdmissionID", "PatientName", "PatientID", "AccessionNumber"):
        assert sc[keyword].value == pdf[keyword].value == source[keyword].value, keyword
    assert sc.LossyImageCompression == "01"
    assert list(sc.LossyImageCompressionRatio) == [10, 2.5]
    assert list(sc.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]
    lossless = unicode_source()
    lossless.LossyImageCompression = "00"
    plain = build_heatmap_sc(analysed(lossless), NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3501",
                             sop_instance_uid="1.2.826.0.1.3680043.8.498.3502")
    assert "LossyImageCompressionRatio" not in plain


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGExtended12Bit])
def test_the_heat_map_of_an_image_received_lossy_compressed_says_so(syntax: str) -> None:
    """A modality or PACS that sends JPEG Baseline or Extended (lossy by their process) often leaves Lossy
    Image Compression out of the header; the heat map showed those pixels, decompressed, and said nothing
    either, so a viewer took it for a copy of lossless pixels (PS3.3 C.7.6.1.1.5: once lossy, always 01).
    The transfer syntax the image came in tells it; a lossless one leaves the attributes out."""
    source = radiograph()
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        delattr(source, keyword)
    source.file_meta.TransferSyntaxUID = syntax
    sc = reread(build_heatmap_sc(analysed(source), NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3601",
                                 sop_instance_uid="1.2.826.0.1.3680043.8.498.3602"))
    assert sc.LossyImageCompression == "01"
    assert sc.LossyImageCompressionMethod == "ISO_10918_1"
    assert "LossyImageCompressionRatio" not in sc  # not known

    source.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    plain = build_heatmap_sc(analysed(source), NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3701",
                             sop_instance_uid="1.2.826.0.1.3680043.8.498.3702")
    assert "LossyImageCompression" not in plain


def test_no_secondary_capture_without_heatmap() -> None:
    with pytest.raises(NoHeatmapError):
        build_heatmap_sc(
            analysed(with_heatmap=False), NODE, series_instance_uid="1.2.3", sop_instance_uid="1.2.4"
        )


def test_overlay_colours_only_where_the_model_looked() -> None:
    image = preview()
    heat = heatmap((150, 150), centre=(0.65, 0.3))
    result = overlay(image, heat).astype(int)
    height, width = image.shape
    hot = result[int(0.65 * height), int(0.3 * width)]
    cold = result[int(0.1 * height), int(0.9 * width)]
    assert hot[0] - hot[2] > 60  # red dominates at the blob's centre
    assert abs(cold[0] - cold[2]) <= 2 and cold[0] == image[int(0.1 * height), int(0.9 * width)]
    assert tuple(colourise(np.array([0.0, 1.0]))[1]) == (128, 0, 0)


@pytest.mark.parametrize("number", [2, 13, 140])
def test_a_later_revision_of_the_pdf_and_heat_map_is_told_apart_in_the_series_list(number: int) -> None:
    """Revision n: Instance Number n, a Series Number after the earlier revisions' (the kind still in its
    last digit) and a Series Description (LO, 64 characters at most) naming the report it replaces in the
    study's time (+0930 here). The old code gave every revision Series 9002/9003, Instance 1 and one
    description."""
    source = radiograph()
    source.TimezoneOffsetFromUTC = "+0930"
    image = analysed(source)
    revision = Revision(number, EARLIER)  # 08:12:45 UTC: 17:42 in the study's time
    pdf = build_encapsulated_pdf(
        build_pdf([image], NODE, analysed_at=ANALYSED_AT), source, NODE,
        series_instance_uid="1.2.826.0.1.3680043.8.498.2001",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.2002",
        created_at=ANALYSED_AT, revision=revision,
    )
    sc = build_heatmap_sc(
        image, NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3001",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.3002", created_at=ANALYSED_AT, revision=revision,
    )
    for ds, first in ((reread(pdf), 9002), (reread(sc), 9003)):
        assert ds.InstanceNumber == number
        assert ds.SeriesNumber == first + 10 * (number - 1)
        assert ds.SeriesDescription.endswith(f" rev {number}, replaces 2026-11-22 17:42")
        assert len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.startswith("AI ")
    assert pdf.DocumentTitle.endswith(f"(revision {number}, replaces the report of 2026-11-22 17:42:45)")


def test_names_of_one_component_build_without_a_warning_and_are_kept() -> None:
    """highdicom warns of a person name without a caret, quoting it: a sender writing its referring
    physician as "ward" put a WARNING line in the node's log for every study (review)."""
    import warnings

    source = radiograph()
    source.PatientName = "ANONYMOUS"
    source.ReferringPhysicianName = "ward"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_heatmap_sc(analysed(source), NODE, series_instance_uid="1.2.826.0.1.3680043.8.498.3031",
                              sop_instance_uid="1.2.826.0.1.3680043.8.498.3032", created_at=ANALYSED_AT)
    assert (str(ds.PatientName), str(ds.ReferringPhysicianName)) == ("ANONYMOUS", "ward")
