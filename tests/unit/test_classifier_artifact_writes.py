"""Writing into the folder a node loads its model from: an interrupted training, merge or novelty fit
leaves the old model whole, and a completed one leaves nothing staged behind."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from classifier.artifact import METADATA_FILE, STAGING_PREFIX, read_metadata
from classifier.errors import OutputError
from classifier.inference import Classifier
from classifier.novelty import LinearProbe, fit_novelty
from classifier.training import TrainingConfig, train

pytestmark = pytest.mark.unit


def _train(collection: Path, output: Path, version: str) -> None:
    train(
        TrainingConfig(
            architecture="cxr-compact", data=collection, output=output, epochs=1, steps_per_epoch=1,
            batch_size=4, input_size=64, version=version, progress=False,
        )
    )  # fmt: skip


def _still_whole(output: Path, recorded: bytes, collection: Path) -> None:
    """model.json is the one before, and the files it pins load and classify."""
    assert (output / METADATA_FILE).read_bytes() == recorded
    read_metadata(output)  # the weights' sha256 is the one recorded
    classifier = Classifier.load(output)
    with Image.open(sorted(collection.rglob("*.png"))[0]) as image:
        assert classifier.predict_images([image], heatmap=False)[0].label


@pytest.fixture(scope="module")
def trained(collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("writes") / "model"
    _train(collection, output, "writes-1")
    fit_novelty(output, collection, rank=8, quantile=0.9, degradations=())
    return output


def test_a_training_interrupted_while_it_saves_leaves_the_old_model_loadable(
    trained: Path, collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    trained = Path(shutil.copytree(trained, tmp_path / "model"))
    recorded = (trained / METADATA_FILE).read_bytes()
    save = keras.Model.save

    def cut_short(self: Any, filepath: Any, *args: Any, **kwargs: Any) -> None:
        save(self, filepath, *args, **kwargs)
        with open(filepath, "r+b") as handle:  # Ctrl-C, or the disk full, half-way through the file
            handle.truncate(Path(filepath).stat().st_size // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        _train(collection, trained, "writes-2")
    monkeypatch.undo()
    _still_whole(trained, recorded, collection)


def test_a_novelty_fit_interrupted_between_its_two_files_leaves_the_old_check(
    trained: Path, collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = Path(shutil.copytree(trained, tmp_path / "model"))
    recorded = (trained / METADATA_FILE).read_bytes()
    before = Classifier.load(trained).novelty
    assert before is not None and before.probe is not None

    def interrupted(self: LinearProbe, path: Path) -> None:
        raise KeyboardInterrupt  # after the density's file was written

    monkeypatch.setattr(LinearProbe, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit_novelty(trained, collection, rank=4, quantile=0.8, degradations=())  # another density
    monkeypatch.undo()
    _still_whole(trained, recorded, collection)
    novelty = Classifier.load(trained).novelty
    assert novelty is not None and novelty.threshold == before.threshold


def test_a_completed_training_leaves_no_staged_file(collection: Path, tmp_path: Path) -> None:
    _train(collection, tmp_path / "model", "writes-3")
    fit_novelty(tmp_path / "model", collection, rank=8, quantile=0.9, degradations=())
    assert not [p for p in (tmp_path / "model").rglob("*") if p.name.startswith(STAGING_PREFIX)]
    read_metadata(tmp_path / "model")


def test_an_ensemble_interrupted_while_it_saves_leaves_the_model_in_its_output_loadable(
    trained: Path, collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    from classifier.ensemble import build_ensemble

    members = []
    for seed in (1, 2):
        members.append(tmp_path / f"member{seed}")
        train(
            TrainingConfig(
                architecture="cxr-compact", data=collection, output=members[-1], epochs=1, steps_per_epoch=1,
                batch_size=4, input_size=64, seed=seed, split_seed=42, progress=False,
            )
        )  # fmt: skip
    weights = (members[0] / "model.keras").read_bytes()
    with pytest.raises(OutputError, match="it is a member's folder"):  # its single model was replaced
        build_ensemble([members[0], members[1]], members[0] / ".", collection)
    assert (members[0] / "model.keras").read_bytes() == weights
    current = Path(shutil.copytree(trained, tmp_path / "current"))
    recorded = (current / METADATA_FILE).read_bytes()
    save = keras.Model.save

    def cut_short(self: Any, filepath: Any, *args: Any, **kwargs: Any) -> None:
        save(self, filepath, *args, **kwargs)
        with open(filepath, "r+b") as handle:
            handle.truncate(Path(filepath).stat().st_size // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        build_ensemble(members, current, collection)
    monkeypatch.undo()
    _still_whole(current, recorded, collection)
