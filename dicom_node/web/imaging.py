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
