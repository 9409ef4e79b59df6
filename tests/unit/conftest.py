"""Fixtures shared by the classifier's unit tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _image(kind: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """'dark' chests have a dark disc in the middle, 'bright' ones a bright one, on a noisy background."""
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    base = rng.normal(0.5, 0.08, (size, size))
    base[disc] = 0.15 if kind == "dark" else 0.85
    return Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    rows = []
    for label in ("bright", "dark"):
        (root / label).mkdir()
        for index in range(12):
            name = f"{label}/{index}.png"
            _image(label, rng).save(root / name)
            rows.append({"file": name, "label": label, "group": f"{label}-patient{index // 2}"})
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return root
