"""`cxr-node evaluate --degrade`: one degradation hits the same radiograph alike whatever its file format,
and no value in its documented range ends the evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from classifier.dataset import LabelledImage
from classifier.evaluation import evaluate, parse_degradation, predict_items
from classifier.inference import Classifier, default_model_path
from classifier.preprocess import display_image
from tests import peers

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier.load(default_model_path())


def test_a_degradation_hits_a_dicom_study_and_its_full_size_picture_alike(
    shipped: Classifier, tmp_path: Path
) -> None:
    """The DICOM image was degraded after its reduction to about twice the input size, the picture at full
    size: the same noise took the hospital CR from covid 0.96 to 0.54 as DICOM and to 0.90 as PNG."""
    dicom = peers.pydicom_data_file("RG1_UNCI.dcm")
    picture = tmp_path / "rg1.png"
    Image.fromarray(display_image(pydicom.dcmread(dicom), max_size=4096)).save(picture)
    items = [LabelledImage(dicom, "covid", "a"), LabelledImage(picture, "covid", "b")]
    clean, _ = predict_items(shipped, items)
    assert abs(clean[0, 0] - clean[1, 0]) < 0.01
    noisy, _ = predict_items(shipped, items, parse_degradation("noise:0.15"))
    assert abs(noisy[0, 0] - noisy[1, 0]) < 0.1


def test_the_strongest_crop_in_range_keeps_what_the_model_reads_and_the_evaluation_goes_on(
    tmp_path: Path,
) -> None:
    """crop:0.05 of a 256-px picture left 13 px, refused as too small, and the whole evaluation ended."""
    for label in ("covid", "normal"):
        (tmp_path / "data" / label).mkdir(parents=True)
        pixels = np.random.default_rng(len(label)).integers(0, 256, (256, 240), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / label / "1.png")
    report = evaluate(default_model_path(), tmp_path / "data", degrade="crop:0.05")
    assert report["images"] == 2
    cropped = parse_degradation("crop:0.05")(Image.new("L", (240, 256)))
    assert cropped.size == (32, 32)
    assert parse_degradation("crop:0.85")(Image.new("L", (200, 100))).size == (170, 84)  # as before


def test_a_frame_of_nothing_is_no_frame() -> None:
    """pad:0, in the range the degradation allows, added a pixel round the picture."""
    picture = Image.new("L", (100, 80), 128)
    assert parse_degradation("pad:0")(picture).size == (100, 80)
    assert parse_degradation("pad:0.01")(picture).size == (102, 82)  # the smallest frame is a pixel
