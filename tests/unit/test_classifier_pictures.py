"""Picture files (TIFF, PNG, GIF…) as `cxr-node classify`, evaluation and training read them: the TIFF
and PNG layouts a radiograph exported from a workstation can have, each read as the picture it shows or
refused with a reason."""

from __future__ import annotations

import io
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, TiffImagePlugin

from classifier.errors import UnsupportedImageError
from classifier.preprocess import gray_to_uint8, picture_display, pil_to_gray, read_image_file

pytestmark = pytest.mark.unit

_TIFF_TYPES = {np.dtype("<u1"): 1, np.dtype("<u2"): 1, np.dtype("<i2"): 2, np.dtype("<f4"): 3}


def write_tiff(path: Path, pixels: npt.NDArray[np.generic], *, photometric: int = 1) -> Path:
    """An uncompressed one-strip grey TIFF of ``pixels`` (uint8, uint16, int16 or float32, little endian)
    with the given PhotometricInterpretation (0 WhiteIsZero, 1 BlackIsZero), written field by field:
    Pillow writes no WhiteIsZero or signed 16-bit TIFF."""
    pixels = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    height, width = pixels.shape
    data = pixels.tobytes()
    tags = [
        (256, width), (257, height), (258, pixels.dtype.itemsize * 8), (259, 1), (262, photometric),
        (273, 0), (277, 1), (278, height), (279, len(data)), (339, _TIFF_TYPES[pixels.dtype]),
    ]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    entries = b"".join(
        struct.pack("<HHII", tag, 4, 1, data_offset if tag == 273 else value) for tag, value in tags
    )
    path.write_bytes(
        b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0) + data
    )
    return path


def chest_like(height: int = 96, width: int = 80) -> npt.NDArray[np.float64]:
    """A picture in [0, 1] with no symmetry, so any turn, flip or scramble shows."""
    yy, xx = np.mgrid[0:height, 0:width]
    return (np.sin(xx / 9.0) * np.cos(yy / 13.0) + xx / width + 2 * yy / height + 1.0) / 5.0


_TURN = {
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("orientation", sorted(_TURN))
def test_an_uncompressed_tiff_stored_on_its_side_is_read_turned_not_scrambled(
    orientation: int, tmp_path: Path
) -> None:
    """Given a path, Pillow mapped the strip into memory at the turned size: a chest exported on its side
    became vertical stripes, which the model classified (normal at 0.66)."""
    stored = np.round(chest_like() * 255).astype(np.uint8)
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[274] = orientation
    path = tmp_path / "side.tif"
    Image.fromarray(stored).save(path, tiffinfo=tags)  # uncompressed
    expected = np.asarray(Image.fromarray(stored).transpose(_TURN[orientation]), dtype=np.float32) / 255
    np.testing.assert_array_equal(pil_to_gray(read_image_file(path)), expected)


@pytest.mark.parametrize(("dtype", "top"), [("<u1", 255), ("<u2", 4095), ("<u2", 65535)])
def test_a_white_is_zero_tiff_reads_as_the_positive_at_every_bit_depth(
    dtype: str, top: int, tmp_path: Path
) -> None:
    """WhiteIsZero is TIFF's MONOCHROME1. Pillow inverts it at 8 bits only: a 16-bit CR export was read
    as a negative (covid at 0.63, with the advice to export it again with bone white)."""
    picture = chest_like()
    levels = np.round(picture * top).astype(dtype)
    negative = write_tiff(tmp_path / "negative.tif", (top - levels).astype(dtype), photometric=0)
    positive = write_tiff(tmp_path / "positive.tif", levels, photometric=1)
    expected = pil_to_gray(read_image_file(positive))
    np.testing.assert_allclose(pil_to_gray(read_image_file(negative)), expected, atol=1e-6)
    np.testing.assert_allclose(expected, picture, atol=0.5 / top + 1e-6)


def test_a_signed_tiff_is_windowed_not_clipped_at_zero(tmp_path: Path) -> None:
    """Signed samples below 0 were all read as black: half the picture was one grey level."""
    picture = chest_like()
    signed = np.round((picture - np.median(picture)) * 4000).astype("<i2")
    gray = pil_to_gray(read_image_file(write_tiff(tmp_path / "signed.tif", signed)))
    assert (gray == 0).mean() < 0.01  # the percentile window's 0.5 %, not half the picture
    below = gray[signed < 0]
    assert len(np.unique(below)) > 100
    assert np.corrcoef(gray.ravel(), picture.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("outlier", [1e6, -1e6, float("inf"), float("nan")])
def test_one_extreme_pixel_does_not_set_the_window_of_a_floating_point_tiff(
    outlier: float, tmp_path: Path
) -> None:
    """Scaled between its extremes, one hot pixel made the whole model input black and one cold pixel
    made it white, and both were still classified."""
    picture = chest_like().astype(np.float32)
    clean = pil_to_gray(read_image_file(write_tiff(tmp_path / "clean.tif", picture)))
    spoiled = picture.copy()
    spoiled[0, 0] = outlier
    gray = pil_to_gray(read_image_file(write_tiff(tmp_path / "spoiled.tif", spoiled)))
    assert np.abs(gray - clean)[1:, 1:].max() < 0.02
    assert np.corrcoef(clean.ravel(), picture.ravel())[0, 1] > 0.999


def _pages(path: Path, kind: str) -> Path:
    first = Image.fromarray(np.round(chest_like() * 255).astype(np.uint8))
    first.save(path, format=kind, save_all=True, append_images=[first.transpose(Image.Transpose.ROTATE_90)])
    return path


@pytest.mark.parametrize(("name", "kind"), [("two.tif", "TIFF"), ("two.gif", "GIF"), ("two.png", "PNG")])
def test_a_picture_of_several_pages_or_frames_is_refused_as_the_console_refuses_it(
    name: str, kind: str, tmp_path: Path
) -> None:
    """`cxr-node classify`, evaluation and training read page 1 of a multi-page TIFF or animated GIF
    without a word, where the console refused an animated PNG and the node a multi-frame object."""
    with pytest.raises(UnsupportedImageError, match=r"an animated or multi-page picture \(2 frames\)"):
        read_image_file(_pages(tmp_path / name, kind))


def test_a_camera_jpeg_with_a_second_smaller_picture_is_read_as_its_first(tmp_path: Path) -> None:
    """MPO (a JPEG with a Multi-Picture Format preview) is one photograph, not two frames."""
    path = _pages(tmp_path / "camera.jpg", "MPO")
    with Image.open(path) as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
    assert pil_to_gray(read_image_file(path)).shape == chest_like().shape


def test_16_bit_colour_samples_are_refused_not_read_through_their_high_byte(tmp_path: Path) -> None:
    """Pillow keeps the high byte of 16-bit RGB and grey-with-alpha samples: a 12-bit radiograph came out
    with 14 grey levels and was classified (covid at 0.999). 16-bit grey is read (the tests above)."""
    levels = np.round(chest_like() * 4095).astype("<u2")
    height, width = levels.shape
    data = np.dstack([levels] * 3).tobytes()
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, 0), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, 0), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, len(data))]
    bits_at = 8 + 2 + 12 * len(tags) + 4
    entries = b"".join(
        struct.pack("<HHII", tag, kind, count, {258: bits_at, 273: bits_at + 6}.get(tag, value))
        if kind == 4 or tag == 258 else struct.pack("<HHIHH", tag, kind, count, value, 0)
        for tag, kind, count, value in tags
    )
    path = tmp_path / "rgb16.tif"
    path.write_bytes(b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + struct.pack("<I", 0)
                     + struct.pack("<3H", 16, 16, 16) + data)
    with Image.open(path) as opened:
        assert opened.mode == "RGB"  # what Pillow makes of it
    with pytest.raises(UnsupportedImageError, match="a 16-bit colour or grey-with-alpha picture"):
        read_image_file(path)


@pytest.mark.parametrize("given", ["DOE^JANE_4711", "DOE^JANE_4711/chest.png", "DOE^JANE_4711/chest.dcm"])
def test_a_file_that_cannot_be_opened_is_refused_without_its_folder_or_name(
    given: str, tmp_path: Path
) -> None:
    """A folder given for a file was refused as "Is a directory: 'DOE^JANE_4711'": the folder's name, which
    may name a patient, in a reason the caller prints beside the path it already names."""
    (tmp_path / "DOE^JANE_4711").mkdir()
    with pytest.raises(UnsupportedImageError) as refused:
        read_image_file(tmp_path / given)
    reason = str(refused.value)
    assert "DOE" not in reason and "chest" not in reason
    assert reason.endswith(
        ("(IsADirectoryError: Is a directory)", "(FileNotFoundError: No such file or directory)")
    )


def _turned_jpeg(pixels: npt.NDArray[np.uint8], orientation: int) -> Image.Image:
    exif = Image.Exif()
    exif[274] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif.tobytes())
    picture = Image.open(io.BytesIO(buffer.getvalue()))
    picture.load()
    return picture


_RGB = np.random.default_rng(7).integers(0, 256, (1300, 1100, 3), dtype=np.uint8)
_PICTURES: dict[str, Callable[[], Image.Image]] = {
    "grey": lambda: Image.fromarray(_RGB[..., 0]),
    "colour": lambda: Image.fromarray(_RGB),
    "palette": lambda: Image.fromarray(_RGB).convert("P"),
    "grey with alpha": lambda: Image.fromarray(np.ascontiguousarray(_RGB[..., :2]), mode="LA"),
    "12 bits in 16": lambda: Image.fromarray(_RGB[..., 0].astype(np.uint16) * 16),
    "floating point": lambda: Image.fromarray(_RGB[..., 1].astype(np.float32) - 100),
    "turned by EXIF": lambda: _turned_jpeg(_RGB, 6),
    "smaller than the preview": lambda: Image.fromarray(_RGB[:300, :200, 2]),
}


@pytest.mark.parametrize("kind", sorted(_PICTURES))
def test_a_picture_is_displayed_as_the_grey_picture_the_model_reads(kind: str) -> None:
    """The console's preview and the report's image of an upload are the model's grey picture, rounded to
    8 bits and reduced, to the bit, however the display gets there (the heat map lies where the model
    looked); the upload's picture is left as it was."""
    picture = _PICTURES[kind]()
    before = np.asarray(picture).copy()
    expected = Image.fromarray(gray_to_uint8(pil_to_gray(picture)))
    expected.thumbnail((1024, 1024))
    shown = picture_display(picture)
    np.testing.assert_array_equal(shown, np.asarray(expected))
    assert max(shown.shape) == min(1024, max(picture.size))
    np.testing.assert_array_equal(np.asarray(picture), before)


def _peak_traced(work: Callable[[], object]) -> int:
    """The most memory Python and NumPy held at once during ``work`` (Pillow's own buffers are not traced)."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_display_of_an_8_bit_picture_makes_no_float_copy_of_it() -> None:
    """An 8000² upload's preview took 0.9 GB: the picture as float32, its quotient, a float32 copy of that,
    then the product, sum and clip of its 8-bit rounding, each as large. Now Pillow makes the picture grey
    and small; no array of the whole picture is made."""
    picture = Image.fromarray(np.tile(_RGB, (2, 2, 1)))  # 2600 × 2200, 6.8 Mpx
    assert _peak_traced(lambda: picture_display(picture)) < picture.width * picture.height // 2


def test_the_model_reads_a_picture_through_one_float_copy() -> None:
    grey = Image.fromarray(np.tile(_RGB[..., 0], (2, 2)))
    float_copy = grey.width * grey.height * 4
    # the float32 copy, and the 8-bit bytes NumPy reads it from
    assert _peak_traced(lambda: pil_to_gray(grey)) < float_copy * 1.5
