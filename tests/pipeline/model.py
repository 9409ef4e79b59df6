"""A model artifact for pipeline and interop tests: the shipped default, else a tiny one trained here.

The tiny model is a real artifact (the classifier's own training code, one step on generated images);
its predictions mean nothing, which is all the pipeline tests need: they check what happens to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from classifier.inference import default_model_path

CLASSES = ("covid", "normal", "pneumonia")


def default_model() -> Path | None:
    path = default_model_path()
    return path if (path / "model.json").is_file() else None


def tiny_model(root: Path, *, relabel: dict[str, str] | None = None) -> Path:
    """Train ``sugandi-cnn`` for one step on 12 generated images of :data:`CLASSES` (merged by ``relabel``,
    as ``cxr-node train --relabel`` does); returns the artifact folder."""
    from classifier.training import TrainingConfig, train

    output = root / ("model" if relabel is None else "model-" + "-".join(sorted(set(relabel.values()))))
    if (output / "model.json").is_file():
        return output  # trained earlier in this test session
    data = root / "data"
    rng = np.random.default_rng(7)
    for index, label in enumerate(CLASSES):
        (data / label).mkdir(parents=True, exist_ok=True)
        for number in range(4):
            pixels = rng.integers(0, 255, size=(64, 64), dtype=np.uint8) // (index + 1)
            Image.fromarray(pixels).save(data / label / f"{label}-{number}.png")
    result = train(
        TrainingConfig(
            architecture="sugandi-cnn",
            data=data,
            output=output,
            epochs=1,
            batch_size=4,
            steps_per_epoch=1,
            version="test-1",
            progress=False,
            relabel=relabel,
        )
    )
    return result.folder


def model_for_tests(root: Path) -> Path:
    """The default model when the project ships one, else a tiny one trained once under ``root``
    (pass the same folder from every fixture, e.g. under ``tmp_path_factory.getbasetemp()``)."""
    return default_model() or tiny_model(root)
