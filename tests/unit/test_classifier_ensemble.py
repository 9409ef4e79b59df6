"""Ensembles: merged members average their logits, load and explain like any artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from classifier import cli
from classifier.architectures import GRADCAM_LAYER, build_cxr_compact, build_sugandi_cnn
from classifier.ensemble import merge_members
from classifier.inference import Classifier

pytestmark = pytest.mark.unit


def _logits(model: object, images: np.ndarray) -> np.ndarray:
    import keras

    features = keras.Model(model.inputs, model.get_layer(GRADCAM_LAYER).output)(images)  # type: ignore[attr-defined]
    kernel, bias = model.get_layer("predictions").get_weights()  # type: ignore[attr-defined]
    return np.asarray(features).mean(axis=(1, 2)) @ kernel + bias


def test_merged_model_is_the_softmax_of_the_members_mean_logits() -> None:
    members = [build_cxr_compact(num_classes=3, input_size=(64, 64), seed=seed) for seed in (1, 2, 3)]
    for number, member in enumerate(members):  # untrained heads give near-equal logits: spread them
        kernel, bias = member.get_layer("predictions").get_weights()
        member.get_layer("predictions").set_weights([kernel * (5 + number), bias + number])
    images = np.random.default_rng(0).uniform(0, 1, (4, 64, 64, 3)).astype(np.float32)
    merged = merge_members(members)
    mean_logits = np.mean([_logits(member, images) for member in members], axis=0)
    expected = np.exp(mean_logits) / np.exp(mean_logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(merged.predict(images, verbose=0), expected, rtol=1e-4, atol=1e-5)
    assert merged.get_layer(GRADCAM_LAYER).output.shape[-1] == 3 * 192


def test_a_flattening_head_cannot_be_merged() -> None:
    with pytest.raises(ValueError, match="cannot be merged|no 'gradcam"):
        merge_members([build_sugandi_cnn(), build_sugandi_cnn()])


def test_cli_trains_members_merges_them_and_the_result_classifies(
    collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "ensemble"
    argv = ["train", str(collection), str(output), "--seeds", "5,6", "--epochs", "1", "--steps-per-epoch", "1",
            "--batch-size", "4", "--no-progress", "--version", "tiny-ensemble"]
    assert cli.main(argv) == 0
    assert "2 members merged" in capsys.readouterr().out
    metadata = json.loads((output / "model.json").read_text())
    assert [member["seed"] for member in metadata["training"]["ensemble"]["members"]] == [5, 6]
    assert metadata["data"]["split"]["seed"] == 5 and metadata["version"] == "tiny-ensemble"
    classifier = Classifier.load(output)
    image = np.random.default_rng(1).uniform(0, 1, (*classifier.spec.input_size, 3)).astype(np.float32)
    (prediction,) = classifier.predict([image], heatmap=True)
    assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-4
    assert prediction.heatmap is not None and prediction.heatmap.shape == classifier.spec.input_size
