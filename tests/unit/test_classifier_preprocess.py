"""Preprocessing: every pixel format a PACS sends ends as the same, correctly oriented model input."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_windowing
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from classifier.errors import UnsupportedImageError
from classifier.inference import heatmap_in_whole_frame
from classifier.preprocess import (
    MAX_JPEG_SCANS,
    PreprocessSpec,
    _box_reduce,
    check_jpeg_stream,
    dataset_to_gray,
    dataset_to_model_input,
    dataset_to_upright_gray,
    display_image,
    equalise,
    frame_box,
    frame_pixels,
    gray_to_model_input,
    image_to_model_input,
    jpeg_scans,
    pil_to_gray,
    read_dataset,
    read_image_file,
    upright,
    upright_turns,
)
from tests import peers
from tests.node_datasets import stored_turned, with_corrupt_rle_pixels

pytestmark = pytest.mark.unit

SPEC = PreprocessSpec(input_size=(32, 32))


def make_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    frames: int = 1,
) -> Dataset:
    """A minimal Secondary Capture-like dataset around a NumPy array (uncompressed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    samples = 3 if photometric == "RGB" else 1
    shape = pixels.shape[-3:-1] if samples == 3 else pixels.shape[-2:]
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def ramp(bits: int = 12, size: int = 64) -> np.ndarray:
    """Horizontal ramp over the full stored range: left dark, right bright in MONOCHROME2."""
    row = np.linspace(0, (1 << bits) - 1, size)
    return np.tile(row, (size, 1)).astype(np.uint16 if bits > 8 else np.uint8)


def test_window_maps_below_to_black_and_above_to_white() -> None:
    ds = make_dataset(ramp(12), bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2048, 1024
    gray = dataset_to_gray(ds)
    assert gray[:, :10].max() == 0.0  # < 1536
    assert gray[:, -10:].min() == 1.0  # > 2560
    assert 0.3 < gray[0, 32] < 0.7


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(2048, 1), (2048, 2), (1000, 1000), (4000, 3)])
def test_each_voi_lut_function_is_pydicoms(function: str, center: int, width: int) -> None:
    """PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.1 (SIGMOID) and C.11.2.1.3.2 (LINEAR_EXACT), against pydicom's
    ``apply_windowing`` over every 12-bit value; a window far narrower than the values (the sigmoid's
    exponent past float range) gives no overflow warning."""
    pixels = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    ds = make_dataset(pixels, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dataset_to_gray(ds, min_side=64)
    with np.errstate(over="ignore"):  # pydicom's own sigmoid overflows to the right answer
        reference = apply_windowing(apply_modality_lut(pixels, ds).astype(np.float64), ds) / 4095
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_first_of_several_windows_is_used() -> None:
    ds = make_dataset(ramp(12), bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = [500, 3000], [200, 400]
    gray = dataset_to_gray(ds)
    assert gray[0, 32] == 1.0  # value ~2080 is above the first window (400–600)


def test_monochrome1_is_inverted_so_bone_is_white() -> None:
    mono2 = make_dataset(ramp(12), bits_stored=12)
    mono1 = make_dataset(ramp(12), bits_stored=12, photometric="MONOCHROME1")
    np.testing.assert_allclose(dataset_to_gray(mono1), 1.0 - dataset_to_gray(mono2), atol=1e-6)
    assert dataset_to_gray(mono1)[0, 0] > dataset_to_gray(mono1)[0, -1]


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [
        ("MONOCHROME1", "INVERSE", True),  # the DX rule: one inversion named twice, applied once
        ("MONOCHROME2", "INVERSE", True),  # meant to be seen inverted, as viewers show it
        ("MONOCHROME2", "IDENTITY", False),
        ("MONOCHROME1", "IDENTITY", True),  # contradicts the photometric interpretation, which wins
        ("MONOCHROME2", "", False),
    ],
)
def test_presentation_lut_shape_inverts_once_at_most(photometric: str, shape: str, inverted: bool) -> None:
    plain = dataset_to_gray(make_dataset(ramp(12), bits_stored=12))
    ds = make_dataset(ramp(12), bits_stored=12, photometric=photometric)
    ds.PresentationLUTShape = shape
    expected = 1.0 - plain if inverted else plain
    np.testing.assert_allclose(dataset_to_gray(ds), expected, atol=1e-6)
    np.testing.assert_allclose(display_image(ds).astype(np.float32) / 255.0, expected, atol=1 / 255)


@pytest.mark.parametrize(
    ("orientation", "turns"),
    [
        (["L", "F"], 0),  # PA chest as displayed
        (["R", "F"], 0),  # mirrored: left as it is (the models are trained with flips)
        (["P", "F"], 0),  # lateral view
        (["R", "H"], 2),  # upside down
        (["L", "H"], 2),  # upside down and mirrored: turned, not flipped
        (["F", "R"], 3),  # feet on the right: one turn clockwise
        (["H", "L"], 1),  # feet on the left
        (["FL", "RF"], 3),  # oblique: the first letter is the dominant direction
        (["L", "P"], 0),  # axial: no head-foot direction, nothing to turn
        (None, 0),
        ("L", 0),  # one value: malformed
        (["", ""], 0),
    ],
)
def test_patient_orientation_says_how_to_turn_the_image_head_up(orientation: object, turns: int) -> None:
    ds = make_dataset(ramp(12), bits_stored=12)
    if orientation is not None:
        ds.PatientOrientation = orientation
    assert upright_turns(ds) == turns


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_an_image_stored_turned_reaches_the_model_as_the_upright_one(turns: int) -> None:
    rng = np.random.default_rng(turns)
    pixels = rng.integers(0, 4096, size=(48, 40)).astype(np.uint16)  # not square: turns swap the sides
    pixels[:8] = 4095  # a bright top edge: "head"
    ds = make_dataset(pixels, bits_stored=12)
    ds.PatientOrientation = ["L", "F"]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    stored = stored_turned(ds, turns)
    np.testing.assert_allclose(dataset_to_upright_gray(stored), dataset_to_gray(ds), atol=1e-6)
    np.testing.assert_allclose(dataset_to_model_input(stored, SPEC), dataset_to_model_input(ds, SPEC), atol=1e-6)
    # What is displayed keeps the stored orientation; -turns brings a map over the model input back onto it.
    np.testing.assert_array_equal(display_image(stored), np.rot90(display_image(ds), turns))
    back = upright(dataset_to_upright_gray(stored), -upright_turns(stored))
    np.testing.assert_allclose(back, dataset_to_gray(stored), atol=1e-6)


def test_signed_pixels_with_rescale_and_window_in_output_units() -> None:
    values = np.tile(np.linspace(-1000, 1000, 64), (64, 1)).astype(np.int16)
    ds = make_dataset((values // 2).astype(np.int16), signed=True)
    ds.RescaleSlope, ds.RescaleIntercept = 2, 0  # stored −500..500 → −1000..1000
    ds.WindowCenter, ds.WindowWidth = 0, 1000
    gray = dataset_to_gray(ds)
    assert gray[0, 0] == 0.0 and gray[0, -1] == 1.0
    assert abs(gray[0, 32] - 0.5) < 0.05


def test_modality_lut_sequence_is_applied_before_the_window() -> None:
    """A Modality LUT indexes stored values; the large image is box-averaged first, so indices are rounded."""
    for size, min_side in ((64, 256), (256, 8)):  # without and with the box reduction
        ds = make_dataset(ramp(12, size), bits_stored=12)
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.ModalityLUTType = "US"
        item.LUTData = [4095 - i for i in range(4096)]  # an inverting LUT: stored 0 → 4095
        ds.ModalityLUTSequence = [item]
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        gray = dataset_to_gray(ds, min_side=min_side)
        assert gray[0, 0] > 0.95 and gray[0, -1] < 0.05


def test_real_modality_lut_object_matches_pydicom() -> None:
    """pydicom's ``mlut_18.dcm`` (16-bit signed stored values through a 4096-entry Modality LUT)."""
    ds = pydicom.dcmread(peers.pydicom_data_file("mlut_18.dcm"))
    reference = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    low, high = np.percentile(reference, (0.5, 99.5))  # the object has no VOI: the documented fallback
    expected = np.clip((reference - low) / (high - low), 0.0, 1.0)
    np.testing.assert_allclose(dataset_to_gray(ds, min_side=ds.Rows), expected, atol=1e-5)
    assert dataset_to_model_input(ds, SPEC).shape == (32, 32, 3)


def test_first_voi_lut_is_used_over_windows() -> None:
    ds = make_dataset(ramp(8, 64), bits_stored=8)
    ds.WindowCenter, ds.WindowWidth = 128, 256  # would give a ramp
    first, second = Dataset(), Dataset()
    first.LUTDescriptor = [256, 0, 8]
    first.LUTData = [255 - i for i in range(256)]  # inverting LUT
    second.LUTDescriptor = [256, 0, 8]
    second.LUTData = list(range(256))
    ds.VOILUTSequence = [first, second]
    gray = dataset_to_gray(ds)
    assert gray[0, 0] > 0.99 and gray[0, -1] < 0.01


def test_reading_an_8_bit_voi_lut_leaves_the_dataset_as_it_was() -> None:
    """The table is looked up as if its entries were 16 bits wide (see _first_voi_lut); that must not
    be written into the object the node stored and may send on."""
    ds = make_dataset(ramp(8, 64), bits_stored=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = [255 - i for i in range(256)]
    ds.VOILUTSequence = [item]
    sequence = ds.VOILUTSequence
    gray = dataset_to_gray(ds)
    assert gray[0, 0] > 0.99 and gray[0, -1] < 0.01
    assert ds.VOILUTSequence is sequence and list(ds.VOILUTSequence[0].LUTDescriptor) == [256, 0, 8]


@pytest.mark.filterwarnings("ignore:Invalid value:UserWarning")  # pydicom on the SS count, as it should
def test_a_voi_lut_descriptor_read_as_signed_still_counts_its_entries() -> None:
    """LUT Descriptor is US or SS; an explicit-VR file may say SS, and then a table of 40000 entries comes
    back as -25536 (PS3.3 C.11.2.1.1: the count is unsigned either way; so is the first mapped value of
    unsigned pixels). It must read as the same table written as US, not be refused as unusable."""
    pixels = (np.arange(64 * 64).reshape(64, 64) * 9).astype(np.uint16)  # up to 36855: past 32767
    grays = []
    for descriptor, vr in (([40000, 0, 16], "US"), ([-25536, 0, 16], "SS")):
        ds = make_dataset(pixels, bits_stored=16)
        item = Dataset()
        item.add_new(0x00283002, vr, descriptor)  # LUT Descriptor
        item.add_new(0x00283006, "OW", (65535 - np.arange(40000) // 2).astype("<u2").tobytes())  # LUT Data
        ds.VOILUTSequence = [item]
        grays.append(dataset_to_gray(ds, min_side=64))
    np.testing.assert_array_equal(grays[1], grays[0])
    assert grays[0][0, 0] > grays[0][-1, -1]  # the table inverts: the LUT was applied, not a window


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_voi_lut_data_read_back_as_ow_bytes(syntax: str) -> None:
    """LUT Data encoded as OW (always so in implicit VR) reads back as raw bytes, not a list of numbers."""
    ds = make_dataset(ramp(12, 64), bits_stored=12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "OW", np.arange(4096, dtype="<u2")[::-1].tobytes())  # inverting, 12-bit range
    ds.VOILUTSequence = [item]
    ds.file_meta.TransferSyntaxUID = syntax
    read_back = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))
    assert isinstance(read_back.VOILUTSequence[0].LUTData, bytes)
    gray = dataset_to_gray(read_back)
    assert gray[0, 0] == 1.0 and gray[0, -1] == 0.0  # the table's own top (4095) is white
    assert 0.45 < gray[0, 32] < 0.55


def test_a_voi_lut_of_8_bit_entries_longer_than_256_does_not_wrap_round() -> None:
    """pydicom indexes 8-bit tables with uint8: stored 256 would read entry 0 and 2048 entry 0 too."""
    ds = make_dataset(np.tile(np.arange(4096, dtype=np.uint16), (8, 1)), bits_stored=12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = [value // 16 for value in range(4096)]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    gray = dataset_to_gray(ds, min_side=4096)
    np.testing.assert_allclose(gray[0, [100, 256, 2048, 4095]], np.array([6, 16, 128, 255]) / 255, atol=1e-6)


def _identity_voi_lut(first: int, count: int, vr: str) -> Dataset:
    """A 12-bit VOI LUT mapping ``count`` inputs from ``first`` linearly onto 0..4095, its first mapped
    value written as ``vr`` (a negative one as two's complement when the VR is US)."""
    item = Dataset()
    item.add_new(0x00283002, vr, [count, first if vr == "SS" else first & 0xFFFF, 12])  # LUT Descriptor
    item.add_new(0x00283006, "OW", np.round(np.linspace(0, 4095, count)).astype("<u2").tobytes())
    return item


@pytest.mark.parametrize("vr", ["SS", "US"])
def test_a_voi_lut_after_a_rescale_maps_the_rescaled_values_from_a_negative_first_one(vr: str) -> None:
    """A VOI LUT's input is the modality output (PS3.3 C.11.2.1.1): unsigned pixels with a Rescale Intercept
    of -1024 give negative inputs, and the first value the LUT maps (-1024 here) is then SS. The old code
    read its sign from Pixel Representation alone: -1024 became 64512, every input fell below it, and the
    image came out all black (a MONOCHROME1 radiograph all white), which the model read as COVID-19."""
    ds = make_dataset(ramp(12), bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.VOILUTSequence = [_identity_voi_lut(-1024, 4096, vr)]
    gray = dataset_to_gray(ds, min_side=64)
    np.testing.assert_allclose(gray[0], ramp(12)[0] / 4095, atol=1 / 4095)


def test_a_voi_lut_of_signed_pixels_written_as_us_reads_its_first_value_as_signed() -> None:
    """Signed pixels, no rescale: the first mapped value is SS; a writer that puts -2048 as US 63488 (as
    DCMTK tolerates) must not leave every pixel below the table."""
    pixels = ramp(12).astype(np.int16) - 2048
    ds = make_dataset(pixels, bits_stored=12, signed=True)
    ds.VOILUTSequence = [_identity_voi_lut(-2048, 4096, "US")]
    gray = dataset_to_gray(ds, min_side=64)
    np.testing.assert_allclose(gray[0], ramp(12)[0] / 4095, atol=1 / 4095)


def _modality_lut(descriptor: list[int], entries: npt.NDArray[Any]) -> Dataset:
    """A Modality LUT item with its descriptor written as US (a negative first value as two's complement)."""
    item = Dataset()
    item.add_new(0x00283002, "US", [value & 0xFFFF for value in descriptor])  # LUT Descriptor
    item.add_new(0x00283006, "OW", entries.astype("<u2").tobytes())  # LUT Data
    item.ModalityLUTType = "US"
    return item


@pytest.mark.filterwarnings("ignore:Invalid value:UserWarning")
def test_a_modality_lut_of_signed_pixels_with_more_than_32767_entries_read_from_implicit_vr() -> None:
    """Signed pixels through a 40,000-entry Modality LUT from -20,000, in an implicit VR file: pydicom reads
    the descriptor as SS (Pixel Representation 1), so the count comes back as -25,536. The count is
    unsigned (PS3.3 C.11.1.1.1); the old code refused the image ("LUT Data shorter than ... says")."""
    pixels = (np.arange(200 * 200).reshape(200, 200) - 20000).astype(np.int16)
    table = np.arange(40000) // 10  # 0..3999
    ds = make_dataset(pixels, signed=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.ModalityLUTSequence = [_modality_lut([40000, -20000, 16], table)]
    ds.WindowCenter, ds.WindowWidth = 2000, 4000
    read_back = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))
    assert list(read_back.ModalityLUTSequence[0].LUTDescriptor) == [-25536, -20000, 16]  # as pydicom reads it
    expected = np.clip(table / 3999.0, 0.0, 1.0).reshape(200, 200)  # LINEAR, centre 2000, width 4000
    np.testing.assert_allclose(dataset_to_gray(read_back, min_side=200), expected, atol=1e-6)


def test_a_modality_lut_of_signed_pixels_written_as_us_reads_its_first_value_as_signed() -> None:
    """As for a VOI LUT: -2048 written as US 63488 must not leave every signed pixel below the table (the
    old code showed the whole image black)."""
    ds = make_dataset(ramp(12).astype(np.int16) - 2048, bits_stored=12, signed=True)
    ds.ModalityLUTSequence = [_modality_lut([4096, -2048, 16], np.arange(4096))]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    np.testing.assert_allclose(dataset_to_gray(ds, min_side=64)[0], ramp(12)[0] / 4095.0, atol=1 / 4095)


def test_a_voi_lut_output_is_scaled_by_its_entries_range_not_its_largest_entry() -> None:
    """An 8-bit table whose entries stop at 200 shows 200 as 200/255 (PS3.3 C.11.2.1.1: the output range
    is 0 to 2^n - 1), as DCMTK does; the old code stretched 200 to white."""
    ds = make_dataset(ramp(8, 64), bits_stored=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = [min(value, 200) for value in range(256)]
    ds.VOILUTSequence = [item]
    gray = dataset_to_gray(ds, min_side=64)
    assert gray.max() == pytest.approx(200 / 255, abs=1e-6)


def test_a_malformed_lookup_table_is_an_unsupported_image() -> None:
    ds = make_dataset(ramp(8, 64), bits_stored=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 9]  # 9-bit entries: PS3.3 allows 8 or 16 only
    item.LUTData = list(range(256))
    ds.VOILUTSequence = [item]
    with pytest.raises(UnsupportedImageError, match="unusable VOI LUT"):
        dataset_to_gray(ds)


@pytest.mark.parametrize("keyword", ["ModalityLUTSequence", "VOILUTSequence"])
def test_lut_data_shorter_or_longer_than_its_descriptor_is_an_unsupported_image(keyword: str) -> None:
    ds = make_dataset(ramp(12, 64), bits_stored=12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "OW", np.arange(4000, dtype="<u2").tobytes())  # pydicom: struct.error
    setattr(ds, keyword, [item])
    with pytest.raises(UnsupportedImageError, match="unusable"):
        dataset_to_gray(ds)


def test_padding_stays_out_of_the_window_and_is_shown_black() -> None:
    """Pixel Padding Value (and Range Limit) mark pixels that are not the image (PS3.3 C.7.5.1.1.2)."""
    rng = np.random.default_rng(0)
    anatomy = rng.integers(1000, 3001, (200, 120)).astype(np.uint16)
    alone = dataset_to_gray(make_dataset(anatomy, bits_stored=12))
    padded = np.zeros((200, 200), dtype=np.uint16)
    padded[:, 80:] = anatomy
    mono2 = make_dataset(padded, bits_stored=12)
    mono2.PixelPaddingValue = 0
    gray = dataset_to_gray(mono2)
    np.testing.assert_allclose(gray[:, 80:], alone, atol=1e-6)  # the percentile window ignores the padding
    assert gray[:, :80].max() == 0.0
    ranged = make_dataset(np.where(padded == 0, 4095 - np.arange(200) % 10, padded).astype(np.uint16),
                          bits_stored=12, photometric="MONOCHROME1")
    ranged.PixelPaddingValue, ranged.PixelPaddingRangeLimit = 4095, 4086  # either order is allowed
    gray = dataset_to_gray(ranged)
    np.testing.assert_allclose(gray[:, 80:], 1.0 - alone, atol=1e-6)
    assert gray[:, :80].max() == 0.0  # black after the MONOCHROME1 inversion too
    everything = make_dataset(np.zeros((8, 8), dtype=np.uint16), bits_stored=12)
    everything.PixelPaddingValue = 0
    with pytest.raises(UnsupportedImageError, match="padding"):
        dataset_to_gray(everything)


def test_a_signed_image_s_padding_value_written_as_us_is_read_as_its_bit_pattern() -> None:
    """PS3.3 gives Pixel Padding Value the VR of the pixels; writers that keep US for signed ones store -2000
    as 63536, which missed the padding: it entered the percentile window and shifted the whole image."""
    pixels = (ramp(12, 64).astype(np.int32) - 1024).astype(np.int16)
    pixels[:, :16] = -2000
    expected = None
    for vr, value in (("SS", -2000), ("US", 63536)):
        ds = make_dataset(pixels, signed=True)
        ds.add_new(0x00280120, vr, value)  # Pixel Padding Value
        ds = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))
        gray = dataset_to_gray(ds)
        assert gray[:, :16].max() == 0.0
        expected = gray if expected is None else expected
        np.testing.assert_array_equal(gray, expected)


def test_padding_is_left_out_of_each_reduced_box() -> None:
    anatomy = np.full((512, 512), 2000, dtype=np.uint16)
    anatomy[::2, ::2] = 0  # a quarter of every 2×2 box is padding
    ds = make_dataset(anatomy, bits_stored=12)
    ds.PixelPaddingValue = 0
    ds.WindowCenter, ds.WindowWidth = 2000, 4000
    gray = dataset_to_gray(ds, min_side=128)  # 512 → 256: 2×2 boxes
    assert gray.shape == (256, 256)
    assert np.ptp(gray) == 0.0 and gray[0, 0] == pytest.approx(0.5, abs=0.001)


def test_no_voi_falls_back_to_percentile_window() -> None:
    pixels = ramp(16, 100)
    pixels[0, 0] = 65535  # a burnt-in label pixel must not set the window
    gray = dataset_to_gray(make_dataset(pixels, bits_stored=16))
    assert gray.min() == 0.0 and gray.max() == 1.0
    assert (gray == 1.0).mean() < 0.02
    assert 0.4 < gray[50, 50] < 0.6


def _with_raw_values(ds: Dataset, replacements: dict[bytes, bytes]) -> Dataset:
    """``ds`` written and read back with some encoded values swapped for what broken senders write."""
    encoded = _to_bytes(ds)
    for old, new in replacements.items():
        assert len(old) == len(new) and encoded.count(old) == 1
        encoded = encoded.replace(old, new)
    return pydicom.dcmread(io.BytesIO(encoded))


@pytest.mark.parametrize("center", [b"", b"abc.de", b"nan   "])
def test_an_empty_or_unreadable_window_falls_back_to_the_percentile_window(center: bytes) -> None:
    pixels = ramp(12, 100)
    reference = dataset_to_gray(make_dataset(pixels, bits_stored=12))  # no window at all
    ds = make_dataset(pixels, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 1111.5, 999.5
    if center:
        broken = _with_raw_values(ds, {b"1111.5": center})
    else:
        ds.WindowCenter = ""
        broken = _with_raw_values(ds, {})
    np.testing.assert_array_equal(dataset_to_gray(broken), reference)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width", "grey"), [("2048", "1E39", 0.5), ("2048", "4E38", 0.5),
                                                       ("1E39", "4096", 0.0), ("-1E39", "4096", 1.0)])
def test_a_window_past_float32_range_gives_the_grey_the_standard_says(
    function: str, center: str, width: str, grey: float
) -> None:
    """Legal decimal strings of 16 characters: float32 arithmetic made the width inf, inf / inf made the
    whole image NaN, and histogram equalisation then raised a ValueError (review). PS3.3 C.11.2.1.2: a
    window far wider than the values shows them all mid-grey; one far above them, black."""
    ds = make_dataset(ramp(12), bits_stored=12)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    gray = dataset_to_gray(ds)
    np.testing.assert_allclose(gray, grey, atol=1e-3)
    model_input = dataset_to_model_input(ds, PreprocessSpec((32, 32), equalisation="histeq"))
    assert np.isfinite(model_input).all()


@pytest.mark.parametrize(("function", "windowed"), [("LINEAR", False), (None, False), ("LINEAR_EXACT", True),
                                                    ("SIGMOID", True)])
def test_a_linear_window_narrower_than_one_is_not_applied(function: str | None, windowed: bool) -> None:
    """PS3.3 C.11.2.1.2.1: a LINEAR window is at least 1 wide. A width of 0.8 on values scaled to 0-4 made a
    picture of two grey levels, where DCMTK refuses the window; LINEAR_EXACT and SIGMOID take any width
    above 0 (review)."""
    pixels = ramp(12, 100)
    reference = dataset_to_gray(make_dataset(pixels, bits_stored=12))  # no window: the percentile one
    ds = make_dataset(pixels, bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = 0.001, 0
    ds.WindowCenter, ds.WindowWidth = 2.0, 0.8
    if function is not None:
        ds.VOILUTFunction = function
    gray = dataset_to_gray(ds)
    if windowed:
        assert not np.array_equal(gray, reference)
    else:
        np.testing.assert_allclose(gray, reference, atol=1e-6)
        assert len(np.unique(np.round(gray * 255))) > 50


@pytest.mark.parametrize("written", [b"monochrome1 ", b" MONOCHROME1"])
def test_a_lower_case_or_padded_photometric_interpretation_is_read_as_meant(written: bytes) -> None:
    pixels = ramp(12, 64)
    reference = make_dataset(pixels, photometric="MONOCHROME1", bits_stored=12)
    broken = _with_raw_values(reference, {b"MONOCHROME1 ": written})
    np.testing.assert_array_equal(dataset_to_gray(broken), dataset_to_gray(reference))  # inverted once
    assert broken.PhotometricInterpretation == written.decode().rstrip()  # the object is left as it came


def test_an_absent_photometric_interpretation_is_monochrome2() -> None:
    pixels = ramp(12, 64)
    reference = make_dataset(pixels, bits_stored=12)
    ds = make_dataset(pixels, bits_stored=12)
    del ds.PhotometricInterpretation
    np.testing.assert_array_equal(dataset_to_gray(ds), dataset_to_gray(reference))


@pytest.mark.parametrize("written", [b"            ", b"HSV         "])
def test_an_unknown_photometric_interpretation_is_refused_by_its_value_first(written: bytes) -> None:
    ds = _with_raw_values(make_dataset(ramp(12, 64), bits_stored=12), {b"MONOCHROME2 ": written})
    ds.PixelData = ds.PixelData[:-2]  # cut short too: the photometric value is the reason given
    value = written.strip().decode()
    with pytest.raises(UnsupportedImageError, match=f"photometric interpretation '{value}'"):
        dataset_to_gray(ds)


def test_pixel_data_cut_short_is_refused_with_what_the_decoder_found() -> None:
    ds = make_dataset(ramp(12, 64), bits_stored=12)
    ds.PixelData = ds.PixelData[:-2]
    with pytest.raises(UnsupportedImageError) as refused:
        dataset_to_gray(ds)
    reason = str(refused.value)
    assert reason.startswith("pixel data cannot be decoded (ValueError: ") and "8190 vs 8192 bytes" in reason
    assert len(reason) < 200


def test_a_decoder_panic_on_corrupt_rle_is_a_refusal_not_a_base_exception() -> None:
    with pytest.raises(UnsupportedImageError, match=r"^pixel data cannot be decoded \(the decoder failed: "):
        dataset_to_gray(with_corrupt_rle_pixels(make_dataset(ramp(12, 64), bits_stored=12)))


@pytest.mark.parametrize("slope", [b"    ", b"ab.c", b"inf ", b"0   "])
def test_an_unusable_rescale_is_treated_as_identity(slope: bytes) -> None:
    pixels = ramp(12, 64)
    reference = make_dataset(pixels, bits_stored=12)
    reference.WindowCenter, reference.WindowWidth = 2048, 4096
    ds = make_dataset(pixels, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleSlope, ds.RescaleIntercept = 2.25, 0
    np.testing.assert_array_equal(
        dataset_to_gray(_with_raw_values(ds, {b"2.25": slope})), dataset_to_gray(reference)
    )


def test_rgb_becomes_luminance() -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:, :8] = (255, 0, 0)
    rgb[:, 8:] = (0, 0, 255)
    gray = dataset_to_gray(make_dataset(rgb, photometric="RGB", bits_stored=8))
    assert gray[0, 0] == pytest.approx(0.299, abs=0.01)
    assert gray[0, -1] == pytest.approx(0.114, abs=0.01)


def _palette(indices: npt.NDArray[Any], levels: npt.NDArray[Any], bits: int) -> pydicom.Dataset:
    """A palette-colour image of ``indices`` whose grey palette (the same for R, G, B) is ``levels``."""
    ds = make_dataset(indices, photometric="PALETTE COLOR", bits_stored=8)
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(levels), 0, bits])
        setattr(ds, f"{colour}PaletteColorLookupTableData", levels.tobytes())
    return ds


def test_palette_colour_goes_through_its_lut() -> None:
    indices = np.tile(np.arange(16, dtype=np.uint8), (16, 1))
    levels = (np.arange(256) * 257).astype("<u2")
    gray = dataset_to_gray(_palette(indices, levels[::-1], 16))  # index 0 → white
    assert gray[0, 0] == pytest.approx(1.0, abs=0.01)
    assert gray[0, 15] < gray[0, 0]


def test_palette_white_comes_from_the_descriptor_not_the_content() -> None:
    """A dark image through a 16-bit palette stays dark: its entries all below 256 do not make it 8-bit."""
    indices = np.tile(np.arange(16, dtype=np.uint8), (16, 1))
    dark = _palette(indices, np.arange(256, dtype="<u2"), 16)  # entries 0..255 of 65535
    assert float(dataset_to_gray(dark).max()) < 0.01
    eight_in_words = _palette(indices, np.arange(256, dtype="<u2"), 8)  # 8-bit entries in 16-bit words
    assert float(dataset_to_gray(eight_in_words)[0, 15]) == pytest.approx(15 / 255, abs=0.01)
    eight = _palette(indices, np.arange(256, dtype=np.uint8), 8)
    assert float(dataset_to_gray(eight)[0, 15]) == pytest.approx(15 / 255, abs=0.01)


def test_a_big_endian_palette_image_reads_as_its_little_endian_copy() -> None:
    """pydicom reads Palette Color LUT Data in the machine's byte order, so every colour of a big-endian
    palette image came out byte-swapped (pydicom's OBXXXX1A in the two byte orders: 12 grey levels of 255
    apart on average). The dataset itself is left as it came."""
    little = read_dataset(peers.pydicom_data_file("OBXXXX1A.dcm"))
    big = read_dataset(peers.pydicom_data_file("OBXXXX1A_expb.dcm"))
    table = big.RedPaletteColorLookupTableData
    np.testing.assert_array_equal(dataset_to_gray(big), dataset_to_gray(little))
    assert big.RedPaletteColorLookupTableData == table


def test_a_palette_of_more_than_256_8_bit_entries_is_refused() -> None:
    indices = np.tile(np.arange(4096, dtype=np.uint16), (4, 1))
    ds = _palette(indices, (np.arange(4096) // 16).astype(np.uint8), 8)  # one byte per entry
    ds.BitsStored, ds.BitsAllocated, ds.HighBit = 12, 16, 11
    with pytest.raises(UnsupportedImageError, match="more than 256 entries"):
        dataset_to_gray(ds)


@pytest.mark.parametrize("first", [0, 1000])
def test_stored_values_past_an_8_bit_palette_take_its_last_entry(first: int) -> None:
    """PS3.3 C.7.6.3.1.5: values below the first mapped value take the first entry, values past the table
    its last. pydicom subtracted the first mapped value in uint8 for 8-bit entries, so 256 past the start
    wrapped round to entry 0 (black) and 300 to entry 44."""
    values = first + np.array([-1, 0, 128, 255, 256, 300, 511, 1000])
    indices = np.tile(np.clip(values, 0, None).astype(np.uint16), (4, 1))
    ds = _palette(indices, np.arange(256, dtype=np.uint8), 8)
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, first, 8])
    ds.BitsStored, ds.BitsAllocated, ds.HighBit = 16, 16, 15
    gray = dataset_to_gray(ds, min_side=4)[0]
    expected = [0.0, 0.0, 128 / 255, 1.0, 1.0, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(gray, expected, atol=1e-6)


def test_the_alpha_table_of_a_palette_does_not_enter_the_grey_image() -> None:
    """The Palette Color LUT module may carry an Alpha table; pydicom then returns four channels."""
    indices = np.tile(np.arange(16, dtype=np.uint8), (4, 1))
    ds = _palette(indices, np.arange(256, dtype=np.uint8), 8)
    ds.AlphaPaletteColorLookupTableData = np.full(256, 255, np.uint8).tobytes()
    np.testing.assert_allclose(dataset_to_gray(ds, min_side=4)[0], np.arange(16) / 255, atol=1e-6)


def _segmented_palette(words: list[int]) -> pydicom.Dataset:
    """A palette-colour image of indices 0..255 whose three tables are the segmented table ``words``."""
    indices = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = make_dataset(indices, photometric="PALETTE COLOR", bits_stored=8)
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"Segmented{colour}PaletteColorLookupTableData", np.asarray(words, "<u2").tobytes())
    return ds


def test_a_segmented_palette_with_an_indirect_segment_reads_as_pydicom_expands_it() -> None:
    """PS3.3 C.7.9.2: a discrete segment, a linear one, and an indirect one that repeats both."""
    ds = _segmented_palette([0, 1, 0, 1, 127, 65535, 2, 2, 0, 0])  # 0, a ramp to white, then both again
    gray = dataset_to_gray(ds, min_side=8)
    expected = apply_color_lut(np.arange(256, dtype=np.uint8).reshape(16, 16), ds)[..., 0] / 65535.0
    np.testing.assert_allclose(gray, expected, atol=1e-6)
    assert gray.max() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "words",
    [
        [0, 1, 5, 2, 2, 0, 0],  # an indirect segment that copies itself: pydicom recursed to Python's limit
        # the same, one level down: a nested indirect segment's offset counts from its own table's start
        [0, 1, 7, 0, 1, 8, 2, 2, 10, 0, 0, 1, 9, 2, 2, 0, 0],
        [0, 1, 1000, *(w for j in range(1, 30) for w in (2, j, 0, 0))],  # each copies all before it: 2**29
        [0, 1, 1000, *(w for _ in range(3) for w in (1, 65535, 7))],  # linear runs past 65536 entries
    ],
    ids=["itself", "itself-nested", "doubling", "long"],
)
def test_a_segmented_palette_that_expands_without_bound_is_refused_at_once(words: list[int]) -> None:
    """A RecursionError escaped the taxonomy, and a table of 240 bytes took gigabytes and four minutes
    before a MemoryError (review)."""
    started = time.perf_counter()
    with pytest.raises(UnsupportedImageError, match="unusable Palette Color LUT: (indirect segments nested "
                                                    "more than 8 deep|its segments expand past 65536)"):
        dataset_to_gray(_segmented_palette(words))
    assert time.perf_counter() - started < 5


def test_a_jpeg2000_palette_image_is_decoded_whole_not_at_a_reduced_level() -> None:
    """Palette indices are labels: a reduced level (a wavelet low-pass) would average them."""
    indices = np.zeros((1024, 1024), dtype=np.uint8)
    indices[:, 1::2] = 200
    levels = np.zeros(256, dtype=np.uint8)
    levels[60:140] = 255  # index 100, the average of 0 and 200, is white; 0 and 200 are black
    plain = _palette(indices, levels, 8)
    compressed = _compressed(plain, JPEG2000Lossless)
    whole = dataset_to_gray(compressed, min_side=64)
    np.testing.assert_array_equal(whole, dataset_to_gray(plain, min_side=64))
    assert whole.max() == 0.0


def test_multi_frame_uses_the_first_frame() -> None:
    frames = np.stack([ramp(8, 32), ramp(8, 32)[:, ::-1]])
    ds = make_dataset(frames, bits_stored=8, frames=2)
    ds.WindowCenter, ds.WindowWidth = 128, 256
    gray = dataset_to_gray(ds)
    assert gray.shape == (32, 32)
    assert gray[0, 0] < gray[0, -1]  # the first frame's orientation


@pytest.mark.parametrize("where", ["shared", "per-frame", "both"])
def test_an_enhanced_multi_frame_image_takes_its_rescale_and_window_from_the_functional_groups(
    where: str,
) -> None:
    """Enhanced DX and CR give the rescale and window in the functional groups, not at the top level
    (PS3.3 C.7.6.16.2.9, .10). They were ignored: an inverting rescale (slope -1) gave a negative."""
    frames = np.stack([ramp(12, 32), ramp(12, 32)]).astype(np.uint16)
    ds = make_dataset(frames, bits_stored=12, frames=2)
    ds.WindowCenter, ds.WindowWidth = 3000, 10  # top-level values the groups replace
    transform, window = Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = -1, 4095, "US"
    window.WindowCenter, window.WindowWidth = 2048, 4096
    group = Dataset()
    group.PixelValueTransformationSequence = [transform]
    group.FrameVOILUTSequence = [window]
    wrong = Dataset()  # a shared group the first frame's own one overrides
    wrong_window = Dataset()
    wrong_window.WindowCenter, wrong_window.WindowWidth = 100, 10
    wrong.FrameVOILUTSequence = [wrong_window]
    if where == "shared":
        ds.SharedFunctionalGroupsSequence = [group]
    elif where == "per-frame":
        ds.PerFrameFunctionalGroupsSequence = [group, Dataset()]
    else:
        ds.SharedFunctionalGroupsSequence = [wrong]
        ds.PerFrameFunctionalGroupsSequence = [group, Dataset()]
    gray = dataset_to_gray(ds)
    assert gray[0, 0] > 0.95 and gray[0, -1] < 0.05  # inverted by the rescale, full range by the window
    assert 0.4 < gray[0, 16] < 0.6
    assert ds.WindowCenter == 3000 and "RescaleSlope" not in ds  # the dataset stays as it was


@pytest.mark.parametrize("entries", [256, 4096, 4095])
def test_a_lut_of_8_bit_entries_stored_two_to_a_word_is_read(entries: int) -> None:
    """8-bit LUT entries are stored "in a format equivalent to 8 bits allocated" (PS3.3 C.11.1.1.1,
    C.11.2.1.1): OW data of one byte each. Both LUTs were refused ("unusable VOI LUT: error")."""
    table = (np.arange(entries) * 255 // (entries - 1)).astype(np.uint8)
    data = table.tobytes() + (b"\0" if entries % 2 else b"")
    for keyword in ("VOILUTSequence", "ModalityLUTSequence"):
        ds = make_dataset(np.tile(np.arange(entries, dtype=np.uint16)[::-1], (4, 1)), bits_stored=12)
        item = Dataset()
        item.LUTDescriptor = [entries, 0, 8]
        item.add_new(0x00283006, "OW", data)
        setattr(ds, keyword, [item])
        if keyword == "ModalityLUTSequence":
            item.ModalityLUTType = "US"
            ds.WindowCenter, ds.WindowWidth = 128, 256
        read_back = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))
        gray = dataset_to_gray(read_back, min_side=entries)
        assert gray[0, 0] == 1.0 and gray[0, -1] == 0.0, keyword
        np.testing.assert_allclose(gray[0, ::-1], table / 255.0, atol=1 / 255, err_msg=keyword)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("keyword", ["VOILUTSequence", "ModalityLUTSequence"])
def test_a_lut_of_8_bit_entries_packed_in_us_words_is_read(keyword: str, syntax: str) -> None:
    """LUT Data may be US (PS3.3 C.11.2.1.1): two 8-bit entries to a word held as numbers, the first in the
    low byte, in either byte order of the file. It was refused ("unusable VOI LUT: IndexError")."""
    table = np.arange(256, dtype=np.uint8)[::-1].copy()
    table[1::2] = 255 - table[1::2]  # neighbours differ, so a swapped pair shows
    ds = make_dataset(np.tile(np.arange(256, dtype=np.uint8), (4, 1)), bits_stored=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new(0x00283006, "US", [int(word) for word in table.view("<u2")])
    if keyword == "ModalityLUTSequence":
        item.ModalityLUTType = "US"
        ds.WindowCenter, ds.WindowWidth = 127.5, 256
    setattr(ds, keyword, [item])
    ds.file_meta.TransferSyntaxUID = syntax
    gray = dataset_to_gray(pydicom.dcmread(io.BytesIO(_to_bytes(ds))), min_side=4)
    np.testing.assert_allclose(gray[0], table / 255.0, atol=1 / 255)


def test_a_lookup_table_without_its_data_is_refused_with_the_attribute_named() -> None:
    ds = make_dataset(ramp(8, 64), bits_stored=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    ds.VOILUTSequence = [item]
    with pytest.raises(UnsupportedImageError, match="unusable VOI LUT: .*LUTData"):  # was ": KeyError"
        dataset_to_gray(ds)


@pytest.mark.parametrize("keyword", ["VOILUTSequence", "ModalityLUTSequence"])
def test_a_lut_of_8_bit_entries_in_a_big_endian_object_is_read_in_its_byte_order(keyword: str) -> None:
    """A big-endian object stores OW LUT Data as byte-swapped words (``dcmconv +tb`` writes these bytes and
    ``dcm2pnm`` shows both copies alike); the old code read the bytes in file order, every pair swapped."""
    table = np.arange(256, dtype=np.uint8)
    table[1::2] = 255 - table[1::2]  # neighbours differ, so a swapped pair shows
    grays = []
    for syntax, data in ((ExplicitVRLittleEndian, table.tobytes()),
                         (ExplicitVRBigEndian, table.reshape(-1, 2)[:, ::-1].tobytes())):
        ds = make_dataset(np.tile(np.arange(256, dtype=np.uint8), (4, 1)), bits_stored=8)
        item = Dataset()
        item.LUTDescriptor = [256, 0, 8]
        item.add_new(0x00283006, "OW", data)
        if keyword == "ModalityLUTSequence":
            item.ModalityLUTType = "US"
            ds.WindowCenter, ds.WindowWidth = 127.5, 256
        setattr(ds, keyword, [item])
        ds.file_meta.TransferSyntaxUID = syntax
        grays.append(dataset_to_gray(pydicom.dcmread(io.BytesIO(_to_bytes(ds))), min_side=4))
    np.testing.assert_allclose(grays[0][0], table / 255.0, atol=1 / 255)
    np.testing.assert_allclose(grays[1], grays[0], atol=1e-6)


def test_lut_data_shorter_than_its_descriptor_says_so() -> None:
    ds = make_dataset(ramp(12, 16), bits_stored=12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "OW", bytes(1000))
    ds.VOILUTSequence = [item]
    with pytest.raises(UnsupportedImageError, match="LUT Data shorter than its LUT Descriptor says"):
        dataset_to_gray(pydicom.dcmread(io.BytesIO(_to_bytes(ds))))


def test_missing_pixels_and_unknown_photometry_are_refused() -> None:
    ds = make_dataset(ramp(8, 16), bits_stored=8)
    del ds.PixelData
    with pytest.raises(UnsupportedImageError):
        dataset_to_model_input(ds, SPEC)
    odd = make_dataset(ramp(8, 16), bits_stored=8)
    odd.PhotometricInterpretation = "HSV"
    with pytest.raises(UnsupportedImageError):
        dataset_to_model_input(odd, SPEC)


def test_float_pixel_data_is_refused_with_its_reason() -> None:
    ds = make_dataset(ramp(8, 16), bits_stored=8)
    del ds.PixelData
    ds.FloatPixelData = np.zeros(16 * 16, dtype="<f4").tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    with pytest.raises(UnsupportedImageError, match="float pixel data"):
        dataset_to_gray(ds)


def _compressed(ds: Dataset, syntax: str, **kwargs: object) -> Dataset:
    copy = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))
    copy.compress(syntax, **kwargs)
    return pydicom.dcmread(io.BytesIO(_to_bytes(copy)))


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("cut", [6, 12])
def test_encapsulated_pixel_data_cut_off_inside_an_item_header_is_an_unsupported_image(
    syntax: str, cut: int
) -> None:
    """A transfer cut short inside the first item's tag or length: pydicom's frame parser raises
    struct.error, which used to escape the classifier (an HTTP 500 for a console upload)."""
    ds = _compressed(make_dataset(ramp(12), bits_stored=12), syntax)
    ds.PixelData = ds.PixelData[:cut]
    ds = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))
    with pytest.raises(UnsupportedImageError, match="cannot be decoded"):
        dataset_to_gray(ds)
    with pytest.raises(UnsupportedImageError, match="cannot be decoded"):
        display_image(ds)


def test_a_rescale_past_float_range_is_read_as_no_rescale() -> None:
    """A Rescale Slope of 1e36 overflows float32 to infinity; histogram equalisation then met NaN and
    np.bincount raised ValueError out of the classifier."""
    plain = make_dataset(ramp(12), bits_stored=12)
    ds = make_dataset(ramp(12), bits_stored=12)
    ds.RescaleSlope = "1e36"
    np.testing.assert_array_equal(dataset_to_gray(ds, min_side=64), dataset_to_gray(plain, min_side=64))
    histeq = PreprocessSpec(input_size=(32, 32), equalisation="histeq")
    assert np.isfinite(dataset_to_model_input(ds, histeq)).all()


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_lossless_compressed_syntaxes_decode_like_uncompressed(bits: int) -> None:
    rng = np.random.default_rng(bits)
    pixels = (rng.random((300, 280)) * ((1 << bits) - 1)).astype(np.uint16 if bits > 8 else np.uint8)
    plain = make_dataset(pixels, bits_stored=bits)
    expected = dataset_to_gray(plain, min_side=280)  # full resolution: no reduced decode, no box average
    for syntax in (RLELossless, JPEG2000Lossless):
        np.testing.assert_array_equal(dataset_to_gray(_compressed(plain, syntax), min_side=280), expected)


def test_reduced_jpeg2000_decode_matches_full_resolution() -> None:
    yy, xx = np.mgrid[0:1001, 0:901]
    pixels = ((np.sin(xx / 90.0) + np.cos(yy / 70.0) + 2) / 4 * 4095).astype(np.uint16)
    plain = make_dataset(pixels, bits_stored=12)
    plain.WindowCenter, plain.WindowWidth = 2048, 4096
    reduced = dataset_to_gray(_compressed(plain, JPEG2000Lossless), min_side=100)
    assert min(reduced.shape) < 500  # a reduced level was decoded (1001 px → 1/2^k)
    full = dataset_to_gray(plain, min_side=100)
    small = np.asarray(Image.fromarray(full, mode="F").resize(reduced.shape[::-1], Image.Resampling.BILINEAR))
    assert np.abs(small - reduced).mean() < 0.01  # same grey levels: Pillow's 16-bit scaling undone


def test_jpeg2000_with_padding_pixels_gives_the_grey_image_of_the_same_study_sent_uncompressed() -> None:
    """A reduced resolution level is a wavelet low-pass: it blended the padding into the image's edge,
    where no mask finds it (the hospital CR with a padded border: 1,666 model-input pixels off by more
    than 0.1 from the study sent uncompressed, 15 without padding). With padding pixels the full
    resolution is decoded."""
    yy, xx = np.mgrid[0:1001, 0:901]
    pixels = ((np.sin(xx / 90.0) + np.cos(yy / 70.0) + 2) / 4 * 3000 + 500).astype(np.uint16)
    pixels[:, :150] = 0
    pixels[:120, :] = 0
    plain = make_dataset(pixels, bits_stored=12)
    plain.add_new(0x00280120, "US", 0)  # Pixel Padding Value
    plain = pydicom.dcmread(io.BytesIO(_to_bytes(plain)))
    compressed = _compressed(plain, JPEG2000Lossless)
    expected = dataset_to_gray(plain, min_side=100)
    np.testing.assert_array_equal(dataset_to_gray(compressed, min_side=100), expected)
    unpadded = make_dataset(pixels + 1, bits_stored=12)  # the header declares padding, no pixel is
    unpadded.add_new(0x00280120, "US", 0)
    unpadded = pydicom.dcmread(io.BytesIO(_to_bytes(unpadded)))
    assert min(dataset_to_gray(_compressed(unpadded, JPEG2000Lossless), min_side=100).shape) < 300  # reduced


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless])
def test_a_compressed_frame_of_another_size_than_rows_and_columns_is_refused(syntax: str) -> None:
    """Rows and Columns swapped on the hospital CR's JPEG 2000 gave a sheared picture that was classified:
    pydicom pours the codestream's pixels into the header's shape when their counts agree."""
    yy, xx = np.mgrid[0:120, 0:90]
    compressed = _compressed(make_dataset((xx * 40 + yy).astype(np.uint16), bits_stored=12), syntax)
    compressed.Rows, compressed.Columns = compressed.Columns, compressed.Rows
    with pytest.raises(UnsupportedImageError, match="the compressed frame is 90 × 120 pixels, but Columns × "
                                                    "Rows say 120 × 90"):
        dataset_to_gray(compressed)


def test_reduced_jpeg2000_decode_trusts_the_codestream_precision_over_bits_stored() -> None:
    """A 12-bit codestream in an object that says 16 bits stored (pydicom warns, then trusts the
    codestream)."""
    yy, xx = np.mgrid[0:1001, 0:901]
    pixels = ((np.sin(xx / 90.0) + np.cos(yy / 70.0) + 2) / 4 * 4095).astype(np.uint16)
    plain = make_dataset(pixels, bits_stored=12)
    plain.WindowCenter, plain.WindowWidth = 2048, 4096
    mislabelled = _compressed(plain, JPEG2000Lossless)
    mislabelled.BitsStored, mislabelled.HighBit = 16, 15
    reduced = dataset_to_gray(mislabelled, min_side=100)
    full = dataset_to_gray(plain, min_side=100)
    small = np.asarray(Image.fromarray(full, mode="F").resize(reduced.shape[::-1], Image.Resampling.BILINEAR))
    assert np.abs(small - reduced).mean() < 0.01


def test_a_signed_jpeg2000_codestream_in_an_unsigned_object_keeps_its_grey_scale() -> None:
    """Pixel Representation 0 with a codestream whose samples are signed (written by encoders that sign
    12-bit data): Pillow's reduced decode shifted them by 2048, swapping the two halves of the grey scale;
    pydicom's full decode corrects the sign, so such a frame takes that path."""
    import openjpeg

    unsigned = np.tile(np.linspace(0, 4095, 1024).astype(np.uint16), (1024, 1))
    plain = make_dataset(unsigned, bits_stored=12)
    plain.WindowCenter, plain.WindowWidth = 2048, 4096
    as_signed = ((unsigned.astype(np.int32) ^ 0x800) - 0x800).astype(np.int16)  # the same 12 bits
    mismatched = _compressed(plain, JPEG2000Lossless)
    mismatched.PixelData = encapsulate(
        [openjpeg.encode(as_signed, bits_stored=12, photometric_interpretation=2, use_mct=False)]
    )
    reduced = dataset_to_gray(mismatched, min_side=64)
    expected = dataset_to_gray(plain, min_side=64)
    assert np.abs(reduced - expected).max() < 0.01  # a rising ramp, not two halves swapped


@pytest.mark.parametrize("bits", [6, 7])
def test_reduced_jpeg2000_decode_of_fewer_than_8_bits_stored(bits: int) -> None:
    """Pillow scales 1-7 bit samples up to 8 bits; the old code undid that for 9-15 bits only, so a
    reduced decode read 2^(8 - bits) times too bright (PS3.5 8.2.4: the codestream's values are stored)."""
    pixels = np.tile((np.arange(1024) * ((1 << bits) - 1) // 1023).astype(np.uint8), (1024, 1))
    plain = make_dataset(pixels, bits_stored=bits)
    plain.WindowCenter, plain.WindowWidth = (1 << bits) / 2, 1 << bits
    reduced = dataset_to_gray(_compressed(plain, JPEG2000Lossless), min_side=64)
    full = dataset_to_gray(plain, min_side=64)
    assert reduced.shape == full.shape  # a reduced level was decoded and box-averaged alike
    assert np.abs(reduced - full).mean() < 0.02


def test_a_jpeg2000_codestream_claiming_a_huge_image_is_refused() -> None:
    buffer = io.BytesIO()
    blank = Image.fromarray(np.zeros((64, 64), dtype=np.uint8))
    blank.save(buffer, "JPEG2000", irreversible=False, no_jp2=True)
    codestream = bytearray(buffer.getvalue())
    siz = codestream.find(b"\xff\x51")
    codestream[siz + 6 : siz + 14] = struct.pack(">II", 15000, 15000)  # SIZ: 15000 × 15000 (225 Mpx)
    ds = make_dataset(np.zeros((64, 64), dtype=np.uint8), bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.Rows = ds.Columns = 15000
    ds.PixelData = encapsulate([bytes(codestream)])
    with pytest.raises(UnsupportedImageError, match="too large"):
        dataset_to_gray(ds)


def _repeated_scans(copies: int, side: int = 256) -> bytes:
    """A progressive JPEG of ``side``² whose last scan is repeated ``copies`` times: legal, each a pass of
    refinement over the whole image (review: 470 KB with 1000 copies took 97 s at 8000²)."""
    buffer = io.BytesIO()
    Image.fromarray(ramp(8, side)).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rfind(b"\xff\xda")
    assert data.endswith(b"\xff\xd9") and last > 0
    return data[:last] + data[last:-2] * (copies + 1) + b"\xff\xd9"


def test_a_progressive_jpeg_of_a_radiograph_s_few_scans_reads_as_its_pixels() -> None:
    data = _repeated_scans(0)
    assert 1 < jpeg_scans(data) <= 12
    ds = make_dataset(ramp(8, 256), bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit  # pydicom reads a progressive frame under it too
    ds.PixelData = encapsulate([data])
    plain = make_dataset(ramp(8, 256), bits_stored=8)
    np.testing.assert_allclose(dataset_to_gray(ds), dataset_to_gray(plain), atol=0.02)


def test_a_jpeg_of_repeated_scans_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """In DICOM, and as a picture: the decoder would refine the whole image once a scan."""
    data = _repeated_scans(100)
    assert jpeg_scans(data) == MAX_JPEG_SCANS + 1  # counted no further than the limit needs
    ds = make_dataset(ramp(8, 256), bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([data])
    with pytest.raises(UnsupportedImageError, match=f"a JPEG of more than {MAX_JPEG_SCANS} scans"):
        dataset_to_gray(ds)
    picture = tmp_path / "chest.jpg"
    picture.write_bytes(data)
    with pytest.raises(UnsupportedImageError, match=f"a JPEG of more than {MAX_JPEG_SCANS} scans"):
        read_image_file(picture)


def _baseline_jpeg_ramp() -> Dataset:
    """An 8-bit 64² ramp whose Pixel Data is Pillow's baseline JPEG of it (pydicom has no JPEG encoder)."""
    buffer = io.BytesIO()
    Image.fromarray(ramp(8, 64)).save(buffer, format="JPEG")
    ds = make_dataset(ramp(8, 64), bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    return ds


def _jpeg_family(syntax: str) -> Dataset:
    """A ramp in a JPEG-family syntax: Pillow's baseline JPEG, the JPEG-LS encoder, or pydicom-data's
    real JPEG Lossless (process 14) MR."""
    if syntax == JPEGBaseline8Bit:
        return _baseline_jpeg_ramp()
    if syntax == JPEGLSLossless:
        return _compressed(make_dataset(ramp(12), bits_stored=12), JPEGLSLossless)
    return read_dataset(peers.pydicom_data_file("JPEG-LL.dcm"))


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGLSLossless, JPEGLosslessSV1])
@pytest.mark.parametrize("kept", [0.3, 0.5, 0.95])
def test_a_jpeg_frame_cut_short_is_refused_not_read_with_grey_filled_in(syntax: str, kept: float) -> None:
    """libjpeg and CharLS decode what is there and fill the rest with grey, without a word: half a
    radiograph was classified as a whole one (review), where a JPEG 2000, RLE or uncompressed frame cut
    short is refused."""
    ds = _jpeg_family(syntax)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    dataset_to_gray(ds)  # the whole frame reads
    ds.PixelData = encapsulate([frame[: int(len(frame) * kept)]])
    with pytest.raises(UnsupportedImageError, match="no end-of-image marker: cut short"):
        dataset_to_gray(ds)


def test_every_jpeg_family_frame_of_pydicom_data_ends_as_the_standard_says() -> None:
    """The end-of-image check on real streams of many encoders, JPEG-LS among them, whose scan data hold
    0xFF followed by a byte below 0x80 (a stuffed bit, not a marker): none is read as cut short."""
    from pydicom.data import get_testdata_files

    checked = 0
    for name in get_testdata_files("*.dcm"):
        try:
            ds = pydicom.dcmread(name)
        except pydicom.errors.InvalidDicomError:  # a few test files have no file meta
            continue
        syntax = ds.file_meta.get("TransferSyntaxUID")
        jpeg = syntax is not None and syntax.is_encapsulated and "JPEG" in syntax.name
        if not jpeg or "2000" in syntax.name or "PixelData" not in ds:
            continue
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
        check_jpeg_stream(frame)
        checked += 1
    assert checked >= 20


def test_a_picture_cut_short_is_refused_with_the_reason(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(ramp(8, 256)).save(buffer, format="JPEG")
    picture = tmp_path / "chest.jpg"
    picture.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UnsupportedImageError, match="no end-of-image marker: cut short"):
        read_image_file(picture)


def _declaring(syntax: str, columns: int, rows: int) -> Dataset:
    """A 64 × 64 image compressed in ``syntax`` whose frame header (JPEG SOF, JPEG-LS SOF55, JPEG 2000
    SIZ) is made to declare ``columns`` × ``rows``; for RLE, which has none, the DICOM header does."""
    plain = make_dataset(ramp(8, 64), bits_stored=8)
    ds = _baseline_jpeg_ramp() if syntax == JPEGBaseline8Bit else _compressed(plain, syntax)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    if syntax == RLELossless:
        ds.Columns, ds.Rows = columns, rows
        return ds
    if syntax == JPEG2000Lossless:
        frame[8:16] = struct.pack(">II", columns, rows)  # SIZ: Xsiz, Ysiz
    else:
        sof = max(frame.find(bytes([0xFF, marker])) for marker in (0xC0, 0xF7))  # the one there is
        frame[sof + 5:sof + 9] = struct.pack(">HH", rows, columns)  # SOFn: Lf P Y X
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


@pytest.mark.parametrize("syntax", [RLELossless, JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless])
def test_a_frame_declared_larger_than_the_node_decodes_is_refused_before_it_is_decoded(syntax: str) -> None:
    """A kilobyte of RLE declaring 30,000 × 30,000 pixels made the decoder allocate 1.7 GB for the
    console's preview of an upload before it failed (review); the codestreams' own frame headers, which
    their decoders allocate by whatever the DICOM header says, are held to the same limit."""
    assert dataset_to_gray(_declaring(syntax, 64, 64)).shape == (64, 64)
    with pytest.raises(UnsupportedImageError,
                       match=r"too large to decode \(30000 × 30000 pixels; at most 64 megapixels\)"):
        dataset_to_gray(_declaring(syntax, 30000, 30000))


def test_a_jpeg2000_codestream_in_jp2_boxes_is_held_to_the_same_size_limit() -> None:
    """Some encoders put the codestream in a JP2 file's boxes, which the decoders read as well; its SIZ
    marker, after the boxes, went unchecked, and only the size check on a bare codestream held."""
    buffer = io.BytesIO()
    Image.fromarray(ramp(8, 64)).save(buffer, "JPEG2000", irreversible=False)  # JP2 boxes, then SOC SIZ
    jp2 = bytearray(buffer.getvalue())
    assert not jp2.startswith(b"\xff\x4f")
    siz = jp2.find(b"\xff\x4f\xff\x51")
    jp2[siz + 8:siz + 16] = struct.pack(">II", 9000, 9000)  # 81 Mpx: under Pillow's limit, over the node's
    ds = make_dataset(ramp(8, 64), bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([bytes(jp2)])
    with pytest.raises(UnsupportedImageError,
                       match=r"too large to decode \(9000 × 9000 pixels; at most 64 megapixels\)"):
        dataset_to_gray(ds)


def test_pixels_that_spell_a_jpeg2000_size_marker_are_not_read_as_one() -> None:
    """An RLE frame copies runs of distinct pixel values verbatim: a row that spells SOC SIZ and a huge
    size must not be taken for a JPEG 2000 codestream's declaration and refused."""
    pixels = ramp(8, 64)
    # SOC SIZ Lsiz Rsiz, Xsiz Ysiz (about 1.1 × 10⁹ each), XOsiz YOsiz (small): no two bytes alike in a row
    marker = b"\xff\x4f\xff\x51\x00\x29\x00\x01" + bytes([*range(0x40, 0x48), *range(0x01, 0x09)])
    pixels[10, :len(marker)] = np.frombuffer(marker, dtype=np.uint8)
    rle = _compressed(make_dataset(pixels, bits_stored=8), RLELossless)
    assert marker in next(generate_frames(rle.PixelData, number_of_frames=1))
    assert dataset_to_gray(rle).shape == (64, 64)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_picture_larger_than_the_node_decodes_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """Pillow only warns between 89 and 179 megapixels: a 0.7 MB PNG of 13,000 × 13,000 took 645 MB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path = tmp_path / "huge.png"  # its header; Pillow reads the size from it, the node reads no further
    header = struct.pack(">IIBBBBB", 13000, 13000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IEND", b""))
    with pytest.raises(UnsupportedImageError, match=r"the picture is too large to decode \(13000 × 13000"):
        read_image_file(path)


def _with_raw_element(ds: Dataset, element: bytes) -> Dataset:
    """``ds`` written and read back with ``element`` (explicit VR little endian bytes) before Pixel Data:
    pydicom parses such an element only when it is first read, as it does a received one."""
    data = _to_bytes(ds)
    at = data.find(b"\xe0\x7f\x10\x00")  # Pixel Data, the last element; tags ascend
    return pydicom.dcmread(io.BytesIO(data[:at] + element + data[at:]))


@pytest.mark.parametrize(
    "element",
    [
        b"\x28\x00\x20\x01US\x03\x00\x00\x00\x00",  # Pixel Padding Value of 3 bytes: BytesLengthException
        b"\x28\x00\x20\x01\x55\xd3\x02\x00\x00\x00",  # ... with a VR that is none: NotImplementedError
    ],
    ids=["odd-length", "unknown-vr"],
)
def test_a_damaged_header_element_is_an_unsupported_image_not_a_crash(element: bytes) -> None:
    """pydicom raised its own exceptions from such an element, which escaped as an unexpected failure (the
    node then recorded "classification failed" and retried the batch image by image)."""
    ds = _with_raw_element(make_dataset(ramp(12), bits_stored=12), element)
    for read in (lambda: dataset_to_model_input(ds, SPEC), lambda: display_image(ds)):
        with pytest.raises(UnsupportedImageError, match="a header element cannot be read"):
            read()


def test_a_damaged_patient_orientation_reads_as_not_said() -> None:
    """Read for a whole batch before any image: its exception failed every image of the batch."""
    element = b"\x20\x00\x20\x00\x55\xd3\x04\x00L\\F "  # Patient Orientation with a VR that is none
    ds = _with_raw_element(make_dataset(ramp(12), bits_stored=12), element)
    assert upright_turns(ds) == 0


def test_a_dicom_file_cut_in_a_length_field_or_inside_its_deflated_data_is_an_unsupported_image(
    tmp_path: Path,
) -> None:
    """struct.error and zlib.error escaped read_image_file: one bad file ended a whole evaluation run."""
    data = _to_bytes(make_dataset(ramp(12), bits_stored=12))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: data.find(b"\xe0\x7f\x10\x00") + 9])  # inside Pixel Data's 4-byte length
    deflated = make_dataset(ramp(12), bits_stored=12)
    deflated.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    whole = _to_bytes(deflated)
    short = tmp_path / "short.dcm"
    short.write_bytes(whole[: len(whole) - 200])
    for path in (cut, short):
        with pytest.raises(UnsupportedImageError, match="not a readable DICOM file"):
            read_image_file(path)


def test_jpeg_baseline_is_decoded() -> None:
    pixels = ramp(8, 64)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    ds = make_dataset(pixels, bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    gray = dataset_to_gray(pydicom.dcmread(io.BytesIO(_to_bytes(ds))))
    assert gray[:, :5].mean() < 0.1 and gray[:, -5:].mean() > 0.9


def test_png_and_dicom_of_the_same_pixels_give_the_same_input() -> None:
    pixels = ramp(8, 64)
    ds = make_dataset(pixels, bits_stored=8)
    ds.WindowCenter, ds.WindowWidth = 128, 256
    spec = PreprocessSpec(input_size=(32, 32), equalisation="histeq", crop_borders=True)
    from_dicom = dataset_to_model_input(ds, spec)
    for mode in ("L", "RGB", "I;16"):
        image = (
            Image.fromarray(pixels).convert(mode)
            if mode != "I;16"
            else Image.fromarray(pixels.astype(np.uint16) * 257)
        )
        np.testing.assert_allclose(image_to_model_input(image, spec), from_dicom, atol=0.02)


@pytest.mark.parametrize(("bits", "label"), [(10, False), (12, False), (14, False), (16, False), (12, True)])
def test_a_16_bit_png_reads_as_the_same_picture_whatever_bits_its_values_use(bits: int, label: bool) -> None:
    """Collections publish 10- to 14-bit radiographs as 16-bit PNGs. Read as 16-bit values, a 12-bit one
    was nearly black, the border crop cut a quarter from every side, and the model read a tight crop. A
    label burnt in at full scale (65535) must not make a 12-bit picture read as 16 bits again."""
    spec = PreprocessSpec(input_size=(224, 224), equalisation="histeq", crop_borders=True)  # as shipped
    picture = Image.fromarray(display_image(read_dataset(peers.pydicom_data_file("RG1_UNCI.dcm")), 512))
    levels = np.round(np.asarray(picture, dtype=np.float64) / 255.0 * ((1 << bits) - 1)).astype(np.uint16)
    if label:
        levels[40:52, 40:120] = 65535  # 0.4 % of the picture
        picture = Image.fromarray(np.where(levels == 65535, 255, np.asarray(picture)).astype(np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    buffer.seek(0)
    with Image.open(buffer) as png:
        assert png.mode.startswith("I")  # Pillow reads it as 16-bit (or 32-bit) integers
        gray = pil_to_gray(png)
        model_input = image_to_model_input(png, spec)
    assert frame_box(gray, spec) == frame_box(pil_to_gray(picture), spec)
    assert np.abs(model_input - image_to_model_input(picture, spec)).mean() < 0.005


def test_model_input_shape_and_normalisations() -> None:
    ds = make_dataset(ramp(8, 64), bits_stored=8)
    unit = dataset_to_model_input(ds, PreprocessSpec(input_size=(40, 30)))
    assert unit.shape == (40, 30, 3) and unit.dtype == np.float32
    assert unit.min() >= 0.0 and unit.max() <= 1.0
    assert np.array_equal(unit[..., 0], unit[..., 2])
    resnet = dataset_to_model_input(ds, PreprocessSpec(input_size=(40, 30), normalisation="resnet"))
    np.testing.assert_allclose(resnet[..., 0], unit[..., 0] * 255 - 103.939, atol=1e-3)  # BGR, ImageNet mean
    signed = dataset_to_model_input(ds, PreprocessSpec(input_size=(40, 30), normalisation="signed"))
    np.testing.assert_allclose(signed, (unit * 255 - 127) / 128, atol=1e-5)  # EfficientNet-Lite's input
    assert signed.min() >= -1.0 and signed.max() <= 1.0


def test_equalisation_is_invariant_to_gamma() -> None:
    gray = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    # exact up to the 1024-level quantisation, which merges levels where the gamma curve is flat
    assert np.abs(equalise(gray) - equalise(gray**1.8)).mean() < 0.01
    assert np.abs(equalise(gray) - gray).mean() < 0.02  # a uniform image stays (nearly) itself


def test_spec_round_trips_through_json_dict() -> None:
    spec = PreprocessSpec(
        input_size=(224, 200), normalisation="resnet", equalisation="histeq", crop_borders=True,
        centre_crop=0.8,
    )
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    older = {key: value for key, value in spec.to_dict().items() if key != "centre_crop"}
    assert PreprocessSpec.from_dict(older).centre_crop == 1.0  # model.json written before the field


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({"equalisation": None}, r"preprocessing lacks \['equalisation'\]"),
        ({"crop_borders": None}, r"preprocessing lacks \['crop_borders'\]"),
        ({"equalisation": None, "equalization": "histeq"}, r"unknown preprocessing keys \['equalization'\]"),
        ({"crop_borders": "false"}, "preprocessing crop_borders 'false' is not bool"),
        ({"centre_crop": True}, "preprocessing centre_crop True is not float"),
        ({"input_size": [224.0, 224]}, r"preprocessing input_size \[224.0, 224\] is not \[height, width\]"),
        ({"input_size": [224, 224, 3]}, "is not \\[height, width\\]"),
        ({"normalisation": 1}, "preprocessing normalisation 1 is not str"),
    ],
)
def test_a_damaged_or_edited_spec_is_refused_not_read_with_defaults(
    change: dict[str, object], refusal: str
) -> None:
    """A missing or misspelt key was read as its default and a wrong type converted (``"false"`` as
    true): the shipped model then called the hospital CR covid at 0.93 instead of 0.96 without equalisation,
    under the same name and version in its reports."""
    written = PreprocessSpec(input_size=(224, 224), equalisation="histeq", crop_borders=True).to_dict()
    for key, value in change.items():
        if value is None:
            del written[key]
        else:
            written[key] = value
    with pytest.raises(ValueError, match=refusal):
        PreprocessSpec.from_dict(written)
    with pytest.raises(ValueError):
        PreprocessSpec(input_size=(224, 224), normalisation="imagenet-ish")
    with pytest.raises(ValueError):
        PreprocessSpec(input_size=(224, 224), centre_crop=0.1)


def test_centre_crop_keeps_the_middle_and_the_heat_map_returns_to_theheatmap_in_whole_frame() -> None:
    gray = np.zeros((100, 80), dtype=np.float32)
    gray[25:75, 20:60] = 1.0  # the central half of each side
    spec = PreprocessSpec(input_size=(32, 32), centre_crop=0.5)
    assert np.allclose(image_to_model_input(Image.fromarray((gray * 255).astype(np.uint8)), spec), 1.0)
    heat = heatmap_in_whole_frame(np.ones((32, 32), dtype=np.float32), frame_box(gray, spec))
    assert heat.shape == (32, 32)
    assert heat[16, 16] == pytest.approx(1.0) and heat[1, 1] == pytest.approx(0.0)
    assert 0.2 < float(heat.mean()) < 0.3  # a quarter of the frame


def test_real_cr_uncompressed_and_jpeg2000_agree_and_show_white_bone() -> None:
    spec = PreprocessSpec(input_size=(224, 224))
    unci = read_dataset(peers.pydicom_data_file("RG1_UNCI.dcm"))
    j2kr = read_dataset(peers.pydicom_data_file("RG1_J2KR.dcm"))
    # The reduced JPEG 2000 level matches the box-averaged uncompressed image (both ≥ 2 × 224 px).
    shapes = {dataset_to_gray(ds, min_side=224).shape for ds in (unci, j2kr)}
    assert shapes == {(489, 461)}
    a, b = dataset_to_model_input(unci, spec), dataset_to_model_input(j2kr, spec)
    assert a.shape == b.shape == (224, 224, 3)
    assert np.abs(a - b).mean() < 0.01
    preview = display_image(j2kr, max_size=512)
    assert preview.dtype == np.uint8 and preview.shape == (512, 482)
    height, width = preview.shape
    air = preview[height // 30 : height // 10, : width // 20].mean()  # above the shoulder, outside the body
    spine = preview[height // 3 : height // 2, width // 2 - 5 : width // 2 + 5].mean()
    assert spine > air + 50  # MONOCHROME1 inverted: dense mediastinum white, air dark


@pytest.mark.parametrize(
    ("compressed", "uncompressed", "max_size"),
    [
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm", 1024),  # 1024²: the level at half the size was chosen before
        ("RG1_J2KI.dcm", "RG1_UNCI.dcm", 1024),  # 1955×1841: only the full resolution reaches 1024
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm", 512),
    ],
)
def test_jpeg2000_preview_is_as_large_as_the_uncompressed_one(
    compressed: str, uncompressed: str, max_size: int
) -> None:
    """The report's image and the heat-map Secondary Capture are made from this preview: a study sent as
    JPEG 2000 gets them at the size it would get uncompressed, not at a coarser resolution level."""
    j2k = display_image(read_dataset(peers.pydicom_data_file(compressed)), max_size=max_size)
    raw = display_image(read_dataset(peers.pydicom_data_file(uncompressed)), max_size=max_size)
    assert j2k.shape == raw.shape and max(raw.shape) == max_size
    assert np.abs(j2k.astype(np.float64) - raw).mean() < 2.0


@settings(max_examples=60)
@given(st.integers(40, 600), st.integers(40, 600), st.sampled_from([32, 64, 100, 128]))
def test_any_jpeg2000_preview_has_the_uncompressed_preview_size(
    rows: int, columns: int, max_size: int
) -> None:
    """A resolution level and a box average round a frame's size differently; the preview takes its size
    from the stored frame, so the two agree to the pixel (before, one size in seven was a pixel apart)."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    pixels = ((np.sin(xx / 9.0) + np.cos(yy / 7.0) + 2) / 4 * 4095).astype(np.uint16)
    plain = make_dataset(pixels, bits_stored=12)
    compressed = _compressed(plain, JPEG2000Lossless)
    assert display_image(compressed, max_size).shape == display_image(plain, max_size).shape


def test_a_truncated_jpeg2000_frame_is_refused_after_both_decodes_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A JPEG 2000 frame cut short in transfer: the reduced-level decode fails, the full decode is tried (it
    may read what the reduced one could not) and fails too, and the image is refused with a reason; no
    decoder error escapes, and the log says which step failed without the image's content."""
    yy, xx = np.mgrid[0:600, 0:500]
    pixels = ((np.sin(xx / 40.0) + np.cos(yy / 30.0) + 2) / 4 * 4095).astype(np.uint16)
    compressed = _compressed(make_dataset(pixels, bits_stored=12), JPEG2000Lossless)
    assert dataset_to_gray(compressed, min_side=100).shape == (300, 250)  # whole: a reduced level
    [frame] = generate_frames(compressed.PixelData, number_of_frames=1)
    compressed.PixelData = encapsulate([frame[: len(frame) // 2]])
    with caplog.at_level("WARNING", logger="classifier.preprocess"):
        with pytest.raises(UnsupportedImageError, match=r"^pixel data cannot be decoded \("):
            dataset_to_gray(compressed, min_side=100)
    assert "reduced JPEG 2000 decode failed (OSError); decoding at full resolution" in caplog.text


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("Rows", None), ("Rows", 0), ("SamplesPerPixel", None), ("PixelRepresentation", None)],
)
def test_a_jpeg2000_image_with_an_empty_pixel_header_value_is_refused_with_a_reason(
    keyword: str, value: int | None
) -> None:
    """The reduced-level decoder reads the header first; an empty or absent size, sample count or sign
    must leave the refusal to the full decode ("pixel data cannot be decoded (…Rows…)") as it does for
    the same header uncompressed, not end in a TypeError or AttributeError."""
    yy, xx = np.mgrid[0:600, 0:500]
    pixels = ((np.sin(xx / 40.0) + np.cos(yy / 30.0) + 2) / 4 * 4095).astype(np.uint16)
    compressed = _compressed(make_dataset(pixels, bits_stored=12), JPEG2000Lossless)
    setattr(compressed, keyword, value)
    with pytest.raises(UnsupportedImageError, match=r"^pixel data cannot be decoded \("):
        dataset_to_gray(compressed, min_side=100)
    delattr(compressed, keyword)
    with pytest.raises(UnsupportedImageError, match=r"^pixel data cannot be decoded \("):
        dataset_to_gray(compressed, min_side=100)


def test_an_empty_bits_stored_does_not_stop_a_reduced_jpeg2000_decode() -> None:
    """Bits Stored only backs up the codestream's own precision on the reduced path."""
    yy, xx = np.mgrid[0:600, 0:500]
    pixels = ((np.sin(xx / 40.0) + np.cos(yy / 30.0) + 2) / 4 * 4095).astype(np.uint16)
    plain = make_dataset(pixels, bits_stored=12)
    compressed = _compressed(plain, JPEG2000Lossless)
    compressed.BitsStored = None
    reduced = dataset_to_gray(compressed, min_side=100)
    assert reduced.shape == (300, 250)
    np.testing.assert_allclose(reduced, dataset_to_gray(_compressed(plain, JPEG2000Lossless), min_side=100))


@pytest.mark.parametrize(
    ("shape", "dtype", "min_side"),
    [
        ((1955, 1841), np.uint16, 224),  # RG1's size: a remainder row and column
        ((1001, 1503), np.int16, 100),  # signed, factor 5 with remainders
        ((999, 1203, 3), np.uint8, 100),  # colour planes
        ((300, 300), np.uint16, 224),  # small: no reduction
    ],
)
def test_large_frames_are_box_averaged_as_pillow_reduces_them(
    shape: tuple[int, ...], dtype: type, min_side: int
) -> None:
    """The reduction adds stored integers box by box; edge boxes the factor does not fill are the mean of the
    pixels they have. Pillow's float ``reduce`` is the reference, to the bit."""
    info = np.iinfo(dtype)
    values = np.random.default_rng(3).integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    factor = max(1, min(shape[:2]) // (2 * min_side))
    planes = [values] if values.ndim == 2 else [values[..., c] for c in range(values.shape[2])]
    expected = np.stack(
        [np.asarray(Image.fromarray(p.astype(np.float32), mode="F").reduce(factor)) for p in planes], axis=-1
    )
    reduced = _box_reduce(values, min_side)
    assert reduced.dtype == np.float32
    np.testing.assert_array_equal(reduced, expected if values.ndim == 3 else expected[..., 0])
    assert reduced.shape[:2] == (-(-shape[0] // factor), -(-shape[1] // factor))


@pytest.mark.parametrize(
    ("dtype", "bits_stored", "signed"),
    [
        (np.uint16, 15, False),  # RG1's depth
        (np.uint16, 12, False),
        (np.uint16, 10, False),
        (np.uint16, 16, False),  # no unused bits: nothing to clear
        (np.int16, 12, True),  # sign-extended from bit 11
        (np.int16, 15, True),
        (np.uint8, 6, False),
        (np.int8, 7, True),
        (np.uint32, 20, False),
        (np.int32, 24, True),
    ],
)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("frames", [1, 3])
def test_uncompressed_grey_values_are_pydicoms_with_the_unused_bits_corrected(
    dtype: type, bits_stored: int, signed: bool, syntax: str, frames: int
) -> None:
    """Uncompressed grey frames are read as a view of the Pixel Data and their unused high bits cleared (or
    the sign extended) here, in one pass instead of pydicom's copy and two shifts: the values must be
    pydicom's own, to the bit, whatever the high bits hold (random here, as PS3.5 8.1.1 allows)."""
    info = np.iinfo(dtype)
    shape = (frames, 37, 41) if frames > 1 else (37, 41)
    values = np.random.default_rng(bits_stored).integers(info.min, info.max, size=shape, endpoint=True)
    ds = make_dataset(values.astype(dtype), bits_stored=bits_stored, signed=signed, frames=frames)
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = values.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    expected = pixel_array(ds, index=0 if frames > 1 else None)
    got = frame_pixels(ds, min_side=16)
    # the same type of integer (pydicom's big-endian copy stays big-endian, a new array is native)
    kind = (got.dtype.kind, got.dtype.itemsize, got.shape)
    assert kind == (expected.dtype.kind, expected.dtype.itemsize, shape[-2:])
    np.testing.assert_array_equal(got, expected)
    if bits_stored < np.dtype(dtype).itemsize * 8:  # the random high bits were set somewhere
        assert not np.array_equal(got, values[0] if frames > 1 else values)


def _reference_model_input(ds: Dataset, spec: PreprocessSpec) -> npt.NDArray[np.float32]:
    """The grey pipeline written out plainly, as it was before it was made faster: pydicom's own decode,
    Pillow's float box reduce, the rescale and the window in float32 as written, then the shared geometric and
    intensity steps."""
    raw = pixel_array(ds)
    min_side = max(spec.input_size)
    factor = max(1, min(raw.shape) // (2 * min_side))
    stored = np.asarray(Image.fromarray(raw.astype(np.float32), mode="F").reduce(factor), dtype=np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    values = (stored * slope + intercept).astype(np.float32)
    if "WindowCenter" in ds:
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        low, span = center - 0.5 - (width - 1.0) / 2.0, max(width - 1.0, 1e-6)
    else:
        low, high = np.percentile(values, (0.5, 99.5))
        span = high - low
    gray = np.clip((values - low) / span, 0.0, 1.0).astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gray = 1.0 - gray
    return gray_to_model_input(gray, spec)


@pytest.mark.parametrize(
    ("dtype", "bits_stored", "signed", "shape"),
    [
        (np.uint16, 15, False, (1955, 1841)),  # RG1's depth and size: factor 4 with remainders
        (np.uint16, 12, False, (1203, 997)),  # factor 2 with remainders
        (np.uint16, 16, False, (700, 650)),
        (np.int16, 12, True, (1001, 1503)),  # factor 2
        (np.uint8, 8, False, (300, 420)),  # no reduction
    ],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("rescale", [None, (1, 0), (2, -100)])
@pytest.mark.parametrize("window", [True, False])
def test_the_model_input_of_a_grey_dicom_is_the_plain_pipelines_to_the_bit(
    dtype: type, bits_stored: int, signed: bool, shape: tuple[int, int], photometric: str,
    rescale: tuple[int, int] | None, window: bool,
) -> None:
    """The decode (a view, unused bits masked), the box reduce (sums from each box's first row) and the
    identity rescale (skipped) were made faster; the model input must be that of the plain pipeline, bit for
    bit, at several bit depths, with random values in the unused high bits."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(bits_stored + shape[0])
    smooth = np.linspace(0, 1, shape[1])[None, :] * np.linspace(0.2, 1, shape[0])[:, None]
    top = (1 << (bits_stored - 1 if signed else bits_stored)) - 1
    values = (smooth * top * 0.9 + rng.integers(0, max(top // 20, 2), size=shape)).astype(np.int64)
    high_bits = rng.integers(0, 2, size=shape) << (bits_stored if bits_stored < info.bits else 0)
    stored = (values | high_bits) if bits_stored < info.bits else values
    ds = make_dataset(stored.astype(dtype), photometric=photometric, bits_stored=bits_stored, signed=signed)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window:
        slope, intercept = rescale or (1, 0)
        ds.WindowCenter, ds.WindowWidth = top * 0.5 * slope + intercept, top * 0.6 * slope
    spec = PreprocessSpec(input_size=(224, 224), equalisation="histeq", crop_borders=True)
    expected = _reference_model_input(ds, spec)
    got = dataset_to_model_input(ds, spec)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_a_16_bit_picture_is_read_without_full_size_float64_copies() -> None:
    """An 8000² 16-bit PNG of 1.4 MB took 1.5 GB to read (float64 copies of it and of its percentile), on
    every preview, classification and heat map of an upload (review). Now: about two float32 copies."""
    import tracemalloc

    values = np.random.default_rng(0).integers(0, 4096, (2000, 1500)).astype(np.uint16)
    picture = Image.fromarray(values)
    tracemalloc.start()
    try:
        gray = pil_to_gray(picture)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * values.size * 4, peak / 1e6
    expected = np.clip(values.astype(np.float64) / 4095.0, 0, 1).astype(np.float32)  # the 12 bits it uses
    np.testing.assert_array_equal(gray, expected)
