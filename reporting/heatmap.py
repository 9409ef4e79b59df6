"""Heat-map overlays: where the model looked, drawn over the radiograph for the PDF and the SC image."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

# "jet" colour map control points (value, R, G, B): blue = low, red = high, as Grad-CAM figures use.
_JET = np.array(
    [
        (0.0, 0, 0, 128),
        (0.125, 0, 0, 255),
        (0.375, 0, 255, 255),
        (0.625, 255, 255, 0),
        (0.875, 255, 0, 0),
        (1.0, 128, 0, 0),
    ],
    dtype=np.float64,
)


def colourise(values: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Map values in [0, 1] to RGB (HxW -> HxWx3)."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(clipped, _JET[:, 0], _JET[:, channel]) for channel in (1, 2, 3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def resize_heatmap(heatmap: npt.NDArray[np.floating], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Stretch a heat map to an image of ``shape`` (rows, columns).

    The classifier's heat maps already cover the whole radiograph (it places the map of a cropped model
    input back into the frame: :func:`classifier.inference.heatmap_in_whole_frame`), so stretching lines
    them up with the image.
    """
    image = Image.fromarray(np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0), mode="F")
    resized = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def overlay(
    preview: npt.NDArray[np.uint8], heatmap: npt.NDArray[np.floating], *, opacity: float = 0.5
) -> npt.NDArray[np.uint8]:
    """The radiograph in grey with the heat map blended on top (HxWx3 uint8).

    Opacity grows with the heat, so regions the model ignored keep the plain radiograph.
    """
    if preview.ndim != 2:
        raise ValueError("preview must be a single-channel image")
    heat = resize_heatmap(heatmap, (preview.shape[0], preview.shape[1]))
    grey = np.repeat(preview[..., np.newaxis].astype(np.float32), 3, axis=-1)
    colour = colourise(heat).astype(np.float32)
    alpha = (opacity * np.clip((heat - 0.15) / 0.85, 0.0, 1.0))[..., np.newaxis]
    blended: npt.NDArray[np.uint8] = np.round(grey * (1.0 - alpha) + colour * alpha).astype(np.uint8)
    return blended
