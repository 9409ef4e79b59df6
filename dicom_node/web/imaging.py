"""Turning display images and heat maps into PNGs for the browser."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from dicom_node.errors import DamagedFileError, NotFoundError
from reporting.heatmap import overlay

DAMAGED_HEATMAP = (
    "the stored heat map file is damaged and cannot be read; the findings stand. An administrator can "
    "restore the results directory from the backup"
)


def png_bytes(gray: npt.NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(gray, dtype=np.uint8)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def png_gray(png: bytes) -> npt.NDArray[np.uint8]:
    """The grey image of :func:`png_bytes`' PNG, back as it went in (PNG is lossless)."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


def overlay_png(gray: npt.NDArray[np.uint8], heat: npt.NDArray[np.floating[Any]]) -> bytes:
    """The display image with the heat map blended on top, as a PNG — drawn exactly as in the PDF."""
    heat_f = np.asarray(heat, dtype=np.float32)
    if heat_f.ndim != 2 or heat_f.size == 0:
        raise NotFoundError("the stored heat map is empty or not a 2-D array")
    blended = overlay(np.asarray(gray, dtype=np.uint8), heat_f)
    buffer = io.BytesIO()
    Image.fromarray(blended, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def load_heatmap(path: Path) -> npt.NDArray[np.float32]:
    """Read a stored heat map: ``.npy`` (float HxW in [0, 1], as the pipeline writes) or a grayscale PNG."""
    if not path.is_file():
        raise NotFoundError("the heat map file is missing")
    try:
        if path.suffix == ".npy":
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError, EOFError) as exc:  # numpy's and Pillow's errors for damaged bytes
        raise DamagedFileError(DAMAGED_HEATMAP) from exc


_ROWS = ("upper", "middle", "lower")
_COLUMNS = ("left", "centre", "right")
#: How far (standard deviation, as a share of the image's side) a heat map's strongest part may scatter
#: and still be named by one place: one compact region is about 0.1, two lungs' worth or a noisy map 0.3.
_SPREAD = 0.2


def hot_region(heat: npt.NDArray[np.floating[Any]]) -> str:
    """Where a heat map is strongest, in words for a reader who cannot see its colours (WCAG 1.1.1):
    "the upper left of the image", "the centre of the image", or "spread over the image". The sides are
    the image's as shown, not the patient's (a PA film shows the patient's right on the left). The map's
    strongest part, its values of 80 % of the peak or more, is placed by its centre in a 3×3 grid, unless
    it scatters over more than one region (both lungs, a noisy map). "" for an empty or flat map."""
    values = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
    if values.ndim != 2 or values.size == 0:
        return ""
    peak = float(values.max())
    if peak <= 0.0 or float(values.min()) >= peak:
        return ""
    height, width = values.shape
    rows, columns = np.nonzero(values >= 0.8 * peak)
    if rows.std() > _SPREAD * height or columns.std() > _SPREAD * width:
        return "spread over the image"
    row = min(int(rows.mean() + 0.5) * 3 // height, 2)
    column = min(int(columns.mean() + 0.5) * 3 // width, 2)
    if (row, column) == (1, 1):
        return "the centre of the image"
    return f"the {_ROWS[row]} {_COLUMNS[column]} of the image"
