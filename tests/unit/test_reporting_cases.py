"""Test cases for the reporting builders, made from the real CR chest radiograph RG1_UNCI.dcm.

Shared by the unit and interop reporting tests. The preview is made here, as the classifier's
``display_image`` does (modality LUT, VOI LUT, MONOCHROME1 inversion), so these tests do not need the
classifier package; the heat map is synthetic (a Gaussian blob over the right lower zone).
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Mapping
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import generate_uid

from classifier.types import INDETERMINATE, ModelInfo, Prediction
from reporting.types import AnalysedImage, NodeIdentity
from tests import peers

ANALYSED_AT = datetime(2026, 11, 22, 9, 41, 7, tzinfo=UTC)
EARLIER = datetime(2026, 11, 22, 8, 12, 45, tzinfo=UTC)  # the analysis time of a report a revision replaces
NODE = NodeIdentity(
    name="CXR AI node",
    institution_name="St. Elsewhere Hospital",
    manufacturer="CXR Node Project",
    model_name="cxr-node",
    software_version="0.1.0",
    device_uid="1.2.826.0.1.3680043.8.498.11711911191337",
    station_name="CXRNODE",
)
THREE_CLASS = ModelInfo(
    name="sugandi-cnn",
    version="2026.11.21-ab12cd3",
    classes=("covid", "normal", "pneumonia"),
    input_size=(150, 150),
    sha256="ab12cd34" * 8,
)
BINARY = ModelInfo(
    name="resnet152-transfer",
    version="2026.11.20-ef56789",
    classes=("covid", "non-covid"),
    input_size=(224, 224),
)


@functools.cache
def _radiograph() -> pydicom.Dataset:
    return pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))


def radiograph() -> pydicom.Dataset:
    """A fresh copy of the real CR (MONOCHROME1, 15 bit)."""
    return copy.deepcopy(_radiograph())


@functools.cache
def _preview() -> npt.NDArray[np.uint8]:
    ds = _radiograph()
    pixels = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    low, high = (float(value) for value in np.percentile(pixels, (0.5, 99.5)))
    scaled = np.clip((pixels - low) / max(high - low, 1.0), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    image = Image.fromarray(np.round(scaled * 255).astype(np.uint8))
    image.thumbnail((1024, 1024))
    return np.asarray(image, dtype=np.uint8)


def preview() -> npt.NDArray[np.uint8]:
    return _preview().copy()


def heatmap(size: tuple[int, int], centre: tuple[float, float] = (0.65, 0.3)) -> npt.NDArray[np.float32]:
    """A smooth blob in [0, 1] over the model input (``centre`` as fractions of height, width)."""
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)
    cy, cx = centre[0] * size[0], centre[1] * size[1]
    sigma = 0.15 * min(size)
    blob = np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * sigma**2))
    normalised: npt.NDArray[np.float32] = (blob / blob.max()).astype(np.float32)
    return normalised


def prediction(
    probabilities: Mapping[str, float],
    model: ModelInfo = THREE_CLASS,
    *,
    threshold: float = 0.5,
    with_heatmap: bool = True,
    novelty: float | None = None,
    better_turn: int = 0,
    negative: bool = False,
) -> Prediction:
    top = max(probabilities, key=lambda label: probabilities[label])
    return Prediction(
        label=top if probabilities[top] >= threshold else INDETERMINATE,
        top_class=top,
        probabilities=dict(probabilities),
        model=model,
        heatmap=heatmap(model.input_size) if with_heatmap else None,
        novelty=novelty,
        better_turn=better_turn,
        negative=negative,
    )


def analysed(
    source: pydicom.Dataset | None = None,
    probabilities: Mapping[str, float] | None = None,
    *,
    model: ModelInfo = THREE_CLASS,
    with_preview: bool = True,
    with_heatmap: bool = True,
    novelty: float | None = None,
    better_turn: int = 0,
    negative: bool = False,
) -> AnalysedImage:
    return AnalysedImage(
        source=source if source is not None else radiograph(),
        prediction=prediction(
            probabilities or {"covid": 0.874, "normal": 0.031, "pneumonia": 0.095},
            model,
            with_heatmap=with_heatmap,
            novelty=novelty,
            better_turn=better_turn,
            negative=negative,
        ),
        preview=preview() if with_preview else None,
    )


def unicode_source(name: str = "Müller^Zoë") -> pydicom.Dataset:
    ds = radiograph()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = name
    return ds


JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def japanese_source() -> pydicom.Dataset:
    """A source as a Japanese modality sends it: ISO 2022 IR 87 (JIS X 0208) encoded, then decoded on read."""
    ds = radiograph()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = JAPANESE_NAME
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert "山田".encode("iso2022_jp") in buffer.getvalue()
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


NESTED_TEXT = "Röntgen Thorax ÜBERSICHT"


def nested_text_source(charset: str | list[str], text: str = NESTED_TEXT) -> pydicom.Dataset:
    """A source whose text inside sequence items (a procedure code's meaning, an issuer) is in ``charset``,
    written and read back as a PACS stores it: the items' elements stay raw until read."""
    ds = radiograph()
    ds.SpecificCharacterSet = charset
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "RPID16", "RADLEX", text
    ds.ProcedureCodeSequence = [code]
    other = pydicom.Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "OTHER-1", text, "TEXT"
    ds.OtherPatientIDsSequence = [other]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def sparse_source() -> pydicom.Dataset:
    """No accession number, no birth date, no study description (all optional in practice)."""
    ds = radiograph()
    for keyword in ("AccessionNumber", "PatientBirthDate", "StudyDescription"):
        delattr(ds, keyword)
    return ds


# What real headers carry and highdicom refuses to parse: "U" for unknown sex (the standard has M, F, O),
# a birth year alone, a 13th month, a 25th hour. A result must still be made, carrying them as they are.
MESSY_VALUES = {"PatientSex": "U", "PatientBirthDate": "1970", "StudyDate": "20241350", "StudyTime": "256199"}


def messy_source() -> pydicom.Dataset:
    ds = radiograph()
    with pydicom.config.disable_value_validation():
        for keyword, value in MESSY_VALUES.items():
            setattr(ds, keyword, value)
    return ds


def three_image_study() -> list[AnalysedImage]:
    """Three instances of one study (two series), each with its own result; one without a heat map."""
    base = radiograph()
    second_series = str(generate_uid())
    images = []
    cases = [
        ({"covid": 0.874, "normal": 0.031, "pneumonia": 0.095}, base.SeriesInstanceUID, True),
        ({"covid": 0.05, "normal": 0.12, "pneumonia": 0.83}, second_series, True),
        ({"covid": 0.41, "normal": 0.38, "pneumonia": 0.21}, second_series, False),
    ]
    for number, (probabilities, series_uid, with_heatmap) in enumerate(cases, start=1):
        ds = radiograph()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = str(generate_uid())
        ds.InstanceNumber = number
        images.append(analysed(ds, probabilities, with_heatmap=with_heatmap))
    return images


def doubted_study() -> list[AnalysedImage]:
    """Classified with ``pipeline.skip_unfamiliar`` off: one image the model's checks passed, one that looked
    upside down, one unlike its training images, one that looked like a negative."""
    images = []
    doubts = [(0.4, 0, False), (0.77, 2, False), (1.31, 0, False), (0.99, 0, True)]
    for number, (novelty, better_turn, negative) in enumerate(doubts, start=1):
        ds = radiograph()
        ds.SOPInstanceUID = str(generate_uid())
        ds.InstanceNumber = number
        images.append(analysed(ds, novelty=novelty, better_turn=better_turn, negative=negative))
    return images


@pytest.mark.unit
def test_preview_shows_bone_white_like_the_classifier_display() -> None:
    """MONOCHROME1 is inverted: the spine (image centre column) is brighter than the lung fields."""
    image = preview().astype(np.float64)
    height, width = image.shape
    spine = image[height // 3 : 2 * height // 3, width // 2 - width // 40 : width // 2 + width // 40].mean()
    right_lung = image[height // 3 : 2 * height // 3, width // 5 : width // 3].mean()
    assert spine > right_lung + 20
    assert max(image.shape) <= 1024


@pytest.mark.unit
def test_three_image_study_is_one_study_with_distinct_instances() -> None:
    images = three_image_study()
    assert len({str(image.source.StudyInstanceUID) for image in images}) == 1
    assert len({str(image.source.SOPInstanceUID) for image in images}) == 3
    assert images[2].prediction.label == INDETERMINATE
