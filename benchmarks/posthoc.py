"""What the benchmarks of post-hoc probability adjustments (``prior.py``, ``calibration.py``) share.

Each takes a trained model's probabilities and changes them after the fact, then asks two questions: what
that does on the validation split (the group split of model.json), and what it does where the model is
wrong most, on images from other sources (the ``pneumonia_model_package`` wheels of ``other_sources.py``)
and the real CR ``RG1_UNCI`` of pydicom-data.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from benchmarks.orientation import read_pictures
from benchmarks.other_sources import read_wheel
from benchmarks.testdata import pydicom_data_file
from classifier.artifact import ArtifactMetadata
from classifier.dataset import LabelledImage, load_collection, split_from_record
from classifier.inference import Classifier
from classifier.preprocess import read_dataset
from classifier.types import INDETERMINATE

Probabilities = npt.NDArray[np.float64]


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every such benchmark takes: the model, cxr3, and the wheels of other sources."""
    arguments = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    arguments.add_argument("model", type=Path)
    arguments.add_argument("data", type=Path)
    arguments.add_argument(
        "--wheels", type=Path, nargs="*", default=[], help="pneumonia_model_package wheels"
    )
    return arguments


def called(probabilities: Probabilities, classes: Sequence[str], threshold: float) -> list[str]:
    """The label of each row as the node gives it: the top class, or indeterminate below ``threshold``."""
    return [classes[int(row.argmax())] if row.max() >= threshold else INDETERMINATE for row in probabilities]


def picture_probabilities(
    classifier: Classifier, pictures: Sequence[Image.Image]
) -> tuple[Probabilities, list[bool]]:
    """N×C probabilities of pictures (the console's path), and for each whether the node would refuse it
    (unfamiliar, turned or a negative)."""
    classes = classifier.info.classes
    rows: list[list[float]] = []
    doubted: list[bool] = []
    for start in range(0, len(pictures), 16):
        for prediction in classifier.predict_images(pictures[start : start + 16], heatmap=False):
            rows.append([prediction.probabilities[name] for name in classes])
            doubted.append(prediction.doubt is not None)  # the node refuses these
    return np.asarray(rows, dtype=np.float64), doubted


@dataclass(frozen=True)
class Scored:
    """A model and its probabilities for the validation split, other sources and ``RG1_UNCI``."""

    classifier: Classifier
    metadata: ArtifactMetadata
    validation: list[LabelledImage]
    truth: npt.NDArray[np.int64]
    probabilities: Probabilities
    #: source name (as in ``other_sources.py``) → (its images, their probabilities, refused by the node)
    others: dict[str, tuple[list[tuple[str, str, Image.Image]], Probabilities, list[bool]]]
    rg1: Probabilities  # one row

    @property
    def classes(self) -> tuple[str, ...]:
        return self.classifier.info.classes


def score(model: Path, data: Path, wheels: Sequence[Path]) -> Scored:
    """Load ``model`` and predict every image the benchmark adjusts."""
    classifier = Classifier.load(model)  # reads and verifies model.json once
    metadata = classifier.metadata
    classes = classifier.info.classes
    _, validation = split_from_record(load_collection(data), metadata.data["split"])
    truth = np.asarray([classes.index(item.label) for item in validation], dtype=np.int64)
    probabilities, _ = picture_probabilities(classifier, read_pictures(validation))
    others = {
        name: (items, *picture_probabilities(classifier, [image for _, _, image in items]))
        for wheel in wheels
        for name, items in read_wheel(wheel).items()
    }
    rg1 = classifier.predict_datasets([read_dataset(pydicom_data_file("RG1_UNCI.dcm"))], heatmap=False)
    rg1_row = np.asarray([[rg1[0].probabilities[name] for name in classes]], dtype=np.float64)
    return Scored(classifier, metadata, validation, truth, probabilities, others, rg1_row)
