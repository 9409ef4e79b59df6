"""Writing into the folder a node loads its model from: an interrupted training, merge or novelty fit
leaves the old model whole, a completed one leaves nothing staged behind, and a novelty check is fitted
again when it is lost, but never to a model whose features are unusable."""

from __future__ import annotations

import shutil
from dataclasses import replace
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


def _save_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """keras.Model.save interrupted (Ctrl-C, or the disk full) half-way through the file it writes."""
    import keras

    save = keras.Model.save

    def cut_short(self: Any, filepath: Any, *args: Any, **kwargs: Any) -> None:
        save(self, filepath, *args, **kwargs)
        with open(filepath, "r+b") as handle:
            handle.truncate(Path(filepath).stat().st_size // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", cut_short)


@pytest.fixture(scope="module")
def trained(collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("writes") / "model"
    _train(collection, output, "writes-1")
    fit_novelty(output, collection, rank=8, quantile=0.9, degradations=())
    return output


def test_a_training_interrupted_while_it_saves_leaves_the_old_model_loadable(
    trained: Path, collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = Path(shutil.copytree(trained, tmp_path / "model"))
    recorded = (trained / METADATA_FILE).read_bytes()
    _save_cut_short(monkeypatch)
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
    _save_cut_short(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_ensemble(members, current, collection)
    monkeypatch.undo()
    _still_whole(current, recorded, collection)


def _with_last_convolution(output: Path, value: float) -> None:
    """The model's last convolution set to ``value`` (NaN: a diverged training; 0: a dead network), recorded
    in model.json with its own sha256 and no novelty check."""
    import keras
    import numpy as np

    from classifier.artifact import MODEL_FILE, sha256_file, write_metadata

    metadata = read_metadata(output)
    model = keras.saving.load_model(output / MODEL_FILE, compile=False)
    last = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    last.set_weights([np.full_like(w, value) for w in last.get_weights()])
    model.save(output / MODEL_FILE)
    write_metadata(output, replace(metadata, sha256=sha256_file(output / MODEL_FILE), novelty={}))


def test_a_lost_or_damaged_novelty_check_is_fitted_again_by_the_command_that_fits_it(
    trained: Path, collection: Path, tmp_path: Path
) -> None:
    from classifier.errors import ModelArtifactError
    from classifier.novelty import NOVELTY_FILE, PRESENTATION_PROBE_FILE

    model = Path(shutil.copytree(trained, tmp_path / "model"))
    for damage in ("lost", "damaged"):
        if damage == "lost":
            (model / NOVELTY_FILE).unlink()
        else:
            (model / PRESENTATION_PROBE_FILE).write_bytes(b"x")
        with pytest.raises(ModelArtifactError):  # the node does not load it, and says to run 'novelty'
            Classifier.load(model)
        fit_novelty(model, collection, rank=8, quantile=0.9, degradations=())
        novelty = Classifier.load(model).novelty
        assert novelty is not None and novelty.probe is not None


@pytest.mark.parametrize(("value", "reason"), [(float("nan"), "not finite numbers"), (0.0, "do not vary")])
def test_no_novelty_check_is_fitted_to_a_model_without_usable_features(
    trained: Path, collection: Path, tmp_path: Path, value: float, reason: str
) -> None:
    """A NaN threshold was written to model.json with exit 0 (not JSON, and no image ever unfamiliar), and
    features that do not vary ended the command in a ValueError's traceback."""
    from classifier.errors import ModelArtifactError

    model = Path(shutil.copytree(trained, tmp_path / "model"))
    _with_last_convolution(model, value)
    recorded = (model / METADATA_FILE).read_bytes()
    with pytest.raises(ModelArtifactError, match=reason):
        fit_novelty(model, collection, rank=8, quantile=0.9, degradations=())
    assert (model / METADATA_FILE).read_bytes() == recorded


def test_a_training_whose_loss_went_nan_in_an_epoch_still_writes_its_model(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.json is never written with NaN; the history of an epoch that diverged (its best weights kept)
    made the whole training fail at its end, with the new model left under its staged name."""
    import json
    import math

    import keras

    fit = keras.Model.fit

    def diverged(self: Any, *args: Any, **kwargs: Any) -> Any:
        history = fit(self, *args, **kwargs)
        history.history["loss"] = [math.nan for _ in history.history["loss"]]
        return history

    monkeypatch.setattr(keras.Model, "fit", diverged)
    _train(collection, tmp_path / "model", "nan-1")
    def refuse(constant: str) -> None:
        raise ValueError(f"model.json holds {constant}")

    recorded = json.loads((tmp_path / "model" / METADATA_FILE).read_text(), parse_constant=refuse)
    assert recorded["training"]["history"]["loss"] == [None]
    read_metadata(tmp_path / "model")


def test_metadata_that_cannot_be_written_leaves_nothing_staged(trained: Path, tmp_path: Path) -> None:
    from classifier.artifact import MODEL_FILE, staged, write_metadata
    from classifier.errors import ModelArtifactError

    model = Path(shutil.copytree(trained, tmp_path / "model"))
    staged(model / MODEL_FILE).write_bytes(b"a new model")
    metadata = read_metadata(model)
    with pytest.raises(ModelArtifactError, match="not a finite number"):
        write_metadata(model, replace(metadata, validation={"accuracy": float("nan")}), [model / MODEL_FILE])
    assert not staged(model / MODEL_FILE).exists() and read_metadata(model) == metadata


def test_a_folder_that_cannot_be_synced_still_gets_its_files(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some network file systems refuse fsync on a folder (EINVAL): the files are in place by then."""
    import errno

    from classifier import artifact

    model = Path(shutil.copytree(trained, tmp_path / "model"))
    flush = artifact._flush_to_disk

    def files_only(path: Path) -> None:
        if path.is_dir():
            raise OSError(errno.EINVAL, "Invalid argument")
        flush(path)

    monkeypatch.setattr(artifact, "_flush_to_disk", files_only)
    artifact.write_metadata(model, replace(read_metadata(model), version="synced-2"))
    assert read_metadata(model).version == "synced-2"
