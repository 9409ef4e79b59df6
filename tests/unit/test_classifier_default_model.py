"""The shipped default model: present, small, loadable, and answers on a real CR within budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from classifier.inference import Classifier, default_model_path
from classifier.preprocess import read_dataset
from tests import peers
from tests.node_datasets import stored_turned

pytestmark = pytest.mark.unit


def test_default_model_is_shipped_small_and_documented() -> None:
    folder = default_model_path()
    assert (folder / "model.keras").stat().st_size < 20_000_000  # two members; ImageNet-sized nets are 100+ MB
    assert (folder / "MODEL_CARD.md").is_file()
    metadata = json.loads((folder / "model.json").read_text())
    assert metadata["classes"] == ["covid", "normal", "pneumonia"]
    assert metadata["data"]["split"]["by"] == "group"


def test_default_model_classifies_the_real_cr_with_a_heatmap() -> None:
    classifier = Classifier.load(default_model_path())
    ds = read_dataset(peers.pydicom_data_file("RG1_J2KR.dcm"))
    prediction = classifier.predict_datasets([ds])[0]
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction.model.version == classifier.info.version and prediction.model.sha256
    assert prediction.heatmap is not None and prediction.heatmap.shape == classifier.spec.input_size


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_a_cr_stored_turned_is_read_head_up_and_its_heat_map_lies_on_the_stored_pixels(turns: int) -> None:
    """RG1 stored on its side or upside down, as its Patient Orientation says: the model reads it upright
    (before, the turned chest was refused as unfamiliar or called indeterminate), and the heat map is turned
    back so that it lies on the stored pixels the viewer shows."""
    classifier = Classifier.load(default_model_path())
    upright = read_dataset(peers.pydicom_data_file("RG1_UNCI.dcm"))
    stored = stored_turned(upright, turns)
    reference, prediction = classifier.predict_datasets([upright, stored])
    for name, probability in reference.probabilities.items():
        assert prediction.probabilities[name] == pytest.approx(probability, abs=0.02)
    assert prediction.label == reference.label and not prediction.unfamiliar and not prediction.looks_turned
    assert reference.heatmap is not None and prediction.heatmap is not None
    on_stored = np.rot90(reference.heatmap, turns).ravel()
    assert np.corrcoef(on_stored, prediction.heatmap.ravel())[0, 1] > 0.95
