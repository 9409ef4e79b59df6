"""Ensembles: merged members average their logits, load and explain like any artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier import cli
from classifier.architectures import GRADCAM_LAYER, build_cxr_compact, build_sugandi_cnn
from classifier.ensemble import merge_members
from classifier.errors import EnsembleError
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


def test_an_ensemble_merged_with_one_more_network_is_the_mean_of_all_three(tmp_path: Path) -> None:
    """Weighting the merged pair by the two networks it holds: [[a, b], c] is exactly [a, b, c] — and it
    still saves and loads as one model."""
    import keras

    members = [build_cxr_compact(num_classes=3, input_size=(64, 64), seed=seed) for seed in (1, 2, 3)]
    for number, member in enumerate(members):
        kernel, bias = member.get_layer("predictions").get_weights()
        member.get_layer("predictions").set_weights([kernel * (5 + 3 * number), bias + 2 * number])
    images = np.random.default_rng(0).uniform(0, 1, (4, 64, 64, 3)).astype(np.float32)
    flat = merge_members(members).predict(images, verbose=0)
    nested = merge_members([merge_members(members[:2]), members[2]], weights=[2, 1])
    np.testing.assert_allclose(nested.predict(images, verbose=0), flat, rtol=1e-4, atol=1e-5)
    unweighted = merge_members([merge_members(members[:2]), members[2]]).predict(images, verbose=0)
    assert np.abs(unweighted - flat).max() > 1e-3  # the weights matter: 1:1 would over-count the third
    nested.save(tmp_path / "nested.keras")
    loaded = keras.saving.load_model(tmp_path / "nested.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), flat, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one normalisation and one weight"):
        merge_members(members, weights=[1, 1])


def test_a_flattening_head_cannot_be_merged() -> None:
    with pytest.raises(EnsembleError, match="cannot be merged|no 'gradcam"):
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

    # a third network of the same split added to the merged pair: one ensemble of three, recorded as such
    third = tmp_path / "third"
    assert cli.main(["train", str(collection), str(third), "--seed", "7", "--split-seed", "5", "--epochs", "1",
                     "--steps-per-epoch", "1", "--batch-size", "4", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    trio = tmp_path / "trio"
    assert cli.main(["ensemble", str(trio), str(output), str(third), "--data", str(collection)]) == 0
    assert "3 members merged" in capsys.readouterr().out
    members = json.loads((trio / "model.json").read_text())["training"]["ensemble"]["members"]
    assert [member["seed"] for member in members] == [5, 6, 7]
    assert json.loads((trio / "model.json").read_text())["name"] == "cxr-compact"

    # a member cut short after it was hashed: Keras' ValueError escaped as a traceback
    from classifier.artifact import sha256_file

    cut = tmp_path / "cut"
    shutil.copytree(third, cut)
    whole = (cut / "model.keras").read_bytes()
    (cut / "model.keras").write_bytes(whole[: len(whole) // 2])
    record = json.loads((cut / "model.json").read_text())
    (cut / "model.json").write_text(json.dumps({**record, "sha256": sha256_file(cut / "model.keras")}))
    four = tmp_path / "four"
    assert cli.main(["ensemble", str(four), str(output), str(cut), "--data", str(collection)]) == 2
    assert "model.keras cannot be loaded: ValueError" in capsys.readouterr().err


def test_members_of_different_architectures_merge_exactly() -> None:
    """A 'unit' CNN with a 4×4 map and a 'signed' EfficientNet-Lite0 with a 2×2 map: the Lite0 member gets
    its own normalisation inside the merged model and its map is tiled, and the logits still average."""
    from classifier.architectures import build_efficientnet_lite_transfer
    from classifier.preprocess import normalisation_change

    compact = build_cxr_compact(num_classes=3, input_size=(64, 64), seed=1)
    lite = build_efficientnet_lite_transfer(0, num_classes=3, input_size=(64, 64), weights=None, seed=2)
    for number, member in enumerate((compact, lite)):
        kernel, bias = member.get_layer("predictions").get_weights()
        member.get_layer("predictions").set_weights([kernel * (5 + number), bias + number])
    unit = np.random.default_rng(0).uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)
    signed = (unit * 255 - 127) / 128
    merged = merge_members([compact, lite], ["unit", "signed"])
    mean_logits = (_logits(compact, unit) + _logits(lite, signed)) / 2
    expected = np.exp(mean_logits) / np.exp(mean_logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(merged.predict(unit, verbose=0), expected, rtol=1e-4, atol=1e-5)
    assert merged.get_layer(GRADCAM_LAYER).output.shape[1:] == (4, 4, 192 + 1280)

    assert normalisation_change("signed", "unit") == pytest.approx((128 / 255, 127 / 255))
    with pytest.raises(ValueError, match="no affine map"):
        merge_members([compact, lite], ["unit", "resnet"])


def test_cli_trains_one_member_per_architecture_on_one_split(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from classifier.architectures import build_efficientnet_lite_transfer

    backbone = tmp_path / "backbone.weights.h5"  # stands in for the ImageNet weights file
    build_efficientnet_lite_transfer(0, num_classes=2, input_size=(64, 64), weights=None).save_weights(backbone)
    monkeypatch.setenv("CXR_LITE0_WEIGHTS", str(backbone))
    output = tmp_path / "duo"
    argv = ["train", str(collection), str(output), "-a", "cxr-compact,efficientnet-lite0-transfer",
            "--input-size", "64", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "4",
            "--no-progress", "--version", "tiny-duo"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "2 members merged" in capsys.readouterr().out
    metadata = json.loads((output / "model.json").read_text())
    assert metadata["name"] == "cxr-compact+efficientnet-lite0-transfer"
    members = metadata["training"]["ensemble"]["members"]
    assert [member["architecture"] for member in members] == ["cxr-compact", "efficientnet-lite0-transfer"]
    assert metadata["preprocessing"]["normalisation"] == "unit"
    classifier = Classifier.load(output)
    (prediction,) = classifier.predict_images([Image.open(collection / "dark" / "0.png")])
    assert prediction.heatmap is not None and prediction.heatmap.shape == (64, 64)
    assert cli.main([*argv, "--seeds", "1,2"]) == 2  # an option error, said in one line
    with pytest.raises(SystemExit) as refused:  # argparse: usage and the reason, exit 2, before any training
        cli.main(["train", str(collection), str(output), "-a", "cxr-compact,cxr-compact"])
    assert refused.value.code == 2
    assert "name each architecture once" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["-a", "sugandi-cnn", "--seeds", "1,2"], "has no 'gradcam_features'/'predictions' layers"),
        (["-a", "cxr-compact,sugandi-cnn"], "must share their preprocessing"),
        (["-a", "cxr-compact,efficientnet-lite0-transfer", "--input-size", "48"], "do not tile"),
        (["-a", "cxr-compact,resnet152-transfer"], "ImageNet ResNet-152 weights are not on this machine"),
        (["-a", "cxr-compact,efficientnet-lite0-transfer", "--average-last", "2"],
         "cannot average the last 2 of cxr-compact's 1 epochs"),
    ],
    ids=["seed-cnn-head", "preprocessing", "feature-maps", "weights", "average-last"],
)
def test_an_ensemble_that_cannot_merge_is_refused_before_any_member_trains(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    options: list[str], reason: str,
) -> None:
    """Each was refused only after every member had trained (hours with ResNet-152), and the trained
    members were then deleted with the scratch folder."""
    from classifier import training
    from classifier.architectures import build_efficientnet_lite_transfer

    def trained(*_: object, **__: object) -> None:
        raise AssertionError("a member trained before the ensemble was checked")

    monkeypatch.setattr(training, "train", trained)
    backbone = tmp_path / "backbone.weights.h5"  # Lite0's ImageNet weights file, as far as the check goes
    untrained = build_efficientnet_lite_transfer(0, num_classes=2, input_size=(64, 64), weights=None)
    untrained.save_weights(backbone)
    monkeypatch.setenv("CXR_LITE0_WEIGHTS", str(backbone))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no ResNet-152 weights there
    monkeypatch.delenv("CXR_RESNET152_WEIGHTS", raising=False)
    argv = ["train", str(collection), str(tmp_path / "out"), *options, "--epochs", "1", "--no-progress"]
    assert cli.main(argv) == 2
    assert reason in capsys.readouterr().err


def test_one_network_given_twice_is_not_an_ensemble(
    collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cxr-node ensemble OUT A A`` (or A and a copy of it) wrote "2 members merged", two member records
    and twice the parameters of what is one network."""
    single, again = tmp_path / "single", tmp_path / "again"
    for folder in (single, again):  # the same seed trained twice: the same weights in another file
        assert cli.main(["train", str(collection), str(folder), "--epochs", "1", "--steps-per-epoch", "1",
                         "--batch-size", "4", "--no-progress", "--no-novelty"]) == 0  # fmt: skip
    training = json.loads((single / "model.json").read_text())["training"]
    assert training["steps_per_epoch"] == 1  # what --steps-per-epoch set is in model.json, not only argv
    copy = tmp_path / "copy"
    shutil.copytree(single, copy)
    capsys.readouterr()
    for members in ([single, single], [single, copy], [single, again]):
        argv = ["ensemble", str(tmp_path / "pair"), *map(str, members), "--data", str(collection)]
        assert cli.main(argv) == 2
        assert "one is given twice" in capsys.readouterr().err
