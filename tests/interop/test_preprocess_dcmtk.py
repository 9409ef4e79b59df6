"""The grey image the model and the console see, against DCMTK's rendering of the same object: same
polarity and the same grey levels, for the photometric and Presentation LUT Shape combinations a PACS
sends, for grey and colour objects of pydicom's test data that both can read (byte orders, bit depths,
signed pixels, LUTs, windows, palettes, RLE, JPEG, JPEG-LS; JPEG 2000 against its uncompressed twin, as
the Debian DCMTK has no JPEG 2000 codec), and for big-endian copies that DCMTK writes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from classifier.preprocess import display_image, first_frame_header
from tests import peers

pytestmark = pytest.mark.interop

PREVIEW = 1024  # the size of the report's image, and the native size of most objects here
_LUMA = np.array([0.299, 0.587, 0.114])


def _voi_options(ds: pydicom.Dataset) -> list[str]:
    """DCMTK's counterpart of the VOI step :func:`classifier.preprocess._voi` takes for ``ds``."""
    header = first_frame_header(ds)
    if header is not ds and "WindowCenter" in header:
        # dcm2pnm applies the rescale of an enhanced object's functional groups, not their window: it
        # is given that window (since 2026-12-05 the node applies it, as PS3.3 C.7.6.16.2.10 has it)
        return ["--set-window", f"{float(header.WindowCenter):g}", f"{float(header.WindowWidth):g}"]
    if "VOILUTSequence" in ds:
        # We scale a table by its largest entry; DCMTK, told to, by the bits its entries use.
        return ["--use-voi-lut", "1", "--ignore-vlut-depth"]
    if "WindowCenter" in ds:
        return ["--use-window", "1"]
    return ["--histogram-window", "1"]  # our fallback: 0.5-99.5 % of the values, 1 % left out


def _dcmtk_file(source: Path, folder: Path) -> np.ndarray:
    """DCMTK's 8-bit rendering of ``source`` (overlays off), by the tool that decodes its transfer syntax."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    tools: dict[str, str] = {
        JPEGLSLossless: "dcml2pnm", JPEGLSNearLossless: "dcml2pnm", RLELossless: "dcm2pnm"
    }  # fmt: skip
    # dcmj2pnm: uncompressed and every JPEG process
    tool = tools.get(str(ds.file_meta.TransferSyntaxUID), "dcmj2pnm")
    target = folder / f"{source.stem}.pgm"
    options = ["--write-8-bit-pnm", "--no-overlays", *_voi_options(ds)]
    subprocess.run(
        [peers.executable(tool), *options, str(source), str(target)],
        check=True,
        capture_output=True,
    )
    rendered = np.asarray(Image.open(target), dtype=np.float64)
    return rendered @ _LUMA if rendered.ndim == 3 else rendered  # colour: grey as ours (ITU-R BT.601)


def _dcmtk_render(ds: pydicom.Dataset, folder: Path, name: str) -> np.ndarray:
    source = folder / f"{name}.dcm"
    ds.save_as(source)
    return _dcmtk_file(source, folder)


def _correlation(ours: np.ndarray, theirs: np.ndarray) -> float:
    resized = np.asarray(
        Image.fromarray(theirs.astype(np.float32), mode="F").resize(ours.shape[::-1], Image.Resampling.BOX)
    )
    return float(np.corrcoef(ours.ravel().astype(np.float64), resized.ravel())[0, 1])


def _mean_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    resized = np.asarray(
        Image.fromarray(theirs.astype(np.float32), mode="F").resize(ours.shape[::-1], Image.Resampling.BOX)
    )
    return float(np.abs(ours.astype(np.float64) - resized).mean())


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


# (file, its uncompressed twin for JPEG 2000). Windowed, LUT and colour objects must agree to two grey levels
# of 255; for a grey object without a VOI transform both sides compute an automatic window, so only the image
# (the correlation) must agree.
_TEST_DATA = [
    ("RG1_UNCR.dcm", None),  # CR, MONOCHROME1, 15 bit, window
    ("RG3_UNCR.dcm", None),  # CR, MONOCHROME1, 10 bit
    ("693_UNCR.dcm", None),  # signed 14 bit
    ("MR2_UNCR.dcm", None),
    ("CT_small.dcm", None),  # signed, rescaled, no window
    ("mlut_18.dcm", None),  # Modality LUT Sequence
    ("vlut_04.dcm", None),  # VOI LUT Sequence
    ("MR_small_bigendian.dcm", None),
    ("MR_small_implicit.dcm", None),
    ("MR_small_padded.dcm", None),
    ("emri_small_big_endian.dcm", None),
    ("image_dfl.dcm", None),  # deflated
    ("liver_1frame.dcm", None),  # 1 bit
    ("rtdose_1frame.dcm", None),  # 32 bit
    ("eCT_Supplemental.dcm", None),
    ("MR_small_RLE.dcm", None),
    ("emri_small_RLE.dcm", None),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", None),
    ("JPGExtended.dcm", None),  # 12 bit lossy
    ("MR_small_jpeg_ls_lossless.dcm", None),
    ("JPEGLSNearLossless_08.dcm", None),
    ("JPEGLSNearLossless_16.dcm", None),
    ("emri_small_jpeg_ls_lossless.dcm", None),
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
    ("RG1_J2KI.dcm", "RG1_UNCI.dcm"),  # lossy
    ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ("693_J2KR.dcm", "693_UNCR.dcm"),  # signed
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
    # colour, shown grey
    ("SC_rgb.dcm", None),
    ("SC_rgb_16bit.dcm", None),
    ("SC_rgb_expb_16bit.dcm", None),
    ("SC_rgb_rle.dcm", None),
    ("SC_rgb_jpeg_dcmtk.dcm", None),  # YBR_FULL JPEG
    ("SC_ybr_full_422_uncompressed.dcm", None),
    ("US1_UNCR.dcm", None),
    ("OBXXXX1A.dcm", None),  # palette
    ("OBXXXX1A_expb.dcm", None),  # palette, big endian
    ("examples_palette.dcm", None),
]


@pytest.mark.parametrize(("name", "twin"), _TEST_DATA)
def test_test_data_renders_as_dcmtk_renders_it(name: str, twin: str | None, tmp_path: Path) -> None:
    path = peers.pydicom_data_file(name)
    reference = path if twin is None else peers.pydicom_data_file(twin)
    ds = pydicom.dcmread(path)
    if twin is not None:  # a JPEG 2000 object and its twin hold the same image
        assert ds.file_meta.TransferSyntaxUID in (JPEG2000, JPEG2000Lossless)
    ours = display_image(ds, max_size=PREVIEW)
    theirs = _dcmtk_file(reference, tmp_path)
    assert ours.shape == _preview_shape(theirs.shape)  # the same size whichever way the image came
    correlation, difference = _correlation(ours, theirs), _mean_difference(ours, theirs)
    assert correlation > 0.99, (correlation, difference)
    grey = ds.PhotometricInterpretation.startswith("MONOCHROME")
    if not (grey and "--histogram-window" in _voi_options(ds)):  # not an automatic window
        assert difference < 2.0, (correlation, difference)


def _eight_bit_palette(folder: Path) -> Path:
    """pydicom's palette image with 8-bit entries, two to a 16-bit word of the OW data."""
    ds = pydicom.dcmread(peers.pydicom_data_file("OBXXXX1A.dcm"))
    for colour in ("Red", "Green", "Blue"):
        entries, first, _ = ds[f"{colour}PaletteColorLookupTableDescriptor"].value
        ds[f"{colour}PaletteColorLookupTableDescriptor"].value = [entries, first, 8]
        words = np.frombuffer(ds[f"{colour}PaletteColorLookupTableData"].value, dtype="<u2")
        ds[f"{colour}PaletteColorLookupTableData"].value = (words >> 8).astype(np.uint8).tobytes()
    path = folder / "palette-8-bit.dcm"
    ds.save_as(path)
    return path


def _packed_voi_lut(folder: Path) -> Path:
    """A curved VOI LUT of 8-bit entries in OW data, two to a word (and a pad byte for an odd count)."""
    ds = _voi_lut(8, 255)
    item = ds.VOILUTSequence[0]
    entries = np.asarray(item.LUTData, dtype=np.uint8).tobytes()
    del item.LUTData
    item.add_new(0x00283006, "OW", entries + b"\0" * (len(entries) % 2))  # LUT Data
    path = folder / "voi-lut-8-packed.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


_MADE = {"palette-8-bit": _eight_bit_palette, "voi-lut-8-packed": _packed_voi_lut}


@pytest.mark.parametrize(
    "name",
    [
        "RG1_UNCR.dcm", "693_UNCR.dcm", "CT_small.dcm", "mlut_18.dcm", "vlut_04.dcm", "MR_small_padded.dcm",
        "SC_rgb_16bit.dcm", "US1_UNCR.dcm", "OBXXXX1A.dcm", "examples_palette.dcm", "palette-8-bit",
        "voi-lut-8-packed",
    ],  # fmt: skip
)
def test_big_endian_copy_reads_as_the_original(name: str, tmp_path: Path) -> None:
    """Explicit VR Big Endian is retired but still accepted: DCMTK's ``dcmconv`` writes the copy (pixels,
    LUT and palette data swapped as the standard says) and the node must read it as the original."""
    source = _MADE[name](tmp_path) if name in _MADE else peers.pydicom_data_file(name)
    copy = tmp_path / "big-endian.dcm"
    subprocess.run(
        [peers.executable("dcmconv"), "--write-xfer-big", str(source), str(copy)],
        check=True,
        capture_output=True,
    )
    big = pydicom.dcmread(copy)
    assert big.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    original = display_image(pydicom.dcmread(source), max_size=PREVIEW)
    np.testing.assert_array_equal(display_image(big, max_size=PREVIEW), original)
    if name in _MADE:  # and as DCMTK shows it
        assert _mean_difference(original, _dcmtk_file(source, tmp_path)) < 0.5


def _preview_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    height, width = shape[:2]
    scale = min(1.0, PREVIEW / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _mr_small() -> pydicom.Dataset:
    return pydicom.dcmread(peers.pydicom_data_file("MR_small.dcm"))


def _function(value: str) -> pydicom.Dataset:
    ds = _mr_small()
    ds.VOILUTFunction = value
    return ds


def _monochrome1() -> pydicom.Dataset:
    ds = _mr_small()
    ds.PhotometricInterpretation = "MONOCHROME1"
    return ds


def _rescaled() -> pydicom.Dataset:
    """Rescale slope and intercept with the window moved along, as a CT-like object carries them."""
    ds = _mr_small()
    ds.RescaleSlope, ds.RescaleIntercept = 2.5, -1024
    ds.WindowCenter = float(ds.WindowCenter) * 2.5 - 1024
    ds.WindowWidth = float(ds.WindowWidth) * 2.5
    return ds


def _lut_item(entries: np.ndarray, first: int, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(entries), first, bits]
    item.LUTData = [int(value) for value in entries]
    item["LUTData"].VR = "US"
    return item


def _voi_lut(bits: int, top: int, photometric: str = "MONOCHROME2") -> pydicom.Dataset:
    """A curved VOI LUT over the stored range, entries up to ``top`` in ``bits``-bit words."""
    ds = _mr_small()
    del ds.WindowCenter, ds.WindowWidth
    ds.PhotometricInterpretation = photometric
    values = pixel_array(ds)
    low, count = int(values.min()), int(values.max()) - int(values.min()) + 1
    curve = np.linspace(0.0, 1.0, count) ** (0.5 if bits == 16 else 2.0)
    ds.VOILUTSequence = [_lut_item(np.round(curve * top), low, bits)]
    return ds


def _voi_lut_after_rescale() -> pydicom.Dataset:
    """Unsigned pixels and a VOI LUT on their rescaled values, below zero: its first mapped value is
    negative (SS)."""
    ds = _voi_lut(16, 4095)
    values = pixel_array(ds)
    assert values.min() >= 0
    ds.PixelRepresentation = 0
    ds.PixelData = values.astype("<u2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    item = ds.VOILUTSequence[0]
    item.LUTDescriptor = [item.LUTDescriptor[0], item.LUTDescriptor[1] - 1024, 16]
    item["LUTDescriptor"].VR = "SS"
    return ds


def _modality_lut(window: bool) -> pydicom.Dataset:
    """A curved Modality LUT Sequence, with or without a window on its output."""
    ds = _mr_small()
    del ds.WindowCenter, ds.WindowWidth
    values = pixel_array(ds)
    low, count = int(values.min()), int(values.max()) - int(values.min()) + 1
    item = _lut_item(np.round(np.sqrt(np.linspace(0.0, 1.0, count)) * 4000), low, 16)
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):  # a Modality LUT replaces them
        ds.pop(keyword, None)
    if window:
        ds.WindowCenter, ds.WindowWidth = 2000, 2000
    return ds


@pytest.mark.parametrize(
    "make",
    [
        lambda: _function("LINEAR_EXACT"),
        lambda: _function("SIGMOID"),
        _monochrome1,
        _rescaled,
        lambda: _voi_lut(16, 4095),  # 12-bit values in 16-bit entries, as many CRs write them
        lambda: _voi_lut(8, 255),
        lambda: _voi_lut(8, 255, "MONOCHROME1"),
        lambda: _voi_lut(8, 200),  # entries short of the table's white
        _voi_lut_after_rescale,
        lambda: _modality_lut(window=True),
        lambda: _modality_lut(window=False),
    ],
    ids=[
        "LINEAR_EXACT", "SIGMOID", "MONOCHROME1", "rescaled", "VOI-LUT-12-in-16", "VOI-LUT-8",
        "VOI-LUT-8-MONO1", "VOI-LUT-8-short", "VOI-LUT-after-rescale", "modality-LUT-window",
        "modality-LUT-auto",
    ],  # fmt: skip
)
def test_grey_transforms_match_dcmtk(make: Callable[[], pydicom.Dataset], tmp_path: Path) -> None:
    ds = make()
    ours = display_image(ds, max_size=PREVIEW)
    theirs = _dcmtk_render(ds, tmp_path, "variant")
    correlation, difference = _correlation(ours, theirs), _mean_difference(ours, theirs)
    assert correlation > 0.995, (correlation, difference)
    assert difference < 2.0 or "WindowCenter" not in ds and "VOILUTSequence" not in ds, difference
