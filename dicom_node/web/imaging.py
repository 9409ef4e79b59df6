"""Turning display images and heat maps into PNGs for the browser."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from dicom_node.errors import NotFoundError

HEATMAP_ALPHA = 0.45


def png_bytes(gray: npt.NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(gray, dtype=np.uint8)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _colormap(heat: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """A perceptually ordered blue-to-red ramp (matplotlib's 'jet' look without matplotlib)."""
    h = np.clip(heat, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * h - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * h - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * h - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0).astype(np.uint8)


def overlay_png(gray: npt.NDArray[np.uint8], heat: npt.NDArray[np.floating[Any]]) -> bytes:
    """The display image with the heat map (resized to it) blended on top, as a PNG."""
    heat_f = np.asarray(heat, dtype=np.float32)
    if heat_f.ndim != 2 or heat_f.size == 0:
        raise ValueError("a heat map is a non-empty 2-D array")
    height, width = gray.shape[:2]
    resized = Image.fromarray(heat_f).resize((width, height), Image.Resampling.BILINEAR)
    heat_r = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    colour = _colormap(heat_r).astype(np.float32)
    base = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)
    # Weak activations stay see-through, so the anatomy under a cold area remains readable.
    alpha = (HEATMAP_ALPHA * heat_r)[..., None]
    blended = base * (1.0 - alpha) + colour * alpha
    buffer = io.BytesIO()
    Image.fromarray(blended.astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def load_heatmap(path: Path) -> npt.NDArray[np.float32]:
    """Read a stored heat map: ``.npy`` (float HxW in [0, 1]) or a grayscale PNG."""
    if not path.is_file():
        raise NotFoundError("the heat map file is missing")
    if path.suffix == ".npy":
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
