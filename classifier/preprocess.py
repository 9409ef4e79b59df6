"""DICOM or PIL pixels → the exact array a model was trained on.

One path for every source: pixels are first turned into a *display-referred* grey image in [0, 1]
(MONOCHROME2 orientation: bone is white), then cropped, resized, optionally equalised, replicated to
three channels and normalised as recorded in the model's :class:`PreprocessSpec`. Training reads PNG/JPEG
through :func:`image_to_model_input`, the node reads DICOM through :func:`dataset_to_model_input`; both
end in :func:`gray_to_model_input`, so the model sees the same thing in both cases.

DICOM grey pipeline (PS3.3 C.11 order): stored values → Modality LUT / Rescale → the *first* VOI LUT or
window (PS3.3 C.11.2.1.2, LINEAR, LINEAR_EXACT and SIGMOID) → one inversion when the image is
MONOCHROME1 or its Presentation LUT Shape is INVERSE (:func:`_inverted`). When the object
carries no VOI transform, the fallback is a percentile window (0.5 %–99.5 % of the modality values),
which is what a viewer's "auto window" does and ignores collimator edges and burnt-in labels. Pixels
marked as padding (Pixel Padding Value / Range Limit, PS3.3 C.7.5.1.1.2) stay out of that window and
are shown black.
What a model reads is then turned head up by Patient Orientation (:func:`dataset_to_upright_gray`);
what reports and the console show (:func:`display_image`) keeps the stored orientation, as the
radiologist's viewer does, and heat maps are turned back onto it.
Large images are box-averaged down to about twice the model input *before* the LUTs, which keeps a
2000×2000 CR under a few tens of milliseconds; JPEG 2000 pixel data is decoded at a reduced resolution
level for the same reason (the codestream is multi-resolution, the model needs 150–256 px), unless it
holds padding pixels, which only the full resolution can leave out.

Every function here is pure: the dataset it is given is read, never changed, because the node may store
or send on the same object. What it cannot read it refuses with :class:`UnsupportedImageError` and a
reason (an unknown Photometric Interpretation by its value, Pixel Data the decoder rejects by what the
decoder found), never with another exception.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import struct
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from pydicom.encaps import generate_frames
from pydicom.pixels.processing import apply_color_lut, apply_voi
from pydicom.pixels.utils import pixel_array
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless

from classifier.errors import ModelArtifactError, UnsupportedImageError, reason_for

LOGGER = logging.getLogger(__name__)

FloatImage = npt.NDArray[np.float32]

NORMALISATIONS = ("unit", "resnet", "signed")
EQUALISATIONS = ("none", "histeq")
PERCENTILE_WINDOW = (0.5, 99.5)
EQUALISATION_LEVELS = 1024
_BORDER_STD = 0.02  # a row/column whose grey values vary less than this is treated as padding
_BORDER_MAX_FRACTION = 0.25  # never crop more than this much from one side
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's "L" conversion
IMAGENET_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)  # keras resnet "caffe" mode


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels become model input; stored in model.json so inference repeats training exactly.

    ``normalisation``: ``"unit"`` — grey in [0, 1] on three equal channels (seed 000's ``rescale=1/255``);
    ``"resnet"`` — 0–255 RGB through ``keras.applications.resnet.preprocess_input`` (BGR, ImageNet mean);
    ``"signed"`` — 0–255 grey as (x − 127) / 128, about [−1, 1] (what EfficientNet-Lite was trained on).
    ``equalisation``: ``"histeq"`` maps grey values through their own cumulative histogram, which removes
    any monotonic intensity difference between sources (gamma, window, detector response).
    ``crop_borders`` strips uniform padding bars (black/white frames of scanned or web images).
    ``centre_crop`` keeps that central fraction of each side (after the bars are gone): a coarse
    lung-field focus that takes neck, shoulders and edge markers out of every image alike.
    ``lung_crop`` crops every image to the box around its lung fields, found by the lung model that
    ships inside the artifact (:mod:`classifier.lungs`); where no plausible lungs are found, the image
    goes on through ``crop_borders``/``centre_crop`` as if the flag were off.
    """

    input_size: tuple[int, int]  # (height, width)
    normalisation: str = "unit"
    equalisation: str = "none"
    crop_borders: bool = False
    centre_crop: float = 1.0
    lung_crop: bool = False

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"unknown normalisation {self.normalisation!r}; expected one of {NORMALISATIONS}"
            )
        if self.equalisation not in EQUALISATIONS:
            raise ValueError(f"unknown equalisation {self.equalisation!r}; expected one of {EQUALISATIONS}")
        height, width = self.input_size
        if height < 8 or width < 8:
            raise ValueError(f"input size {self.input_size} is too small")
        if not 0.3 <= self.centre_crop <= 1.0:
            raise ValueError(f"centre crop {self.centre_crop} is outside [0.3, 1]")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """The spec :meth:`to_dict` wrote, every key of its type. A missing, misspelt or mistyped key is a
        ValueError: it was read as its default (``"equalization"`` as no equalisation, ``"false"`` as
        true), and the model then read other inputs than it was trained on under the same identity. Only
        the keys added later may be absent: a model.json written before them had them off."""
        if not isinstance(data, Mapping):
            raise ValueError("preprocessing is not an object")
        if unknown := sorted(set(data) - _SPEC_TYPES.keys()):
            raise ValueError(f"unknown preprocessing keys {unknown}")
        if missing := sorted(_SPEC_TYPES.keys() - set(data) - _SPEC_ADDED_LATER.keys()):
            raise ValueError(f"preprocessing lacks {missing}")
        values = {**_SPEC_ADDED_LATER, **data}
        for key, kinds in _SPEC_TYPES.items():
            value = values[key]
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise ValueError(f"preprocessing {key} {value!r} is not {kinds[0].__name__}")
        size = values["input_size"]
        if len(size) != 2 or not all(type(side) is int for side in size):
            raise ValueError(f"preprocessing input_size {size!r} is not [height, width]")
        return cls(
            input_size=(size[0], size[1]),
            normalisation=values["normalisation"],
            equalisation=values["equalisation"],
            crop_borders=values["crop_borders"],
            centre_crop=float(values["centre_crop"]),
            lung_crop=values["lung_crop"],
        )


_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "input_size": (list, tuple), "normalisation": (str,), "equalisation": (str,), "crop_borders": (bool,),
    "centre_crop": (float, int), "lung_crop": (bool,),
}
_SPEC_ADDED_LATER: dict[str, Any] = {"centre_crop": 1.0, "lung_crop": False}


_NORMALISATION_FROM_UNIT = {"unit": (1.0, 0.0), "signed": (255.0 / 128.0, -127.0 / 128.0)}


def normalisation_change(source: str, target: str) -> tuple[float, float]:
    """(scale, offset) that turn a model input normalised as ``source`` into ``target`` (x · scale +
    offset), for the normalisations that are affine maps of each other; ``"resnet"`` (BGR) is not."""
    if source not in _NORMALISATION_FROM_UNIT or target not in _NORMALISATION_FROM_UNIT:
        raise ValueError(f"no affine map from normalisation {source!r} to {target!r}")
    source_scale, source_offset = _NORMALISATION_FROM_UNIT[source]
    target_scale, target_offset = _NORMALISATION_FROM_UNIT[target]
    scale = target_scale / source_scale
    return scale, target_offset - source_offset * scale


@dataclass(frozen=True)
class Box:
    """A crop as fractions of the image's height and width (``Box()`` is the whole image)."""

    top: float = 0.0
    bottom: float = 1.0
    left: float = 0.0
    right: float = 1.0

    def pixels(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) rows and columns of the box in an image of that size, never empty."""
        top, left = round(self.top * height), round(self.left * width)
        return top, max(top + 1, round(self.bottom * height)), left, max(left + 1, round(self.right * width))

    def apply(self, gray: FloatImage) -> FloatImage:
        top, bottom, left, right = self.pixels(*gray.shape)
        return gray[top:bottom, left:right]

    def within(self, outer: Box) -> Box:
        """This box, given in fractions of ``outer``, in fractions of the whole image."""
        height, width = outer.bottom - outer.top, outer.right - outer.left
        return Box(
            outer.top + self.top * height,
            outer.top + self.bottom * height,
            outer.left + self.left * width,
            outer.left + self.right * width,
        )


class LungFinder(Protocol):
    """What the preprocessing needs of a lung model (:class:`classifier.lungs.LungCropper`)."""

    def box(self, gray: FloatImage) -> Box | None: ...


def _f32(values: Any) -> FloatImage:
    return np.asarray(values, dtype=np.float32)


# --------------------------------------------------------------------------------------------- reading


#: The largest frame the node decodes, rows × columns. Chest detectors are up to about 4,300 px square
#: (18 Mpx); a header or codestream that declares more (65,535 × 65,535 fits in a kilobyte of RLE) would
#: have the decoder allocate gigabytes for one image.
MAX_FRAME_PIXELS = 64_000_000
#: The longest side of a frame: DICOM's Rows and Columns (US) and a JPEG's size hold no more. A PNG may
#: declare up to 2³¹ − 1, and Pillow keeps a pointer of 8 bytes for each row: a PNG of 1 × 64,000,000
#: pixels (124 KB, within the pixel limit) held 549 MB once read, and its preview took 1.1 GB (review).
MAX_FRAME_SIDE = 65_535


def check_frame_size(columns: int, rows: int, what: str = "image") -> None:
    """Refuse a ``what`` of more than :data:`MAX_FRAME_PIXELS`, or with a side longer than
    :data:`MAX_FRAME_SIDE`, before anything of it is decoded."""
    if max(columns, rows) > MAX_FRAME_SIDE:
        raise UnsupportedImageError(
            f"the {what} is {columns} × {rows} pixels: a side of more than {MAX_FRAME_SIDE} pixels, which "
            "no radiograph has"
        )
    if columns * rows > MAX_FRAME_PIXELS:
        raise UnsupportedImageError(
            f"the {what} is too large to decode ({columns} × {rows} pixels; at most "
            f"{MAX_FRAME_PIXELS // 1_000_000} megapixels)"
        )


# Scans of a JPEG stream: libjpeg's progressive script has 10, a lossless or JPEG-LS frame one per component
MAX_JPEG_SCANS = 64
#: Marker segments of a JPEG stream. A camera's or a PACS export's has some tens (an ICC profile or an
#: extended XMP packet a few more); each is read in Python, by Pillow up to the first scan and by
#: :func:`_jpeg_layout` throughout, about 1.6 µs each: 128 MB of empty comments held a worker near a minute.
MAX_JPEG_SEGMENTS = 4096

_EOI, _SOS = 0xD9, 0xDA


def _jpeg_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """(marker, offset) of each marker of a JPEG or JPEG-LS stream after its SOI, through EOI (none for
    other data). The markers are walked as ITU T.81 B.1 lays them out, entropy-coded data skipped to its
    next marker: a 0xFF there is followed by 0x00 or a restart marker in JPEG, by a byte below 0x80 in
    JPEG-LS (T.87 A.1), and no marker segment begins with those."""
    if not data.startswith(b"\xff\xd8"):
        return
    index = 2
    while index + 2 <= len(data):
        if data[index] != 0xFF:  # entropy-coded data after a scan's header
            index = data.find(b"\xff", index + 1)
            if index < 0:
                return
            continue
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
        elif marker < 0x80 or 0xD0 <= marker <= 0xD7:  # a stuffed 0xFF or bit, TEM, a restart marker
            index += 2
        else:
            yield marker, index
            if marker == _EOI:
                return
            index += 2 + int.from_bytes(data[index + 2:index + 4], "big")


def _jpeg_layout(data: bytes, limit: int) -> tuple[int, bool]:
    """The start-of-scan markers of a JPEG or JPEG-LS stream, counted to ``limit`` + 1 at most, and whether
    its end-of-image marker was reached (0 and False for other data). Refuses a stream of more than
    :data:`MAX_JPEG_SEGMENTS` marker segments, before it walks them all."""
    scans = 0
    for segments, (marker, _) in enumerate(_jpeg_markers(data), start=1):
        if segments > MAX_JPEG_SEGMENTS:
            raise UnsupportedImageError(
                f"a JPEG of more than {MAX_JPEG_SEGMENTS} marker segments, which take minutes to read; a "
                "radiograph's has some tens"
            )
        if marker == _EOI:
            return scans, True
        if marker == _SOS:
            scans += 1
            if scans > limit:
                break
    return scans, False


def jpeg_scans(data: bytes, limit: int = MAX_JPEG_SCANS) -> int:
    """The start-of-scan markers of a JPEG or JPEG-LS stream, counted to ``limit`` + 1 at most (0 for other
    data). Each scan of a progressive JPEG is decoded over the whole frame, so 470 KB that repeat one scan
    1000 times took 97 s to decode, holding the interpreter lock: the node's console and C-ECHO waited
    with it (review)."""
    return _jpeg_layout(data, limit)[0]


def check_jpeg_stream(data: bytes) -> None:
    """Refuse, before it is decoded, a JPEG or JPEG-LS stream of more than :data:`MAX_JPEG_SCANS` scans,
    or one cut short: without its end-of-image marker. libjpeg and CharLS fill what
    is missing with grey and say nothing; half of a radiograph was classified as a whole one (review),
    where a JPEG 2000, RLE or uncompressed frame cut short is refused. A stream whose encoder left out
    only the marker (the standard requires it; CharLS 2.3 refuses JPEG-LS without it) cannot be told
    from one cut short, and is refused alike."""
    scans, ended = _jpeg_layout(data, MAX_JPEG_SCANS)
    if scans > MAX_JPEG_SCANS:
        raise UnsupportedImageError(
            f"a JPEG of more than {MAX_JPEG_SCANS} scans, each decoded over the whole image; a "
            "radiograph has at most a few"
        )
    if not ended and data.startswith(b"\xff\xd8"):
        raise UnsupportedImageError(
            "the JPEG stream has no end-of-image marker: cut short in transfer or storage, or written by "
            "an encoder that leaves the marker out; a missing part would be read as grey"
        )


def check_header_size(ds: pydicom.Dataset) -> None:
    """:func:`check_frame_size` of the frame a DICOM header's Columns and Rows declare (a header without
    them, or with values that cannot be read, is left to the decoder, which says what is wrong)."""
    check_frame_size(_header_int(ds, "Columns") or 0, _header_int(ds, "Rows") or 0)


def check_picture(image: Image.Image) -> None:
    """Refuse, before it is decoded, a picture the model would read as something else: one of several
    frames or pages (a multi-frame DICOM object is refused alike; a camera JPEG's second, smaller picture,
    MPO, is not a frame), and 16-bit colour or grey-with-alpha samples, of which Pillow keeps the high
    byte (a 12-bit radiograph came out with 14 grey levels, nearly black)."""
    frames = int(getattr(image, "n_frames", 1))
    if frames > 1 and image.format != "MPO":
        raise UnsupportedImageError(
            f"an animated or multi-page picture ({frames} frames); the model reads single radiographs"
        )
    if image.format in ("JPEG", "MPO") and (stream := getattr(image, "fp", None)) is not None:
        position = stream.tell()
        stream.seek(0)
        check_jpeg_stream(stream.read())
        stream.seek(position)
    for tile in getattr(image, "tile", ()):  # the raw mode Pillow decodes from, e.g. "RGB;16B"
        rawmode = tile.args if isinstance(tile.args, str) else (tile.args or ("",))[0]
        if isinstance(rawmode, str) and rawmode in _SIXTEEN_BIT_COLOUR:
            raise UnsupportedImageError(
                "a 16-bit colour or grey-with-alpha picture, which is read as 8 bits; export it as a "
                "greyscale PNG"
            )


_SIXTEEN_BIT_COLOUR = frozenset(
    f"{mode};16{order}" for mode in ("RGB", "RGBA", "RGBX", "LA", "CMYK") for order in ("", "B", "L", "N")
)

DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom_file(path: Path) -> bool:
    """A DICOM file by its suffix or, as PACS exports and dcmtk's storescp name them without one, by the
    ``DICM`` prefix of the Part 10 preamble."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


# What pydicom raises, besides ValueError and TypeError, when it parses a damaged element on first access
# or reads a damaged file: a value of the wrong length, an unknown VR, a file cut inside an element's length
# field (struct.error) or inside its deflated data set (zlib.error).
_DAMAGED_ELEMENT = (struct.error, zlib.error, NotImplementedError, pydicom.errors.BytesLengthException)


def read_dataset(path: Path) -> pydicom.Dataset:
    """Read a DICOM file; pixel data stays encoded so JPEG 2000 can be decoded at a reduced level later."""
    return pydicom.dcmread(path)


def read_image_file(path: Path) -> pydicom.Dataset | Image.Image:
    """A DICOM file (by suffix or the DICM preamble) as a dataset, or a PNG/JPEG file as a loaded picture.

    What is wrong with an unreadable file is said without the file's name: the caller knows which file it
    was and names it once, in its own words."""
    path = Path(path)
    if is_dicom_file(path):
        try:
            return read_dataset(path)
        except (pydicom.errors.InvalidDicomError, EOFError, ValueError, OSError, *_DAMAGED_ELEMENT) as exc:
            raise UnsupportedImageError(f"not a readable DICOM file ({reason_for(exc, path)})") from exc
    try:
        # From an open file, not its path: given a path, Pillow maps an uncompressed TIFF into memory at
        # its turned size (Orientation 5–8), which scrambled the picture into stripes (Pillow 13).
        with path.open("rb") as handle, Image.open(handle) as image:
            check_frame_size(*image.size, what="picture")
            check_picture(image)
            image.load()
            return image
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError("not a readable image") from exc
    except (Image.DecompressionBombError, OSError, ValueError) as exc:  # a truncated or corrupt picture
        raise UnsupportedImageError(f"not a readable image ({reason_for(exc, path)})") from exc


def number_of_frames(ds: pydicom.Dataset) -> int:
    """Number of Frames; 1 when absent, empty or unreadable (the decoder then reads what is there)."""
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _reduce_level(rows: int, columns: int, min_side: int, levels: int) -> int:
    """Largest JPEG 2000 resolution reduction keeping the shorter side at or above ``min_side``."""
    level = 0
    while level < levels and min(rows, columns) / (1 << (level + 1)) >= min_side:
        level += 1
    return level


def _j2k_decomposition_levels(codestream: bytes) -> int:
    """Number of wavelet decomposition levels from the COD marker (0 when it cannot be found)."""
    index = codestream.find(b"\xff\x52")
    if index < 0 or index + 10 > len(codestream):
        return 0
    return int(codestream[index + 9])  # Lcod(2) Scod(1) progression(1) layers(2) MCT(1) → levels


def _decode_j2k_reduced(
    ds: pydicom.Dataset, frame: bytes | None, min_side: int, photometric: str
) -> npt.NDArray[Any] | None:
    """``frame``, the first frame of a grey unsigned JPEG 2000 image, at a reduced resolution, or None to
    decode normally (also when the frame could not be extracted: the full decode says why).

    Pillow rounds the reduced size half-up while OpenJPEG rounds up, which breaks levels ≥ 2 on odd
    sizes (e.g. 1841 px); presetting the size so both roundings agree works around that.
    """
    stored = _stored_size(ds)
    if stored is None or _header_int(ds, "SamplesPerPixel") != 1:
        return None  # the full decode says what is wrong with the header, or decodes the colour image
    if _header_int(ds, "PixelRepresentation") != 0:
        return None
    if not photometric.startswith("MONOCHROME"):
        return None  # palette indices are labels: a wavelet low-pass would average them
    if frame is None:
        return None  # not extracted: the full decode says why
    siz = _j2k_siz(frame)
    if siz is not None and siz.signed:
        # Signed samples in an unsigned object (Pixel Representation 0): Pillow shifts them by 2^(p-1),
        # which swapped the two halves of the grey scale; pydicom's full decode corrects the sign.
        return None
    rows, columns = stored
    level = _reduce_level(rows, columns, min_side, _j2k_decomposition_levels(frame))
    if level == 0:
        return None
    with Image.open(io.BytesIO(frame)) as image:
        if image.mode not in ("L", "I;16") or image.size != (columns, rows):
            return None
        power = 1 << level
        adjust = power >> 1
        image._size = (  # noqa: SLF001 — see docstring
            math.ceil(columns / power) * power - adjust,
            math.ceil(rows / power) * power - adjust,
        )
        image.reduce = level  # type: ignore[assignment,method-assign]  # the J2K plugin's resolution level
        image.load()
        decoded = np.asarray(image)
    # Pillow scales 1–7 bit samples up to 8 bits ("L") and 9–15 bit ones up to 16 ("I;16") by the
    # codestream's precision, which need not be Bits Stored (pydicom warns about such files and trusts the
    # codestream on its full-resolution path); the stored values are the codestream's (PS3.5 8.2.4).
    precision = (siz.precision if siz else None) or _header_int(ds, "BitsStored") or 16
    scaled_to = 8 if image.mode == "L" else 16
    if precision < scaled_to:
        decoded = decoded >> (scaled_to - precision)
    return decoded


def _declared_size(frame: bytes) -> tuple[int, int] | None:
    """(columns, rows) that a JPEG 2000 codestream's SIZ marker or a JPEG / JPEG-LS frame header (SOFn)
    declares, which the decoder allocates whatever the DICOM header says; None when there is none."""
    if not frame.startswith(b"\xff\xd8"):
        siz = _j2k_siz(frame)
        return None if siz is None else (siz.columns, siz.rows)
    for marker, index in _jpeg_markers(frame):
        if marker == _SOS:  # no frame header before the first scan
            return None
        if marker in _SOF_MARKERS and index + 9 <= len(frame):  # Lf(2) P(1) Y(2) X(2)
            rows, columns = struct.unpack(">HH", frame[index + 5:index + 9])
            return columns, rows
    return None


# SOF0-3, 5-7, 9-11, 13-15 (ITU T.81 B.1.1.3) and SOF55 of JPEG-LS (ITU T.87)
_SOF_MARKERS = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
)


def _check_declared_size(ds: pydicom.Dataset, transfer_syntax: Any) -> bytes | None:
    """The frame the header declares, and for compressed pixel data the one its first frame's codestream
    declares, within :data:`MAX_FRAME_PIXELS` and the same size. Returns that first frame, extracted once
    for the check and the reduced JPEG 2000 decode; None for native pixel data or a frame that cannot be
    extracted."""
    check_header_size(ds)
    uid = UID(transfer_syntax or "")
    if not uid.is_transfer_syntax or not uid.is_encapsulated:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=number_of_frames(ds)))
    except (ValueError, TypeError, StopIteration, struct.error):
        return None  # the decoder says what is wrong with it
    declared = _declared_size(frame)
    if declared is not None:
        check_frame_size(*declared)
        check_jpeg_stream(frame)
        given = (_header_int(ds, "Columns"), _header_int(ds, "Rows"))
        # pydicom pours the codestream's pixels into the header's shape: sheared when the counts agree.
        # (A missing or zero size is left to the decoder, which says what it found.)
        if all(given) and declared != given:
            raise UnsupportedImageError(
                f"the compressed frame is {declared[0]} × {declared[1]} pixels, but Columns × Rows say "
                f"{given[0]} × {given[1]}"
            )
    return frame


class _Siz(NamedTuple):
    """What a JPEG 2000 codestream's SIZ marker declares."""

    columns: int
    rows: int
    precision: int  # bits of the first component
    signed: bool  # the first component's samples are signed


_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # the JP2 file's first box (ITU T.800 I.5.1)


def _j2k_siz(codestream: bytes) -> _Siz | None:
    """The SIZ marker, which follows SOC (ITU T.800 A.5.1), of a bare codestream or one in JP2 boxes; None
    for any other data (an RLE frame's bytes may hold the marker's) or a marker cut short."""
    if codestream.startswith(_SOC_SIZ):
        index = 0
    elif codestream.startswith(_JP2_SIGNATURE):
        index = codestream.find(_SOC_SIZ)
    else:
        return None
    if index < 0 or index + 43 > len(codestream):
        return None
    # SOC, SIZ, Lsiz, Rsiz, then Xsiz Ysiz XOsiz YOsiz (and 4 tile sizes, Csiz), then Ssiz of component 0
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">4I", codestream, index + 8)
    ssiz = codestream[index + 42]
    return _Siz(max(0, xsiz - xosiz), max(0, ysiz - yosiz), (ssiz & 0x7F) + 1, bool(ssiz & 0x80))


def frame_pixels(ds: pydicom.Dataset, min_side: int, photometric: str | None = None) -> npt.NDArray[Any]:
    """Stored values of the first frame; JPEG 2000 at the smallest resolution level ≥ ``min_side``, unless
    it holds padding pixels (Pixel Padding Value), which need the full resolution to be left out.

    ``photometric`` is :func:`photometric_interpretation` of ``ds`` (read here when not given)."""
    if photometric is None:
        photometric = photometric_interpretation(ds)
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedImageError("float pixel data (a parametric map, not a radiograph)")
        raise UnsupportedImageError("the object has no Pixel Data")
    frames = number_of_frames(ds)
    if frames > 1:
        LOGGER.info("multi-frame object (%d frames): classifying the first frame", frames)
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    first_frame = _check_declared_size(ds, transfer_syntax)
    if transfer_syntax in (JPEG2000, JPEG2000Lossless):
        try:
            reduced = _decode_j2k_reduced(ds, first_frame, min_side, photometric)
        except Image.DecompressionBombError as exc:  # the codestream claims > 179 Mpx (Pillow's limit)
            raise UnsupportedImageError(f"JPEG 2000 image too large: {exc}") from exc
        except (OSError, ValueError, struct.error) as exc:
            LOGGER.warning(
                "reduced JPEG 2000 decode failed (%s); decoding at full resolution", type(exc).__name__
            )
            reduced = None
        if reduced is not None:
            if _padding_mask(reduced, ds) is None:
                return reduced
            # The wavelet low-pass blends padding into the image's edge, where no mask can find it; the
            # box average of the full resolution leaves it out, as for the study sent uncompressed.
            LOGGER.debug("padding pixels: JPEG 2000 decoded at full resolution")
    index = 0 if frames > 1 else None
    try:
        if photometric.startswith("MONOCHROME") and _is_native(transfer_syntax):
            # A view of the Pixel Data, then the unused bits cleared in one pass: pydicom copies the frame
            # and shifts it left and right in place (1.5 against 0.6 ms for RG1_UNCI), to the same values.
            view = pixel_array(
                ds, index=index, photometric_interpretation=photometric, correct_unused_bits=False,
                view_only=True,
            )
            return _without_unused_bits(view, ds)
        return pixel_array(ds, index=index, photometric_interpretation=photometric)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError, struct.error) as exc:
        # struct.error: encapsulated Pixel Data cut off inside an item's tag or length
        raise UnsupportedImageError(f"pixel data cannot be decoded ({_decoder_says(exc)})") from exc
    except BaseException as exc:
        if not is_decoder_panic(exc):
            raise
        raise UnsupportedImageError(
            f"pixel data cannot be decoded (the decoder failed: {_decoder_says(exc)})"
        ) from exc


def _is_native(transfer_syntax: Any) -> bool:
    """An uncompressed transfer syntax (pydicom reads its frames straight from the Pixel Data bytes)."""
    if transfer_syntax is None:
        return False
    uid = UID(transfer_syntax)
    return uid.is_transfer_syntax and not uid.is_encapsulated


def _without_unused_bits(arr: npt.NDArray[Any], ds: pydicom.Dataset) -> npt.NDArray[Any]:
    """``arr`` (a possibly read-only view of uncompressed stored values) with the bits above Bits Stored
    cleared, or sign-extended when signed, as pydicom's ``correct_unused_bits`` does (PS3.5 8.1.1: their
    content cannot be assumed): the same shift left and right by Bits Allocated − Bits Stored, into a new
    array, or for unsigned samples the equivalent mask in one pass. ``arr`` itself when no bit is unused."""
    allocated, stored = _header_int(ds, "BitsAllocated"), _header_int(ds, "BitsStored")
    if allocated is None or stored is None or not 0 < stored < allocated:
        return arr
    if arr.dtype.kind == "u" and arr.dtype.itemsize * 8 == allocated:
        masked: npt.NDArray[Any] = np.bitwise_and(arr, arr.dtype.type((1 << stored) - 1))
        return masked
    shift = allocated - stored
    shifted: npt.NDArray[Any] = np.left_shift(arr, shift)
    np.right_shift(shifted, shift, out=shifted)
    return shifted


def is_decoder_panic(exc: BaseException) -> bool:
    """A panic of a decoder written in Rust (pylibjpeg-rle on corrupt RLE data, for one) reaches Python as
    pyo3's ``PanicException``, which derives from BaseException, not Exception: an ``except Exception``
    in a worker would let one corrupt image end the worker. pyo3 does not export the class, so it is known
    by its name."""
    return type(exc).__name__ == "PanicException"


def _decoder_says(exc: BaseException) -> str:
    """The exception's type and the first clause of its message: what the decoder found wrong (a short
    Pixel Data, a bit depth its colour conversion does not take), for the reason a sender is given. The
    decoders' messages name pixel module values and sizes, never patient data."""
    message = " ".join(str(exc).split(" - ")[0].split())  # one line: plugin reports span several
    if len(message) > 160:
        message = message[:157].rstrip() + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# ------------------------------------------------------------------------------------ grey conversion


def _box_reduce(arr: npt.NDArray[Any], min_side: int) -> FloatImage:
    """Box-average by an integer factor while the shorter side stays ≥ 2 × ``min_side``, as float32.

    A box at the bottom or right edge that the factor does not fill is the mean of the pixels it has (as
    Pillow's ``reduce`` does). The rows and then the columns of each box are added as whole strided
    slices, straight from the stored integers: no full-size float copy is made (≈ 2.5 ms on a 2000² CR,
    against ≈ 7 ms for a float32 copy and Pillow's ``reduce``). Any trailing axes (colour) are kept.
    The sums start from a copy of each box's first row and column rather than from zeros, which is the same
    to the bit (0 + x is x) and saves a pass over the row sums and their page faults (≈ 12 %).
    """
    factor = max(1, min(arr.shape[:2]) // (2 * min_side))
    if factor == 1:
        return _f32(arr)
    height, width = arr.shape[:2]
    out_height, out_width = -(-height // factor), -(-width // factor)
    rows = arr[0::factor].astype(np.float32)  # every box has its first row and column
    for offset in range(1, factor):
        part = arr[offset::factor]
        rows[: part.shape[0]] += part
    boxes = np.ascontiguousarray(rows[:, 0::factor])
    for offset in range(1, factor):
        part = rows[:, offset::factor]
        boxes[:, : part.shape[1]] += part
    row_counts = np.full(out_height, factor, dtype=np.float32)
    row_counts[-1] = height - factor * (out_height - 1)
    column_counts = np.full(out_width, factor, dtype=np.float32)
    column_counts[-1] = width - factor * (out_width - 1)
    counts = np.outer(row_counts, column_counts).reshape(out_height, out_width, *([1] * (arr.ndim - 2)))
    boxes /= counts
    return boxes


def reduced_gray(gray: FloatImage, min_side: int) -> FloatImage:
    """A grey image reduced as an uncompressed DICOM image is before its LUTs (:func:`_box_reduce`): by a
    whole factor while the shorter side stays ≥ 2 × ``min_side``. The same size for a picture as for the
    same study in DICOM, where a size matters (a degradation's strength)."""
    return _box_reduce(gray, min_side)


def _window(values: FloatImage, center: float, width: float, function: str) -> FloatImage:
    """PS3.3 C.11.2.1.2 windowing to [0, 1]; in float64 for a width or center past float32's range (a legal
    decimal string, "1e39"), which overflowed to inf / inf and made the whole image NaN (review). Others
    stay in float32, the arithmetic every earlier model input was made with."""
    if max(abs(center), abs(width)) > _FLOAT32_SAFE:
        values = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        exponent = np.clip(-4.0 * (values - center) / max(width, 1e-6), -80.0, 80.0)  # no float overflow
        return _f32(1.0 / (1.0 + np.exp(exponent)))
    if function == "LINEAR_EXACT":
        low, span = center - width / 2.0, max(width, 1e-6)
    else:  # LINEAR (the default)
        low, span = center - 0.5 - (width - 1.0) / 2.0, max(width - 1.0, 1e-6)
    return _f32(np.clip((values - low) / span, 0.0, 1.0))


_FLOAT32_SAFE = 1e30  # a window term beyond this may overflow float32 (3.4e38) once combined


def _first_number(ds: pydicom.Dataset, keyword: str) -> float | None:
    """The first value of a numeric attribute; ``None`` when it is absent, empty, not a number or not finite
    (real objects carry empty Window Center elements and unparsable decimal strings)."""
    try:
        value = ds.get(keyword)
        if isinstance(value, pydicom.multival.MultiValue | list | tuple):
            value = value[0] if len(value) else None
        number = None if value is None or value == "" else float(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _percentile_window(values: FloatImage, padded: npt.NDArray[np.bool_] | None = None) -> FloatImage:
    low, high = np.percentile(values if padded is None else values[~padded], PERCENTILE_WINDOW)
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return _f32(np.clip((values - low) / (high - low), 0.0, 1.0))


def _modality(stored: FloatImage, ds: pydicom.Dataset) -> FloatImage:
    """Stored values → modality values: the Modality LUT Sequence when present, else Rescale Slope and
    Intercept (PS3.3 C.11.1). A LUT is indexed by stored values, so box-averaged values are rounded first.
    Absent or empty rescale values mean identity; unusable ones (text, NaN, a zero slope) are logged and
    treated as identity too: histogram equalisation later makes the model input independent of any
    monotonic rescale, so only the window placement can suffer, and that falls back to percentiles."""
    if ds.get("ModalityLUTSequence"):
        table, first = _lut_table(
            "Modality LUT", ds, ds.ModalityLUTSequence[0], _header_int(ds, "PixelRepresentation") == 1
        )
        # Stored values below the first mapped one take the first entry, above the last the last.
        return _f32(table[np.clip(np.round(stored).astype(np.int64) - first, 0, len(table) - 1)])
    slope, intercept = _first_number(ds, "RescaleSlope"), _first_number(ds, "RescaleIntercept")
    unusable = (slope is None and _has_value(ds, "RescaleSlope")) or (
        intercept is None and _has_value(ds, "RescaleIntercept")
    )
    if unusable or slope == 0.0:
        LOGGER.warning("unusable Rescale Slope/Intercept; using the stored values as they are")
        return stored
    if slope in (None, 1.0) and intercept in (None, 0.0):
        # Identity, as most CR and DX objects say: x · 1 + 0 is x for the finite box means (never -0.0),
        # so the same values without two passes and a finiteness check over the image.
        return stored
    with np.errstate(over="ignore"):
        rescaled = _f32(stored * (1.0 if slope is None else slope)
                        + (0.0 if intercept is None else intercept))
    if not np.isfinite(rescaled).all():  # past float32's range (a slope of 1e36): as unusable
        LOGGER.warning("Rescale Slope/Intercept out of range; using the stored values as they are")
        return stored
    return rescaled


def _has_value(ds: pydicom.Dataset, keyword: str) -> bool:
    """The attribute is there and not empty (whether or not its value can be read)."""
    try:
        return keyword in ds and not ds[keyword].is_empty
    except (ValueError, TypeError):
        return True


def _voi(values: FloatImage, ds: pydicom.Dataset, padded: npt.NDArray[np.bool_] | None = None) -> FloatImage:
    """The first VOI LUT, else the first window, else the percentile window (of the pixels not
    ``padded``). A LUT's output range is 0 to 2^n - 1 (PS3.3 C.11.2.1.1), n read off its entries."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        table, first = _lut_table("VOI LUT", ds, sequence[0], _modality_output_signed(ds))
        # Indices are integers; inputs below the first mapped value take the first entry, above the
        # last the last (PS3.3 C.11.2.1.1). White is the top of the table's output range.
        index = np.clip(np.round(values).astype(np.int64) - first, 0, len(table) - 1)
        return _f32(np.clip(table[index] / _lut_output_top(table), 0.0, 1.0))
    center, width = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
    function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
    # LINEAR's width is at least 1 (PS3.3 C.11.2.1.2.1); LINEAR_EXACT's and SIGMOID's only above 0. A
    # LINEAR width of 0.8 gave a picture of two grey levels, where DCMTK refuses the window (review).
    exact = function in ("LINEAR_EXACT", "SIGMOID")
    if center is not None and width is not None and (width > 0 if exact else width >= 1):
        return _window(values, center, width, function)
    if "WindowCenter" in ds or "WindowWidth" in ds:
        LOGGER.info("window center/width empty or unusable; using the percentile window")
    return _percentile_window(values, padded)


@contextmanager
def _lookup_table(name: str) -> Iterator[None]:
    """A malformed lookup table (pydicom raises ValueError, KeyError, NotImplementedError, ... from its LUT
    functions) is an image the node cannot read: one refusal with a reason, not an unexpected failure."""
    try:
        yield
    except (
        ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, struct.error
    ) as exc:
        raise UnsupportedImageError(f"unusable {name}: {_lut_fault(exc)}") from exc


def _lut_fault(exc: BaseException) -> str:
    """What was wrong with a lookup table, from pydicom's exception: the attribute or the value at fault
    (the table's content, never the patient's)."""
    if isinstance(exc, struct.error):
        return "LUT Data shorter than its LUT Descriptor says"
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], int):  # pydicom's missing tag
        tag = pydicom.tag.Tag(exc.args[0])
        return f"{pydicom.datadict.keyword_for_tag(tag) or 'an attribute'} {tag} is missing"
    return f"{type(exc).__name__}: {str(exc)[:120]}" if str(exc) else type(exc).__name__


def _lut_table(
    name: str, ds: pydicom.Dataset, item: pydicom.Dataset, signed_input: bool
) -> tuple[npt.NDArray[np.float64], int]:
    """A Modality or VOI LUT ``item`` of ``ds`` (``name``) as its whole table and the first input value it
    maps; a malformed one is an :class:`UnsupportedImageError` that names it.

    The descriptor is read as PS3.3 C.11.1.1.1 and C.11.2.1.1 define it, whatever VR the writer (or
    pydicom, reading an implicit VR file) gave it: the entry count is unsigned (0 means 65536; read as SS,
    a count past 32767 comes out negative), the first mapped value is signed when the LUT's input can be
    negative (``signed_input``) and unsigned otherwise. The table is read through pydicom (one lookup of
    every input value), not from LUT Data itself: LUT Data encoded as OW (always so in implicit VR files)
    comes back as raw bytes, which pydicom unpacks in the object's byte order. pydicom indexes a table of
    8-bit entries with uint8, so inputs past 255 would wrap round; it reads the entries alike for 8 and 16
    bits, so a copy that declares 16 bits gives the same table unwrapped."""
    with _lookup_table(name):
        count, first, bits = (int(value) for value in item.LUTDescriptor[:3])
        if bits != 8 and not 10 <= bits <= 16:  # PS3.3 C.8.11.3.1.5; 16-bit words hold 10 to 16
            raise UnsupportedImageError(f"unusable {name}: entries of {bits} bits (8 or 10 to 16 allowed)")
        count, first = count & 0xFFFF, first & 0xFFFF
        if first >= 0x8000 and signed_input:
            first -= 0x10000
        entries = count or 65536
        packed = _packed_8bit_lut(item, entries, _little_endian(ds))
        if packed is not None:
            return packed, first
        view = _voi_lut_view(ds, item, [count, first, 16])
        table = apply_voi(np.arange(first, first + entries, dtype=np.int64), view, index=0)
        return np.asarray(table, dtype=np.float64), first


def _packed_8bit_lut(
    item: pydicom.Dataset, entries: int, little_endian: bool
) -> npt.NDArray[np.float64] | None:
    """The table of a LUT of 8-bit entries stored two to a word, as PS3.3 C.11.1.1.1 and C.11.2.1.1 have
    it ("a format equivalent to 8 bits allocated"): OW LUT Data of one byte per entry (and a pad byte for
    an odd count). A big-endian object stores OW as byte-swapped words, so each pair of entries is swapped
    back (DCMTK's dcm2pnm shows both byte orders alike). LUT Data of VR US holds the same words as numbers,
    the first entry of each pair in the low byte. None for any other LUT, which pydicom reads; it reads
    this one as 16-bit words and fails on the short data."""
    data = item.get("LUTData")
    if int(item.LUTDescriptor[2]) != 8:
        return None
    if isinstance(data, pydicom.multival.MultiValue | list) and len(data) == (entries + 1) // 2 > 1:
        data, little_endian = np.asarray(data, dtype="<u2").tobytes(), True  # words as numbers: no swap
    if not isinstance(data, bytes) or len(data) not in (entries, entries + 1):
        return None
    if not little_endian:
        even = len(data) // 2 * 2  # an odd count without its pad byte leaves its last entry unpaired
        data = np.frombuffer(data, dtype=np.uint8, count=even).reshape(-1, 2)[:, ::-1].tobytes() + data[even:]
    return np.frombuffer(data, dtype=np.uint8, count=entries).astype(np.float64)


def _modality_output_signed(ds: pydicom.Dataset) -> bool:
    """Whether the modality output, a VOI LUT's input, can be negative (PS3.3 C.11.2.1.1): never after a
    Modality LUT; after a rescale when it maps the stored range below zero; else when the pixels are
    signed."""
    if ds.get("ModalityLUTSequence"):
        return False
    bits = _header_int(ds, "BitsStored") or _header_int(ds, "BitsAllocated") or 16
    signed = _header_int(ds, "PixelRepresentation") == 1
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    slope, intercept = _first_number(ds, "RescaleSlope"), _first_number(ds, "RescaleIntercept")
    slope = 1.0 if not slope else slope  # absent, or unusable zero: identity, as _modality reads it
    intercept = intercept or 0.0
    return min(low * slope, high * slope) + intercept < 0


def _lut_output_top(table: npt.NDArray[np.float64]) -> float:
    """2^n - 1 for the smallest n ≥ 8 that holds the table's largest entry: the white of its output range.
    LUTs of 12-bit entries are commonly declared 16 bits wide, so n is read off the entries, not taken
    from the descriptor. DCMTK 3.6.7 takes the descriptor and shows such a LUT as a nearly blank picture
    (review); the entries give the picture the LUT's writer meant."""
    return float((1 << max(8, int(table.max()).bit_length())) - 1)


def _voi_lut_view(ds: pydicom.Dataset, item: pydicom.Dataset, descriptor: list[int]) -> pydicom.Dataset:
    """A new dataset holding only what :func:`apply_voi` reads: one VOI LUT item with ``descriptor`` and
    ``item``'s LUT Data, and ``ds``'s byte order for OW data. ``ds`` and ``item`` stay as they are
    (``copy.copy`` of a pydicom dataset shares its elements, so a copy cannot be changed safely)."""
    wide = pydicom.Dataset()
    wide.LUTDescriptor = descriptor
    wide.add(copy.deepcopy(item["LUTData"]))
    view = pydicom.Dataset()
    view.VOILUTSequence = [wide]
    if hasattr(ds, "file_meta"):
        view.file_meta = copy.deepcopy(ds.file_meta)
    view.set_original_encoding(*ds.original_encoding)
    return view


def _check_palette(ds: pydicom.Dataset) -> None:
    """Refuse a palette pydicom would misread: it indexes a table of 8-bit entries with uint8, so a
    palette of more than 256 such entries would map index 256 to entry 0."""
    entries, _, bits = (int(value) for value in ds.RedPaletteColorLookupTableDescriptor[:3])
    data = ds.get("RedPaletteColorLookupTableData")
    one_byte = isinstance(data, bytes) and len(data) == (entries or 65536)
    if (entries or 65536) > 256 and (one_byte or (data is None and bits == 8)):
        raise UnsupportedImageError("unusable Palette Color LUT: more than 256 entries of 8 bits")


# Bounds on a segmented palette's expansion (PS3.3 C.7.9.2): a table holds at most 65536 entries, and a
# real one has a few segments, rarely an indirect one
_MAX_PALETTE_ENTRIES = 65536
_MAX_INDIRECT_DEPTH = 8
_MAX_SEGMENTS_READ = 65536


def _check_segmented_palette(ds: pydicom.Dataset) -> None:
    """Refuse a segmented palette whose expansion pydicom would not finish. It expands indirect segments
    by recursion, without bound: one that refers to itself recursed to Python's limit (a RecursionError
    escaped), and a table of 240 bytes whose indirect segments each copy all those before them doubled
    with each one, to gigabytes over minutes (review). The expansion is counted here, not made, as
    pydicom reads the segments: at most 65536 entries, indirect segments nested 8 deep and 65536
    segments read."""
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    for colour in ("Red", "Green", "Blue", "Alpha"):
        data = ds.get(f"Segmented{colour}PaletteColorLookupTableData")
        if not isinstance(data, bytes) or not data:
            continue
        little = _little_endian(ds)
        if bits == 8:
            words = np.frombuffer(data, dtype=np.uint8).tolist()
        else:
            words = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little else ">u2").tolist()
        # pydicom reads an 8-bit indirect segment's four offset bytes in the object's byte order
        order = None if bits != 8 else ((3, 2, 1, 0) if little else (2, 3, 0, 1))
        _count_segments(words, 0, None, 0, [_MAX_SEGMENTS_READ], order)


def _count_segments(
    data: list[int], start: int, segments: int | None, depth: int, budget: list[int],
    eight_bit: tuple[int, int, int, int] | None,
) -> int:
    """The entries ``segments`` segments from word ``start`` expand to (all when None), following
    indirect segments as pydicom's ``_expand_segmented_lut`` does. What pydicom refuses itself (an
    unknown opcode, data cut short) ends the count: its expansion then says what is wrong."""
    if depth > _MAX_INDIRECT_DEPTH:
        raise UnsupportedImageError(
            f"unusable Palette Color LUT: indirect segments nested more than {_MAX_INDIRECT_DEPTH} deep"
        )
    entries, offset, read = 0, start, 0
    while offset + 1 < len(data):
        opcode, length = data[offset], data[offset + 1]
        offset += 2
        budget[0] -= 1
        if budget[0] < 0:
            raise UnsupportedImageError(
                f"unusable Palette Color LUT: more than {_MAX_SEGMENTS_READ} segments to read"
            )
        if opcode == 0:
            entries, offset = entries + length, offset + length
        elif opcode == 1:
            entries, offset = entries + length, offset + 1
        elif opcode == 2 and offset + (3 if eight_bit else 1) < len(data):
            if eight_bit:  # the offset in four 8-bit words
                b = [data[offset + index] for index in eight_bit]
                target, offset = (b[0] << 8 | b[1]) << 16 | (b[2] << 8 | b[3]), offset + 4
            else:
                target, offset = data[offset + 1] << 16 | data[offset], offset + 2
            # pydicom expands from data[offset:] of the table it is expanding, itself a slice at `start`
            entries += _count_segments(data, start + target, length, depth + 1, budget, eight_bit)
        else:
            return entries
        if entries > _MAX_PALETTE_ENTRIES:
            raise UnsupportedImageError(
                f"unusable Palette Color LUT: its segments expand past {_MAX_PALETTE_ENTRIES} entries"
            )
        read += 1
        if read == segments:
            break
    return entries


def _within_palette(raw: npt.NDArray[Any], ds: pydicom.Dataset) -> npt.NDArray[np.int64]:
    """Stored values clipped to the palette's range: below the first mapped value is the first entry, past
    the last entry is the last entry (PS3.3 C.7.6.3.1.5). pydicom clips too, but only after subtracting the
    first mapped value in the table's own type, which for 8-bit entries is uint8: 256 became entry 0."""
    entries, first = (int(value) for value in ds.RedPaletteColorLookupTableDescriptor[:2])
    return np.clip(raw.astype(np.int64), first, first + (entries or 65536) - 1)


_PALETTE_ELEMENTS = (  # what apply_color_lut reads of a dataset with a (non-segmented) palette
    "PixelPresentation",
    *(f"{colour}PaletteColorLookupTableDescriptor" for colour in ("Red", "Green", "Blue")),
    *(f"{colour}PaletteColorLookupTableData" for colour in ("Red", "Green", "Blue", "Alpha")),
)


def _palette_view(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds``, or for a big-endian object a new dataset holding what :func:`apply_color_lut` reads, with its
    palette data in little-endian order. Palette Color LUT Data is OW, which a big-endian object stores as
    byte-swapped 16-bit words (two 8-bit entries or one 16-bit entry each); pydicom (3.0) reads it in the
    machine's order whatever the transfer syntax, which garbles every colour of a big-endian palette image
    (DCMTK reads it as its little-endian copy). Segmented palettes pydicom reads right."""
    if _little_endian(ds) or "RedPaletteColorLookupTableData" not in ds:
        return ds
    view = pydicom.Dataset()
    for keyword in _PALETTE_ELEMENTS:
        if keyword not in ds:
            continue
        element = copy.deepcopy(ds[keyword])
        if isinstance(element.value, bytes) and len(element.value) % 2 == 0:
            element.value = np.frombuffer(element.value, dtype=">u2").astype("<u2").tobytes()
        view.add(element)
    return view


def _little_endian(ds: pydicom.Dataset) -> bool:
    """The byte order the object's values were stored in: its transfer syntax, else how it was read."""
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if transfer_syntax is not None and UID(transfer_syntax).is_transfer_syntax:
        return bool(UID(transfer_syntax).is_little_endian)
    return ds.original_encoding[1] is not False


def _palette_top(ds: pydicom.Dataset, rgb: npt.NDArray[Any]) -> float:
    """White for palette entries: the descriptor's bits per entry (8 or 16), not the image's content.

    Entries stored one byte each come back as uint8. Some writers store 8-bit entries in 16-bit words;
    the descriptor still says 8 then, and white is 255 either way."""
    if rgb.dtype == np.uint8 or int(ds.RedPaletteColorLookupTableDescriptor[2]) == 8:
        return 255.0
    return 65535.0


_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")
_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", *_COLOUR)


def photometric_interpretation(ds: pydicom.Dataset) -> str:
    """The Photometric Interpretation as the preprocessing reads it, checked before any decoding.

    Absent means MONOCHROME2 (a grey image, the common case); padding and case are set aside, since some
    software writes ``monochrome2`` although a code string is upper case. Anything else is refused with
    its value. The dataset is not changed: the decoder is handed the value read here."""
    given = ds.get("PhotometricInterpretation")
    value = "MONOCHROME2" if given is None else str(given).strip().upper()
    if value not in _PHOTOMETRIC:
        raise UnsupportedImageError(f"unsupported photometric interpretation {value!r}")
    if given is None or str(given) != value:
        LOGGER.warning(
            "Photometric Interpretation %r read as %s", None if given is None else str(given), value
        )
    return value


def dataset_to_gray(
    ds: pydicom.Dataset, min_side: int = 256, *, j2k_min_side: int | None = None
) -> FloatImage:
    """Displayable grey image in [0, 1] (white bone), at least ``min_side`` px on its shorter side when the
    source is that large.

    Large images are box-averaged down to between 2 and 4 × ``min_side``, and JPEG 2000 is decoded at
    the resolution level that keeps ``j2k_min_side`` (default: the same 2 × ``min_side``), so a study
    gives the same model input whether it was sent compressed or not.

    A header element pydicom cannot parse (a damaged value read on first access) is an
    :class:`UnsupportedImageError`, as a malformed one is."""
    try:
        return _dataset_to_gray(ds, min_side, j2k_min_side)
    except _DAMAGED_ELEMENT as exc:
        raise UnsupportedImageError(f"a header element cannot be read ({type(exc).__name__})") from exc


def _dataset_to_gray(ds: pydicom.Dataset, min_side: int, j2k_min_side: int | None) -> FloatImage:
    photometric = photometric_interpretation(ds)
    raw = frame_pixels(ds, 2 * min_side if j2k_min_side is None else j2k_min_side, photometric)
    if photometric == "PALETTE COLOR":
        with _lookup_table("Palette Color LUT"):
            _check_palette(ds)
            _check_segmented_palette(ds)
            rgb = apply_color_lut(_within_palette(raw, ds), _palette_view(ds))[..., :3]  # alpha is not grey
        gray = (_box_reduce(rgb, min_side) @ _LUMA) / _palette_top(ds, rgb)
        return _f32(np.clip(gray, 0.0, 1.0))
    if photometric in _COLOUR:
        if raw.ndim != 3 or raw.shape[-1] != 3:
            raise UnsupportedImageError(f"colour image with unexpected shape {raw.shape}")
        bits = _header_int(ds, "BitsStored") or 8
        gray = (_box_reduce(raw, min_side) @ _LUMA) / float((1 << bits) - 1)
        return _f32(np.clip(gray, 0.0, 1.0))
    if raw.ndim != 2:
        raise UnsupportedImageError(f"grey image with unexpected shape {raw.shape}")
    padding = _padding_mask(raw, ds)
    if padding is None:
        stored, padded = _box_reduce(raw, min_side), None
    else:  # each box is the mean of its image pixels; a box of mostly padding is padding
        kept = _box_reduce(~padding, min_side)
        padded = kept < 0.5
        if padded.all():
            raise UnsupportedImageError("every pixel is padding (Pixel Padding Value)")
        stored = _f32(_box_reduce(np.where(padding, 0, raw), min_side) / np.maximum(kept, 1e-6))
        stored[padded] = np.median(stored[~padded])  # a value any LUT can look up; blacked out below
    header = first_frame_header(ds)
    gray = _voi(_modality(stored, header), header, padded)
    if _inverted(ds, photometric):
        gray = 1.0 - gray
    if padded is not None:
        gray[padded] = 0.0
    return gray


# Functional group macros that take the place of top-level attributes in an enhanced multi-frame
# object (PS3.3 C.7.6.16.2.9, C.7.6.16.2.10): the sequence, and the top-level attributes it replaces.
_FRAME_MACROS = (
    ("PixelValueTransformationSequence",
     ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence")),
    ("FrameVOILUTSequence",
     ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation", "VOILUTSequence")),
)


def first_frame_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The attributes that turn the first frame's stored values into a picture. An enhanced multi-frame
    object (Enhanced DX, CR, XA…) gives its rescale and window in the Shared and Per-Frame Functional Groups
    instead of at the top level, the first frame's own group taking precedence over the shared one.
    A new dataset without the pixel data when a group says any of it (``ds`` stays as it is), else ``ds``."""
    groups = [
        sequence[0]
        for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
        if (sequence := ds.get(keyword))
    ]
    macros = [(group[keyword][0], replaced) for group in groups for keyword, replaced in _FRAME_MACROS
              if group.get(keyword)]
    if not macros:
        return ds
    header = pydicom.Dataset()
    for element in ds:
        if element.keyword not in _LEFT_OUT_OF_HEADER:
            header.add(element)
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    header.set_original_encoding(*ds.original_encoding)
    for item, replaced in macros:  # shared first, then the frame's own
        for keyword in replaced:
            if keyword in header:
                delattr(header, keyword)
        for element in item:
            header.add(element)
    return header


# The pixels, and the functional groups once read (a per-frame group per frame: thousands of items).
_LEFT_OUT_OF_HEADER = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData",
                                  "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"})


def _padding_mask(raw: npt.NDArray[Any], ds: pydicom.Dataset) -> npt.NDArray[np.bool_] | None:
    """Padding pixels (PS3.3 C.7.5.1.1.2), which are not part of the image: stored values equal to Pixel
    Padding Value or, with Pixel Padding Range Limit, between the two. ``None`` when there are none.

    They stay out of the percentile window and are shown black, as viewers leave them out of their
    automatic window and do not show them as anatomy. For signed pixels a value written as US (the VR of
    unsigned ones) is read as the 16-bit pattern it is: 63536 is -2000."""
    value = _first_number(ds, "PixelPaddingValue")
    if value is None:
        return None
    limit = _first_number(ds, "PixelPaddingRangeLimit")
    if _header_int(ds, "PixelRepresentation") == 1:
        value, limit = _as_signed_16(value), None if limit is None else _as_signed_16(limit)
    low, high = (value, value) if limit is None else sorted((value, limit))
    mask = (raw >= low) & (raw <= high)
    return mask if bool(mask.any()) else None


def _as_signed_16(number: float) -> float:
    return number - 65536 if 32768 <= number <= 65535 else number


# Where the patient's feet point on screen, by the first (dominant) letter of a Patient Orientation
# value, → counter-clockwise quarter turns (numpy.rot90) that bring them to the bottom.
_FEET_DOWN_TURNS = {("column", "F"): 0, ("column", "H"): 2, ("row", "F"): 3, ("row", "H"): 1}


def upright_turns(ds: pydicom.Dataset) -> int:
    """Counter-clockwise quarter turns that show the patient head up (see :func:`orientation_turns`)."""
    turns = orientation_turns(ds)
    return 0 if turns is None else turns


def orientation_turns(ds: pydicom.Dataset) -> int | None:
    """Counter-clockwise quarter turns that show the patient head up, read from Patient Orientation.

    Its first value is the patient direction of the rows (screen right), its second that of the columns
    (screen down), PS3.3 C.7.6.1.1.1; an upright frontal chest is ``L\\F`` or ``R\\F``. A rotated image
    (``F\\L``, ``H\\R``…) or one stored upside down (``L\\H``) is turned so the feet point down; left and
    right are left as they are (the models are trained with mirrored images). ``None`` when the header
    does not say: no value, a malformed one, or one without head or foot direction (an axial image).
    """
    try:
        value = ds.get("PatientOrientation")
    except (ValueError, TypeError, *_DAMAGED_ELEMENT):
        return None  # damaged: read as not said; the image itself is refused if it cannot be read
    if value is None or isinstance(value, (str, bytes)) or len(value) != 2:
        return None
    row_letter, column_letter = (str(part).strip().upper()[:1] for part in value)
    for axis, letter in (("column", column_letter), ("row", row_letter)):
        if letter in ("F", "H"):
            return _FEET_DOWN_TURNS[(axis, letter)]
    return None


def upright(gray: FloatImage, turns: int) -> FloatImage:
    """``gray`` turned by :func:`upright_turns` (``-turns`` turns a heat map back onto the stored pixels)."""
    return gray if turns % 4 == 0 else np.ascontiguousarray(np.rot90(gray, turns))


def dataset_to_upright_gray(ds: pydicom.Dataset, min_side: int = 256) -> FloatImage:
    """:func:`dataset_to_gray`, head up (:func:`upright_turns`): what the models are trained on and read."""
    return upright(dataset_to_gray(ds, min_side), upright_turns(ds))


def _inverted(ds: pydicom.Dataset, photometric: str) -> bool:
    """Whether the minimum value is displayed white: MONOCHROME1, or a Presentation LUT Shape of INVERSE.

    The DX Image module (PS3.3 C.8.11) pairs MONOCHROME1 with INVERSE: both name the same single
    inversion, never two. INVERSE on a MONOCHROME2 image is outside that rule but says how the image is
    meant to be seen; DCMTK's dcm2pnm shows it inverted, and so does this. IDENTITY on a MONOCHROME1 image
    contradicts the photometric interpretation. DCMTK follows the shape there and shows a negative; here the
    photometric interpretation wins, because objects with wrong shape values are known (dcm4chee-arc can
    ignore the shape for that reason) and a negative chest is the worse error for the model."""
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME2" and shape == "INVERSE":
        LOGGER.info("MONOCHROME2 with Presentation LUT Shape INVERSE: displayed inverted")
        return True
    return photometric == "MONOCHROME1"


def pil_to_gray(image: Image.Image) -> FloatImage:
    """Grey image in [0, 1] from any PIL mode (8/16-bit grey, RGB, palette, with alpha).

    Unsigned integers are scaled by the bits they use (:func:`_significant_top`). Signed integers and
    floating-point values (TIFF) have no black or white of their own: they take the percentile window a
    DICOM image without a window takes, so one hot pixel cannot turn the rest black. A TIFF whose
    PhotometricInterpretation is WhiteIsZero (as MONOCHROME1) is inverted; Pillow inverts it only at
    8 bits or fewer."""
    inverted = _white_is_zero(image)  # read first: a turned copy has no TIFF tags
    image = _exif_upright(image)
    if image.mode in _HIGH_BIT_MODES:
        gray = _high_bit_gray(image)
        if inverted:
            np.subtract(np.float32(1.0), gray, out=gray)
        return gray
    # one float32 copy, scaled in place (a quotient and its float32 copy took 0.5 GB more at 8000²)
    gray = np.asarray(_eight_bit_gray(image), dtype=np.float32)
    gray /= np.float32(255.0)
    return gray


_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I", "F"})
_TURNING_ORIENTATIONS = frozenset(range(2, 9))  # EXIF Orientation values that turn or mirror the picture


def _exif_upright(image: Image.Image) -> Image.Image:
    """The picture turned by its EXIF Orientation, as ``ImageOps.exif_transpose``; the picture itself, not
    the copy that makes of it, when there is nothing to turn (the picture is only read)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in _TURNING_ORIENTATIONS:
        return ImageOps.exif_transpose(image) or image
    return image


def _eight_bit_gray(image: Image.Image) -> Image.Image:
    """An upright picture of 8 bits or fewer a sample (grey, colour, palette, with alpha) as Pillow's grey
    ("L", ITU-R BT.601), straight from RGB without the copy that converting it to RGB first makes."""
    if image.mode == "L":
        return image
    if image.mode == "RGB":
        return image.convert("L")
    return image.convert("RGB").convert("L")


def _high_bit_gray(image: Image.Image) -> FloatImage:
    arr = np.asarray(image)
    if image.mode == "F":
        finite = np.isfinite(arr)
        if not finite.any():
            raise UnsupportedImageError("a floating-point picture without one finite value")
        gray = arr.astype(np.float32)
        low, high = np.percentile(gray[finite], PERCENTILE_WINDOW)
        gray[np.isnan(gray)] = low  # NaN shown black, ±inf at the ends
        return _scaled_into_unit(gray, float(low), float(high))
    if arr.size and int(arr.min()) < 0:  # signed samples (TIFF SampleFormat 2)
        gray = arr.astype(np.float32)
        low, high = np.percentile(gray, PERCENTILE_WINDOW)
        return _scaled_into_unit(gray, float(low), float(high))
    # the integers as they are until the one float32 copy, scaled in place: float64 copies of an 8000²
    # picture and of its percentile took 1.5 GB for a 1.4 MB upload (review)
    gray = arr.astype(np.float32)
    gray /= np.float32(_significant_top(arr))
    return np.clip(gray, 0.0, 1.0, out=gray)


def _scaled_into_unit(gray: FloatImage, low: float, high: float) -> FloatImage:
    """``gray`` (a float32 copy) windowed from ``low`` to ``high`` in place; all black when they meet."""
    if not high > low:
        return np.zeros_like(gray)
    gray -= np.float32(low)
    gray /= np.float32(high - low)
    return np.clip(gray, 0.0, 1.0, out=gray)


def _white_is_zero(image: Image.Image) -> bool:
    """A TIFF whose PhotometricInterpretation (tag 262) is 0, WhiteIsZero: the lowest value is white."""
    tags = getattr(image, "tag_v2", None)
    return tags is not None and tags.get(262) == 0


def _significant_top(values: npt.NDArray[Any]) -> float:
    """White of an integer picture: the largest value of the fewest bits (8 to 32) that hold 99 % of its
    values.

    PNG and TIFF keep 10-, 12- and 14-bit radiographs in 16-bit samples (as some public collections
    publish theirs). Read as 16 bits such a picture is nearly black: its rows vary by less than the
    border crop's limit, which then cut a quarter from every side, and the shipped model called 158 of
    the 176 validation images, made 12-bit, COVID-19. Scaled by the bits its values use, it reads as the
    same picture at any bit depth; a picture that uses all 16 bits is read as before. The last 1 % is
    left out because a label burnt in at full scale (65535 in a 12-bit picture) would otherwise set the
    bits: it is shown white."""
    top = float(np.percentile(values, 99.0)) if values.size else 0.0
    bits = max(8, math.ceil(math.log2(top + 1.0))) if top > 0 else 8
    return float((1 << min(bits, 32)) - 1)


# ------------------------------------------------------------------------------------- model input


def uniform_border_box(gray: FloatImage) -> Box:
    """The image without near-constant bars at its edges (padding, scanner frames), at most a quarter
    per side."""
    height, width = gray.shape
    row_std = gray.std(axis=1)
    col_std = gray.std(axis=0)

    def span(std: npt.NDArray[np.float32], size: int) -> tuple[int, int]:
        limit = int(size * _BORDER_MAX_FRACTION)
        start = 0
        while start < limit and std[start] < _BORDER_STD:
            start += 1
        end = size
        while size - end < limit and std[end - 1] < _BORDER_STD:
            end -= 1
        return start, end

    top, bottom = span(row_std, height)
    left, right = span(col_std, width)
    return Box(top / height, bottom / height, left / width, right / width)


def equalise(gray: FloatImage) -> FloatImage:
    """Histogram equalisation to [0, 1]: every source's grey distribution becomes uniform."""
    levels = np.clip((gray * (EQUALISATION_LEVELS - 1)).round(), 0, EQUALISATION_LEVELS - 1).astype(np.int64)
    hist = np.bincount(levels.ravel(), minlength=EQUALISATION_LEVELS)
    cdf = np.cumsum(hist).astype(np.float64)
    first = cdf[hist > 0][0] if np.any(hist > 0) else 0.0
    denominator = cdf[-1] - first
    if denominator <= 0:
        return np.zeros_like(gray, dtype=np.float32)
    table = np.clip((cdf - first) / denominator, 0.0, 1.0).astype(np.float32)
    return _f32(table[levels])


def resize_gray(gray: FloatImage, size: tuple[int, int]) -> FloatImage:
    """Bilinear (antialiased) resize of a float image to (height, width)."""
    height, width = size
    if gray.shape == (height, width):
        return gray.astype(np.float32, copy=False)
    image = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def frame_box(gray: FloatImage, spec: PreprocessSpec, lungs: LungFinder | None = None) -> Box:
    """The part of ``gray`` the model sees, in fractions of ``gray``: the lung box when the spec crops
    to the lungs and they are found, otherwise padding bars and the centre crop as the spec says."""
    if gray.ndim != 2 or gray.size == 0:
        raise UnsupportedImageError(f"expected a non-empty grey image, got shape {gray.shape}")
    if spec.lung_crop:
        if lungs is None:
            raise ModelArtifactError("this model crops to the lung fields, but no lung model was given")
        found = lungs.box(gray)
        if found is not None:
            return found
    box = uniform_border_box(gray) if spec.crop_borders else Box()
    if spec.centre_crop < 1.0:
        margin = (1 - spec.centre_crop) / 2
        box = Box(margin, 1 - margin, margin, 1 - margin).within(box)
    return box


def fit_gray(gray: FloatImage, spec: PreprocessSpec, lungs: LungFinder | None = None) -> FloatImage:
    """Geometric half of the preprocessing: crop to :func:`frame_box` and resize to the input."""
    return resize_gray(frame_box(gray, spec, lungs).apply(gray), spec.input_size)


def finish_gray(gray: FloatImage, spec: PreprocessSpec) -> FloatImage:
    """Intensity half: equalise (if the spec says so), replicate to 3 channels, normalise.

    classifier.augmentation mirrors this in TensorFlow for training batches.
    """
    if spec.equalisation == "histeq":
        gray = equalise(gray)
    rgb = np.repeat(np.clip(gray, 0.0, 1.0)[:, :, None], 3, axis=2).astype(np.float32, copy=False)
    if spec.normalisation == "resnet":
        return (rgb[:, :, ::-1] * 255.0 - IMAGENET_BGR_MEAN).astype(np.float32)
    if spec.normalisation != "unit":
        scale, offset = normalisation_change("unit", spec.normalisation)
        return (rgb * scale + offset).astype(np.float32)
    return rgb


def framed_model_input(
    gray: FloatImage, spec: PreprocessSpec, lungs: LungFinder | None = None
) -> tuple[FloatImage, Box]:
    """Grey [0, 1] → float32 H×W×3 exactly as the model was trained, and the :func:`frame_box` it shows."""
    frame = frame_box(gray, spec, lungs)
    return finish_gray(resize_gray(frame.apply(gray), spec.input_size), spec), frame


def gray_to_model_input(gray: FloatImage, spec: PreprocessSpec, lungs: LungFinder | None = None) -> FloatImage:
    """Grey [0, 1] → float32 H×W×3 exactly as the model was trained."""
    return framed_model_input(gray, spec, lungs)[0]


def dataset_to_model_input(
    ds: pydicom.Dataset, spec: PreprocessSpec, lungs: LungFinder | None = None
) -> FloatImage:
    """A DICOM image → float32 H×W×3 model input (see the module docstring for the steps)."""
    return gray_to_model_input(dataset_to_upright_gray(ds, min_side=max(spec.input_size)), spec, lungs)


def image_to_model_input(image: Image.Image, spec: PreprocessSpec, lungs: LungFinder | None = None) -> FloatImage:
    """A PNG/JPEG (PIL) image → float32 H×W×3 model input, through the same steps as DICOM."""
    return gray_to_model_input(pil_to_gray(image), spec, lungs)


def display_image(ds: pydicom.Dataset, max_size: int = 1024) -> npt.NDArray[np.uint8]:
    """uint8 H×W, windowed, white bone, longer side ``max_size`` (or the image's own when smaller) — what
    reports, the heat-map Secondary Capture and the console show, the same size whichever transfer syntax
    the image came in."""
    stored = _stored_size(ds)
    gray = dataset_to_gray(ds, min_side=max_size // 2, j2k_min_side=_preview_j2k_side(stored, max_size))
    height, width = stored or gray.shape
    scale = min(1.0, max_size / max(height, width))
    # From the stored frame's size, not the decoded one: a JPEG 2000 level and a box average round their
    # sizes differently, and would otherwise give previews a pixel apart.
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    if gray.shape != shape:
        gray = resize_gray(gray, shape)
    return gray_to_uint8(gray)


def gray_to_uint8(gray: FloatImage) -> npt.NDArray[np.uint8]:
    """A grey image in [0, 1] as the 8-bit picture shown or handed on (rounded, out-of-range clipped)."""
    return _uint8_in_place(np.multiply(gray, 255.0))


def _uint8_in_place(scaled: FloatImage) -> npt.NDArray[np.uint8]:
    """:func:`gray_to_uint8` of a grey image already multiplied by 255, in a copy of its own that this may
    change: one float copy of the image, where the sum and the clip made one each (an 8000² picture's
    preview went through three of 256 MB)."""
    scaled += 0.5
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def picture_display(image: Image.Image, max_size: int = 1024) -> npt.NDArray[np.uint8]:
    """uint8 H×W of a PNG/JPEG picture, longer side at most ``max_size``: the grey picture the model reads
    (:func:`pil_to_gray`, turned by its EXIF orientation), as the console and reports show it.

    A picture of 8 bits or fewer is made grey and reduced as Pillow's 8-bit image, whose values are those
    :func:`pil_to_gray` scales into [0, 1] and :func:`gray_to_uint8` rounds back to the same: no float copy
    of the whole picture is made (an 8000² upload's preview took 0.9 GB of them). A 16-bit or floating-point
    picture is scaled by its own values, which needs them all."""
    if image.mode in _HIGH_BIT_MODES:
        gray = pil_to_gray(image)  # a float32 copy of its own
        gray *= np.float32(255.0)
        shown = Image.fromarray(_uint8_in_place(gray))
    else:
        shown = _eight_bit_gray(_exif_upright(image))
        if shown is image:
            shown = image.copy()  # thumbnail() changes the image it is called on
    shown.thumbnail((max_size, max_size))
    return np.asarray(shown, dtype=np.uint8)


def _header_int(ds: pydicom.Dataset, keyword: str) -> int | None:
    """An integer attribute of the image pixel module, None when absent, empty or not a number (headers
    that hospitals' systems do get wrong; the full decode refuses them with the attribute's name)."""
    if keyword not in ds:
        return None
    try:
        return int(ds[keyword].value)
    except (TypeError, ValueError, *_DAMAGED_ELEMENT):
        return None


def _stored_size(ds: pydicom.Dataset) -> tuple[int, int] | None:
    """Rows × Columns of the stored frame, None when the header does not say (the decoder then refuses)."""
    rows, columns = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    if rows is None or columns is None:
        return None
    return (rows, columns) if rows > 0 and columns > 0 else None


def _preview_j2k_side(stored: tuple[int, int] | None, max_size: int) -> int:
    """The shorter side of the coarsest JPEG 2000 resolution level whose longer side still reaches
    ``max_size``: a preview needs no finer level (an uncompressed image is box-averaged to about as
    much), and no coarser one, which would leave the report's image and the heat-map Secondary Capture
    smaller for a compressed study than for the same study uncompressed (512 instead of 1024 px for a
    2048² detector image). ``stored`` is :func:`_stored_size`."""
    if stored is None:
        return max_size  # the decoder will say what is wrong with the image
    return math.ceil(max_size * min(stored) / max(stored))
