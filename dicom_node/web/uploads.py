"""Images uploaded for interactive classification, held in memory for a short while.

An upload belongs to the user who made it. Only the latest few per user are kept, and none for
longer than ``ttl`` seconds, so pictures do not pile up on the node (DICOM uploads the user chose to
store live on in the node's file store like any C-STORE).
"""

from __future__ import annotations

import io
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from PIL import Image, JpegImagePlugin

from classifier.errors import UnsupportedImageError
from classifier.preprocess import MAX_FRAME_PIXELS, check_frame_size, check_jpeg_stream, check_picture
from dicom_node.eligibility import DEFAULT_AGE_POLICY, AgePolicy
from dicom_node.errors import NodeError, NotFoundError, UndecodableDatasetError
from dicom_node.part10 import check_value_representations, has_preamble, read_part10
from dicom_node.web.services import IngestOutcome, Upload

if TYPE_CHECKING:
    from classifier.types import Prediction

MAX_UPLOAD_BYTES = 128 * 1024 * 1024


class UploadTooLargeError(NodeError):
    """An upload over the console's size limit."""


class NotStorableUploadError(NodeError):
    """A picture (PNG/JPEG) asked to be stored in the node: only a DICOM file has the header a study is
    filed under. The upload is still held (not a 404)."""


def read_upload(filename: str, data: bytes, *, ages: AgePolicy = DEFAULT_AGE_POLICY) -> Upload:
    """Recognise an upload as DICOM (Part 10) or as a PNG/JPEG picture; ``ages`` is the node's age
    policy (``pipeline.minimum_patient_age_years``, ``pipeline.skip_unknown_age``)."""
    if has_preamble(data):
        try:
            dataset, _ = read_part10(data, force=False)  # a deflated one inflated within the node's limit
        except NodeError:
            raise
        except Exception as exc:  # pydicom raises many types for broken files; the text may hold PHI
            raise UndecodableDatasetError("the DICOM file could not be read") from exc
        if "PixelData" not in dataset:
            raise UndecodableDatasetError("the DICOM file holds no image")
        check_value_representations(dataset)  # as a C-STORE is checked: Rows as DS failed the preview
        return Upload(filename=filename, data=data, dataset=dataset, ages=ages)
    if _is_bare_dataset(data):
        raise UndecodableDatasetError(
            "a DICOM data set without the DICOM file header (no 128-byte preamble and 'DICM'); "
            "export it from the viewer or PACS as a DICOM file (Part 10)"
        )
    if not data:
        raise UndecodableDatasetError("the file is empty")
    return Upload(filename=filename, data=data, image=_open_picture(data))


_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}

#: The most chunks a PNG upload may have. Pillow reads them one by one in Python, about 5 µs each: 128 MB
#: of empty chunks held an image worker near a minute (review). Writers' chunks are kilobytes each
#: (libpng's IDAT 8 KB): a 128 MB picture has some tens of thousands.
MAX_PNG_CHUNKS = 1 << 18


def _check_png_chunks(data: bytes) -> None:
    """Refuse a PNG of more than :data:`MAX_PNG_CHUNKS` chunks, counted from their length fields before
    Pillow reads any (the count stops at IEND, at the end of the data or past the limit)."""
    index, chunks = 8, 0
    while index + 8 <= len(data) and chunks <= MAX_PNG_CHUNKS:
        chunks += 1
        if data[index + 4:index + 8] == b"IEND":
            return
        index += 12 + int.from_bytes(data[index:index + 4], "big")
    if chunks > MAX_PNG_CHUNKS:
        raise UndecodableDatasetError(
            f"a PNG of more than {MAX_PNG_CHUNKS} chunks, which take minutes to read; a picture's file has "
            "some thousands at most"
        )


def _open_picture(data: bytes) -> Image.Image:
    """A PNG or JPEG, told by its first bytes before any decoder runs: Pillow opened whatever it knew and
    decoded it before the format was checked, an EPS file by starting Ghostscript on it (review)."""
    kind = next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)
    if kind is None:
        raise UndecodableDatasetError("not a DICOM, PNG or JPEG file: only these are accepted")
    too_large = f"the picture is too large to decode (more than {MAX_FRAME_PIXELS // 1_000_000} megapixels)"
    if kind == "PNG":
        _check_png_chunks(data)
    try:
        if kind == "JPEG":
            check_jpeg_stream(data)  # before Pillow walks its marker segments, which may be millions
        image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
        if image.format == "MPO":  # a camera's JPEG with a second, smaller picture (MPF): the first is it
            image = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
        check_frame_size(image.width, image.height, what="picture")  # Pillow only warns up to twice its limit
        check_picture(image)  # an animated PNG (APNG), 16-bit colour samples
        image.load()
    except Image.DecompressionBombError as exc:  # Pillow's own limit, above the node's
        raise UndecodableDatasetError(too_large) from exc
    except UnsupportedImageError as exc:  # the node's limit, said as the classifier says it of a file
        raise UndecodableDatasetError(str(exc)) from exc
    except NodeError:
        raise
    except Exception as exc:  # Pillow raises several types for a damaged file
        unsupported = ": damaged, or a 12-bit or lossless JPEG, which is not supported (export it as PNG)"
        raise UndecodableDatasetError(
            f"the {kind} file cannot be decoded{unsupported if kind == 'JPEG' else ''} ({_reason(exc)})"
        ) from exc
    return image


def _reason(exc: BaseException) -> str:
    message = " ".join(str(exc).split())[:120]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _is_bare_dataset(data: bytes) -> bool:
    """A DICOM data set as a C-STORE carries it, saved without the file's preamble and meta header: its
    first element is of group 0002 or 0008 (little endian), and pydicom reads image attributes from it."""
    if data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    try:
        dataset, _ = read_part10(data, stop_before_pixels=True)
        return "SOPClassUID" in dataset or "Rows" in dataset
    except NodeError:  # a deflated one inflating past the limit: said as such
        raise
    except Exception:  # not DICOM after all
        return False


@dataclass
class HeldUpload:
    """One upload and what the console did with it so far."""

    token: str
    owner_id: int
    upload: Upload
    created: float
    preview_png: bytes | None = None
    prediction: Prediction | None = None
    analysed_at: datetime | None = None
    ingest: IngestOutcome | None = None
    refusal: str = ""  # why the last classification was refused


class UploadStore:
    """Uploads held for their users: the latest ``per_user`` of each, none older than ``ttl`` seconds, and
    together about ``max_bytes`` at most (the oldest of anyone's go first, never the newest), so that many
    users' uploads do not add up past the node's memory (review)."""

    def __init__(self, per_user: int = 4, ttl: float = 2 * 3600.0, max_bytes: int = 1 << 30) -> None:
        self.per_user = per_user
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, HeldUpload] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        for token in [t for t, item in self._items.items() if now - item.created > self.ttl]:
            del self._items[token]

    def add(self, owner_id: int, upload: Upload) -> HeldUpload:
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            mine = [t for t, item in self._items.items() if item.owner_id == owner_id]
            for token in mine[: max(0, len(mine) - self.per_user + 1)]:
                del self._items[token]
            held = HeldUpload(token=secrets.token_urlsafe(16), owner_id=owner_id, upload=upload, created=now)
            self._items[held.token] = held
            total = sum(item.upload.held_bytes for item in self._items.values())
            while total > self.max_bytes and len(self._items) > 1:
                _, oldest = self._items.popitem(last=False)
                total -= oldest.upload.held_bytes
            return held

    def get(self, owner_id: int, token: str) -> HeldUpload:
        """The upload, if it exists, is still held and belongs to ``owner_id``."""
        with self._lock:
            self._expire(time.monotonic())
            held = self._items.get(token)
            if held is None or held.owner_id != owner_id:
                raise NotFoundError("this upload is no longer held; upload the image again")
            return held
