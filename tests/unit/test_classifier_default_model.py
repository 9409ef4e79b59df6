"""The shipped default model: present, small, loadable, and answers on a real CR within budget."""

from __future__ import annotations

import json

import pytest

from classifier.inference import Classifier, default_model_path
from classifier.preprocess import read_dataset
from tests import peers

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
