"""The grey image the model and the console see, against DCMTK's rendering of the same object (``dcm2pnm``
with the object's first window): same polarity and the same grey levels, for the photometric and
Presentation LUT Shape combinations a PACS sends."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from classifier.preprocess import display_image
from tests import peers

pytestmark = pytest.mark.interop


def _dcmtk_render(ds: pydicom.Dataset, folder: Path, name: str) -> np.ndarray:
    source, target = folder / f"{name}.dcm", folder / f"{name}.pgm"
    ds.save_as(source)
    subprocess.run(
        [peers.executable("dcm2pnm"), "--write-8-bit-pnm", "--use-window", "1", str(source), str(target)],
        check=True,
        capture_output=True,
    )
    return np.asarray(Image.open(target), dtype=np.float64)


def _correlation(ours: np.ndarray, theirs: np.ndarray) -> float:
    resized = np.asarray(
        Image.fromarray(theirs.astype(np.float32), mode="F").resize(ours.shape[::-1], Image.Resampling.BOX)
    )
    return float(np.corrcoef(ours.ravel().astype(np.float64), resized.ravel())[0, 1])


@pytest.mark.parametrize(
    ("photometric", "shape", "agrees"),
    [
        ("MONOCHROME1", None, True),  # RG1 as the CR writes it
        ("MONOCHROME1", "INVERSE", True),  # the DX pairing: one inversion
        ("MONOCHROME2", "INVERSE", True),
        ("MONOCHROME2", None, True),
        ("MONOCHROME2", "IDENTITY", True),
        # DCMTK follows the shape and shows a negative; we keep MONOCHROME1 (see preprocess._inverted)
        ("MONOCHROME1", "IDENTITY", False),
    ],
)
def test_grey_image_matches_dcmtk(photometric: str, shape: str | None, agrees: bool, tmp_path: Path) -> None:
    ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCR.dcm"))
    ds.PhotometricInterpretation = photometric
    if shape is not None:
        ds.PresentationLUTShape = shape
    ours = display_image(ds, max_size=512)
    correlation = _correlation(ours, _dcmtk_render(ds, tmp_path, "rendered"))
    assert correlation > 0.98 if agrees else correlation < -0.98, correlation
