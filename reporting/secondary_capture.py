"""Secondary Capture of the heat-map overlay: lets a PACS viewer show where the model looked.

It is marked as not for diagnosis three ways: a text band burned into the pixels, Image Comments, and the
derivation description; it is a DERIVED/SECONDARY image in its own series.
"""

from __future__ import annotations

import copy
import functools
import logging
from datetime import datetime

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit

from classifier.types import Prediction
from reporting import codes
from reporting.errors import ReportingError
from reporting.heatmap import overlay
from reporting.study import (
    FIRST,
    UTF8,
    date_result,
    dicom_date,
    dicom_time,
    header,
    header_for_highdicom,
    in_study_time,
    put_back,
    revision_description,
    revision_series_number,
)
from reporting.typeface import BOLD_FILE
from reporting.types import AnalysedImage, NodeIdentity, Revision

LOGGER = logging.getLogger(__name__)

NOT_FOR_DIAGNOSIS = "AI HEAT MAP - NOT FOR DIAGNOSIS"
SERIES_DESCRIPTION = "AI heat map overlay (not for diagnosis)"
SHORT_DESCRIPTION = "AI heat map, not for diagnosis"  # a later revision's, with its number
BAND_COLOUR = (179, 38, 30)


class NoHeatmapError(ReportingError):
    """The image has no preview or no heat map, so there is no overlay to capture."""


def build_heatmap_sc(
    image: AnalysedImage,
    node: NodeIdentity,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9003,
    created_at: datetime | None = None,
    revision: Revision = FIRST,
) -> pydicom.Dataset:
    """A Secondary Capture (RGB) of ``image``'s heat map over its preview, in the source's study.

    ``created_at`` (default: now) dates it, in the study's time as the SR and PDF are; pass the analysis
    time to make rebuilds byte-identical. A later ``revision`` is told apart as the SR's is
    (:func:`reporting.sr.build_sr`): Instance Number, Series Number and Series Description."""
    heat = image.prediction.heatmap
    if image.preview is None or heat is None:
        raise NoHeatmapError("a heat-map Secondary Capture needs both a preview and a heat map")
    model = image.prediction.model
    caption = f"{heatmap_caption(image.prediction)} · {model.name} {model.version}"
    pixels = with_band(overlay(image.preview, heat), NOT_FOR_DIAGNOSIS, caption)
    source, refused = header_for_highdicom(image.source)
    moment, offset = in_study_time(created_at or datetime.now().astimezone(), image.source)
    orientation = _orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=revision_series_number(series_number, revision),
        sop_instance_uid=sop_instance_uid,
        instance_number=revision.number,
        manufacturer=node.manufacturer,
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=revision_description(
            SERIES_DESCRIPTION, SHORT_DESCRIPTION, revision, image.source
        ),
        manufacturer_model_name=node.model_name,
        software_versions=node.software_version,
        institution_name=node.institution_name or None,
    )
    put_back(sc, refused)
    # highdicom copies nine patient and study values; the study's other ones (Issuer of Patient ID, Other
    # Patient IDs, the Patient Study module, Study Description, ...) are the SR's and the PDF's too, or a PACS
    # that checks the issuer files the heat map apart from them (review)
    sc.copy_patient_and_study_information(header(image.source))
    _copy_lossy_compression(image.source, sc)
    _date(sc, moment, offset)
    if orientation is None:
        sc["PatientOrientation"].value = None  # unknown in the source: left empty (Type 2), not invented
    sc.SpecificCharacterSet = UTF8
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    sc.ImageType = ["DERIVED", "SECONDARY"]
    # The band names no patient, but the preview shows whatever the radiograph shows: a source that does
    # not say it has no burnt-in text (CR plates often carry a name) may have some, and so may this copy.
    sc.BurnedInAnnotation = str(source.get("BurnedInAnnotation") or "YES")
    sc.ImageComments = "AI heat map overlay for decision support: not for diagnosis"
    sc.DerivationDescription = (
        f"Class-activation heat map of {model.name} {model.version} blended over a windowed, downsized "
        "copy of the source image; not for diagnosis"
    )
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    if node.station_name:
        sc.StationName = node.station_name
    LOGGER.debug("built heat-map Secondary Capture %dx%d", pixels.shape[1], pixels.shape[0])
    return sc


_LOSSY = ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")
# Transfer syntaxes whose every encoding is lossy (the JPEG DCT processes), with their method (PS3.3
# C.7.6.1.1.5.1). JPEG 2000, HTJ2K and JPEG-LS near-lossless may be lossless: their header has to say.
_LOSSY_SYNTAXES: dict[str, str] = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}


def _copy_lossy_compression(source: pydicom.Dataset, sc: pydicom.Dataset) -> None:
    """The overlay shows the source's pixels: once they were lossy compressed, the copy says so as well,
    with the source's ratio and method (PS3.3 C.7.6.1.1.5: once 01, never reset). A source received in a
    lossy transfer syntax is lossy compressed also when its header leaves that out, as senders that
    compress on the way often do; its ratio is then unknown."""
    if str(source.get("LossyImageCompression", "")).strip() == "01":
        for keyword in _LOSSY:
            if keyword in source:
                sc[keyword] = copy.deepcopy(source[keyword])
        return
    file_meta = getattr(source, "file_meta", None)
    method = _LOSSY_SYNTAXES.get(str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else "")
    if method is not None:
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionMethod = method


def _date(sc: pydicom.Dataset, moment: datetime, offset: str | None) -> None:
    """Every date and time highdicom took from the wall clock, in the study's time (as the SR and PDF)."""
    date_result(sc, moment, offset)
    sc.DateOfSecondaryCapture = dicom_date(moment)
    sc.TimeOfSecondaryCapture = dicom_time(moment)
    sc.ConversionType = "WSD"  # made by a workstation from another image (PS3.3 C.8.6.1), not digitised


def heatmap_caption(prediction: Prediction) -> str:
    """The finding and the probability of the class the heat map shows; an indeterminate result names that
    class, so its probability is not read as the certainty of "indeterminate"."""
    finding = codes.finding_for(prediction.label)
    shown = f"{100 * prediction.confidence:.1f} %"
    if prediction.indeterminate:
        return f"{finding.display}: most likely {codes.finding_for(prediction.top_class).display} {shown}"
    return f"{finding.display} {shown}"


def _orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two single-direction values highdicom accepts."""
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(part) for part in value)
    valid = {item.value for item in hd.PatientOrientationValuesBiped}
    return (row, column) if row in valid and column in valid else None


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(BOLD_FILE), size)


def with_band(pixels: npt.NDArray[np.uint8], headline: str, caption: str) -> npt.NDArray[np.uint8]:
    """``pixels`` (HxWx3) with a red band above them stating ``headline`` and ``caption``."""
    height, width = pixels.shape[:2]
    size = max(12, width // 40)
    band = int(size * 3.2)
    canvas = Image.new("RGB", (width, height + band), BAND_COLOUR)
    canvas.paste(Image.fromarray(pixels, mode="RGB"), (0, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((size // 2, size // 3), headline, font=_font(size), fill=(255, 255, 255))
    caption, caption_size = _fitted_caption(caption, int(size * 0.8), width - size)
    draw.text((size // 2, int(size * 1.7)), caption, font=_font(caption_size), fill=(255, 235, 230))
    return np.asarray(canvas, dtype=np.uint8)


MIN_CAPTION_SIZE = 10


def _fitted_caption(caption: str, size: int, width: int) -> tuple[str, int]:
    """``caption`` and a type size at which it fits ``width`` pixels: smaller type first, then cut with
    "…". An indeterminate result of the binary model ("Indeterminate: most likely No COVID-19 pattern
    55.0 % · resnet152-transfer 2026.11.20-ef56789") ran off the image's right edge, its version lost."""
    while size > MIN_CAPTION_SIZE and _font(size).getlength(caption) > width:
        size -= 1
    if _font(size).getlength(caption) <= width:
        return caption, size
    while caption and _font(size).getlength(caption + "…") > width:
        caption = caption[:-1]
    return caption.rstrip() + "…", size
