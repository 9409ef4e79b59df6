"""Preprocessing under arbitrary headers: an image either becomes a model input or is refused with a reason.

A PACS forwards whatever its modalities wrote. The node must never fail on a header with an unexpected
exception (the listener would answer a generic failure and the console show no reason): every combination
of pixel module values, rescale, window, lookup tables, padding, polarity and orientation, plausible or
not, ends either as a finite model input in range or as :class:`UnsupportedImageError`, the one refusal the
pipeline and the console turn into a reason, and the dataset is left as it came. Hypothesis draws the
headers; a failure prints the smallest header it found.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from classifier.errors import UnsupportedImageError
from classifier.preprocess import PreprocessSpec, dataset_to_model_input, display_image, image_to_model_input
from tests import peers
from tests.node_datasets import set_raw

pytestmark = pytest.mark.unit

SPEC = PreprocessSpec(input_size=(24, 24))

#: Decimal strings as found in real headers: numbers, empty, text, non-finite, out of range.
DECIMALS = st.one_of(
    st.floats(-70000, 70000, allow_nan=False).map(lambda value: f"{value:.6g}"),
    st.sampled_from(["", "0", "-0", "1", "abc", "NaN", "inf", "-inf", "1e400", "  12 ", "3\\4"]),
)
PHOTOMETRIC = st.sampled_from(
    ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "monochrome2", "", "HSV"]
)


def _rarely(draw: st.DrawFn) -> bool:
    """True one time in ten: a header that breaks a rule, among headers that keep the others."""
    return draw(st.integers(0, 9)) == 0


def _raw(ds: Dataset, keyword: str, text: str) -> None:
    set_raw(ds, keyword, text.encode("ascii"))


def _lut_item(draw: st.DrawFn) -> Dataset:
    entries = draw(st.integers(1, 300))
    first = draw(st.integers(-5, 5000))
    bits = draw(st.sampled_from([8, 16]))
    item = Dataset()
    item.LUTDescriptor = [draw(st.sampled_from([entries, 0, entries + 3])), first, bits]
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=entries + 2))
    item.LUTData = values if values else [0]
    return item


@st.composite
def headers(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    rows, columns = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    photometric = draw(PHOTOMETRIC)
    allocated = draw(st.sampled_from([8, 16, 16, 32]))
    stored = draw(st.integers(1, allocated))
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    if _rarely(draw):  # the pixel module contradicts itself
        samples = 4 - samples
    frames = draw(st.sampled_from([1, 1, 1, 2]))
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored = allocated, stored
    ds.HighBit = allocated - 1 if _rarely(draw) else stored - 1
    ds.PixelRepresentation = draw(st.sampled_from([0, 1]))
    ds.SamplesPerPixel = samples
    _raw(ds, "PhotometricInterpretation", photometric)
    if samples == 3:
        ds.PlanarConfiguration = draw(st.sampled_from([0, 1]))
    if frames > 1 or draw(st.booleans()):
        ds.NumberOfFrames = frames
    size = rows * columns * samples * frames * allocated // 8
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, size, dtype=np.uint8)
    cut = draw(st.sampled_from([1, size // 2])) if _rarely(draw) else 0  # Pixel Data cut short
    ds.PixelData = pixels.tobytes()[: size - cut] if size - cut > 0 else b"\0\0"
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if draw(st.booleans()):
            _raw(ds, keyword, draw(DECIMALS))
    if draw(st.booleans()):
        _raw(ds, "VOILUTFunction", draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "CUBIC", ""])))
    if draw(st.integers(0, 5)) == 0:
        ds.ModalityLUTSequence = DicomSequence([_lut_item(draw)])
        ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    if draw(st.integers(0, 5)) == 0:
        ds.VOILUTSequence = DicomSequence([_lut_item(draw)])
    if draw(st.integers(0, 3)) == 0:
        ds.PixelPaddingValue = draw(st.integers(0, 65535))
        if draw(st.booleans()):
            ds.PixelPaddingRangeLimit = draw(st.integers(0, 65535))
    if draw(st.booleans()):
        shape = draw(st.sampled_from(["IDENTITY", "INVERSE", "", "SHIFT", "inverse"]))
        _raw(ds, "PresentationLUTShape", shape)
    if draw(st.booleans()):
        orientation = draw(st.sampled_from(["L\\F", "F\\L", "R\\H", "A\\P", "L", "", "LF\\FH", "l\\f"]))
        _raw(ds, "PatientOrientation", orientation)
    if photometric == "PALETTE COLOR" and not _rarely(draw):
        entries = draw(st.integers(1, 300))
        bits = draw(st.sampled_from([8, 16]))
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries, 0, bits])
            setattr(ds, f"{colour}PaletteColorLookupTableData", bytes(entries * bits // 8))
    return ds


def _snapshot(ds: Dataset) -> list[tuple[object, str, str]]:
    """Every element, nested ones too, by its value's text: equality of pydicom datasets fails on
    values that are not equal to themselves (a Window Center of "NaN")."""
    elements = [*ds.file_meta.iterall(), *ds.iterall()]
    return [(element.tag, str(element.VR), repr(element.value)) for element in elements]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value: by design
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(headers())
def test_any_header_gives_a_model_input_or_a_refusal_with_a_reason(ds: Dataset) -> None:
    received = _snapshot(ds)
    try:
        model_input = dataset_to_model_input(ds, SPEC)
    except UnsupportedImageError as exc:
        assert str(exc)  # the reason the console and the logs show
        event(f"refused: {str(exc).split(' (')[0].split(':')[0]}")
        assert _snapshot(ds) == received  # the preprocessing is pure: the node's object is not touched
        return
    event("model input")
    assert _snapshot(ds) == received
    assert model_input.shape == (*SPEC.input_size, 3) and model_input.dtype == np.float32
    assert np.isfinite(model_input).all()
    assert model_input.min() >= 0.0 and model_input.max() <= 1.0
    preview = display_image(ds, max_size=64)  # what the PDF and the console show of the same image
    assert preview.dtype == np.uint8 and 1 <= max(preview.shape) <= 64


#: One small image per compressed transfer syntax the node accepts (pydicom's and pydicom-data's files).
ENCODED = (
    "693_J2KR.dcm",  # JPEG 2000 lossless, 512×512, 16 bits: the reduced-resolution path
    "JPEG-lossy.dcm",  # JPEG extended, 12 bits
    "JPEG-LL.dcm",  # JPEG lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "JPEGLSNearLossless_08.dcm",  # JPEG-LS near-lossless, 8 bits
    "MR_small_RLE.dcm",  # RLE: pylibjpeg-rle panics on some corruptions
)


@st.composite
def corrupted(draw: st.DrawFn) -> Dataset:
    """A real compressed image whose first frame had bytes overwritten, zeroed or cut off."""
    ds = pydicom.dcmread(peers.pydicom_data_file(draw(st.sampled_from(ENCODED))))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=frames)))
    start = draw(st.integers(0, len(frame) - 1))
    kind = draw(st.sampled_from(["overwrite", "zero", "cut"]))
    if kind == "overwrite":
        patch = draw(st.binary(min_size=1, max_size=16))
        frame[start : start + len(patch)] = patch
    elif kind == "zero":
        length = draw(st.integers(1, 400))
        frame[start : start + length] = bytes(min(length, len(frame) - start))
    else:
        del frame[max(start, 1) :]
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value: by design
@settings(max_examples=150)
@given(corrupted())
def test_corrupt_compressed_pixel_data_gives_a_model_input_or_a_refusal(ds: Dataset) -> None:
    """A decoder that fails must fail as a refusal: not as another exception, and not as a panic of a
    native decoder, which is no Exception at all and would end the node's worker."""
    try:
        model_input = dataset_to_model_input(ds, SPEC)
    except UnsupportedImageError as exc:
        event("refused: the decoder failed" if "decoder failed" in str(exc) else "refused")
        return
    event("decoded")
    assert model_input.shape == (*SPEC.input_size, 3) and np.isfinite(model_input).all()


PICTURE_MODES = (
    "1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "F"
)


@st.composite
def pictures(draw: st.DrawFn) -> Image.Image:
    """A picture of any mode Pillow opens, random content; float ones now and then hold NaN or ±inf."""
    mode = draw(st.sampled_from(PICTURE_MODES))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "F":
        values = rng.normal(0.0, draw(st.sampled_from([1.0, 1e30])), size[::-1]).astype(np.float32)
        if draw(st.booleans()):
            spot = draw(st.integers(0, values.size - 1))
            values.flat[spot] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return Image.fromarray(values, mode="F")
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**31), 2**31 - 1, size[::-1], dtype=np.int64).astype(np.int32))
    picture = Image.new(mode, size)
    picture.frombytes(rng.integers(0, 256, len(picture.tobytes()), dtype=np.uint8).tobytes())
    return picture


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value: by design
@settings(max_examples=300)
@given(pictures())
def test_any_picture_gives_a_model_input_in_range_or_a_refusal(picture: Image.Image) -> None:
    """The console's uploads and ``cxr-node classify`` go through the same function (a float TIFF with a
    NaN once became a NaN model input, and so NaN probabilities)."""
    try:
        model_input = image_to_model_input(picture, SPEC)
    except UnsupportedImageError as exc:
        assert str(exc)
        return
    assert model_input.shape == (*SPEC.input_size, 3) and np.isfinite(model_input).all()
    assert model_input.min() >= 0.0 and model_input.max() <= 1.0
