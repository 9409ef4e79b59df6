"""The novelty check: its density is the stated Mahalanobis distance, it travels with the artifact, and
the shipped model tells a chest radiograph from a lower leg and a photograph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from classifier.errors import ModelArtifactError
from classifier.inference import Classifier, default_model_path
from classifier.novelty import (
    NOVELTY_FILE,
    TURN_MARGIN,
    FeatureDensity,
    NoveltyCheck,
    better_turn,
    fit_density,
    fit_novelty,
)
from classifier.preprocess import display_image
from tests import peers

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures"


def _features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of correlated 12-dimensional features."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(12, 12))
    labels = np.repeat([0, 1], 150)
    features = rng.normal(size=(300, 12)) @ mixing + np.where(labels[:, None] == 0, 0.0, 3.0)
    return features, labels


def test_score_is_the_mahalanobis_distance_under_the_shrunk_covariance() -> None:
    features, labels = _features()
    shrinkage = 0.3
    density = fit_density(features, labels, rank=12, shrinkage=shrinkage)

    means = np.stack([features[labels == c].mean(axis=0) for c in (0, 1)])
    residuals = features - means[labels]
    covariance = residuals.T @ residuals / len(features)
    shrunk = (1 - shrinkage) * covariance + shrinkage * np.trace(covariance) / 12 * np.eye(12)
    precision = np.linalg.inv(shrunk)
    probes = np.random.default_rng(1).normal(size=(5, 12)) * 4.0
    expected = np.min([np.einsum("ij,jk,ik->i", probes - m, precision, probes - m) for m in means], axis=0)

    np.testing.assert_allclose(density.score(probes), expected, rtol=1e-8)


def test_a_low_rank_density_still_ranks_outliers_above_its_own_data() -> None:
    features, labels = _features()
    density = fit_density(features, labels, rank=4, shrinkage=0.5)
    inside = density.score(_features(seed=2)[0])
    outside = density.score(np.random.default_rng(3).normal(size=(50, 12)) * 20.0)
    assert np.quantile(inside, 0.99) < outside.min()


def test_the_density_round_trips_and_a_changed_file_is_refused(tmp_path: Path) -> None:
    features, labels = _features()
    density = fit_density(features, labels, rank=6)
    density.save(tmp_path / NOVELTY_FILE)
    loaded = FeatureDensity.load(tmp_path / NOVELTY_FILE)
    np.testing.assert_allclose(loaded.score(features[:7]), density.score(features[:7]), rtol=1e-5)

    from classifier.artifact import sha256_file

    record = {"file": NOVELTY_FILE, "sha256": sha256_file(tmp_path / NOVELTY_FILE), "threshold": 2.0}
    check = NoveltyCheck.load(tmp_path, record)
    np.testing.assert_allclose(check.ratios(features[:3]), loaded.score(features[:3]) / 2.0)
    with pytest.raises(ModelArtifactError, match="sha256"):
        NoveltyCheck.load(tmp_path, {**record, "sha256": "0" * 64})
    with pytest.raises(ModelArtifactError, match="threshold"):
        NoveltyCheck.load(tmp_path, {**record, "threshold": 0})
    with pytest.raises(ModelArtifactError, match="not in"):
        NoveltyCheck.load(tmp_path, {**record, "file": "elsewhere.npz"})


def test_fitting_an_artifact_records_the_check_and_predictions_carry_it(
    collection: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from classifier.training import TrainingConfig, train

    output = tmp_path_factory.mktemp("novelty") / "tiny"
    train(
        TrainingConfig(
            architecture="cxr-compact", data=collection, output=output, epochs=1, steps_per_epoch=1,
            batch_size=4, input_size=64, version="tiny-novelty", progress=False,
        )
    )  # fmt: skip
    assert Classifier.load(output).novelty is None  # nothing fitted yet: predictions say None
    record = fit_novelty(output, collection, rank=8, quantile=0.9, degradations=("jpeg:30",))

    saved = json.loads((output / "model.json").read_text())["novelty"]
    assert saved == json.loads(json.dumps(record)) and (output / NOVELTY_FILE).is_file()
    assert saved["fitted_on"] == {"train_images": saved["fitted_on"]["train_images"], "degradations": ["jpeg:30"]}
    assert saved["threshold"] > 0 and saved["rank"] == 8
    classifier = Classifier.load(output)
    assert classifier.novelty is not None
    pictures = sorted(collection.rglob("*.png"))[:4]
    predictions = classifier.predict_images([Image.open(p) for p in pictures], heatmap=False)
    with_maps = classifier.predict_images([Image.open(p) for p in pictures], heatmap=True)
    for plain, mapped in zip(predictions, with_maps, strict=True):
        assert plain.novelty is not None and plain.novelty > 0
        assert mapped.novelty == pytest.approx(plain.novelty, rel=1e-4)  # both paths read the same features

    from classifier.evaluation import evaluate

    report = evaluate(output, collection)  # a hospital's check on its own export says how many it would refuse
    assert report["images"] == 24 and 0 <= report["unfamiliar"]["images"] <= 24
    assert report["unfamiliar"]["fraction"] == pytest.approx(report["unfamiliar"]["images"] / 24)


@pytest.mark.parametrize(
    ("as_given", "turned", "expected"),
    [
        (0.6, [1.2, 0.8, 1.1], 0),  # upright: the most familiar as it is
        (0.6, [0.55, 0.9, 1.0], 0),  # a turn scores a little lower: not enough to call the image turned
        (0.77, [1.1, 0.58, 1.2], 2),  # upside down: half a turn brings it back
        (1.2, [1.1, 1.3, 0.6], 3),  # on its side: three quarter turns
        (1.89, [1.18, 1.55, 1.39], 0),  # a photograph: clearly better turned, but still unlike a chest
        (1.0, [1.0, TURN_MARGIN, 1.0], 0),  # exactly at the margin: not turned
    ],
)
def test_an_image_is_called_turned_only_when_a_turn_is_clearly_more_familiar(
    as_given: float, turned: list[float], expected: int
) -> None:
    assert better_turn(as_given, turned) == expected


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier.load(default_model_path())


def test_the_shipped_model_knows_a_chest_radiograph_from_a_leg_and_a_photograph(shipped: Classifier) -> None:
    assert shipped.novelty is not None
    chest, leg = (
        shipped.predict_datasets([pydicom.dcmread(peers.pydicom_data_file(name))], heatmap=False)[0]
        for name in ("RG1_UNCI.dcm", "RG3_UNCI.dcm")
    )
    assert chest.novelty is not None and chest.novelty < 0.8 and not chest.unfamiliar  # another hospital's CR
    assert leg.unfamiliar  # the header says EXTREMITY; the pixels say so too
    photos = shipped.predict_images(
        [Image.open(FIXTURES / "imagenet_coffee.jpg"), Image.open(FIXTURES / "imagenet_chelsea.jpg")],
        heatmap=False,
    )
    assert all(p.unfamiliar for p in photos)


@pytest.mark.parametrize(
    ("transpose", "turn"),
    [(None, 0), (Image.Transpose.ROTATE_90, 3), (Image.Transpose.ROTATE_180, 2), (Image.Transpose.ROTATE_270, 1)],
)
def test_a_picture_the_wrong_way_up_is_told_apart(
    shipped: Classifier, transpose: Image.Transpose | None, turn: int
) -> None:
    """A picture has no Patient Orientation: the hospital CR as a picture is checked at its four turns.
    Upside down it passes the novelty check (0.77) and was called indeterminate; now it is flagged."""
    picture = Image.fromarray(display_image(pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))))
    prediction = shipped.predict_images([picture if transpose is None else picture.transpose(transpose)])[0]
    assert prediction.better_turn == turn and prediction.looks_turned == (turn != 0)
    assert "turn_check" in prediction.timings_ms
    # On its side the chest is unfamiliar as given too; the reason names the turn, which is what to fix.
    assert (prediction.doubt or "").startswith("the image looks the wrong way up") == (turn != 0)


def test_a_photograph_is_unlike_a_chest_whichever_way_it_is_turned(shipped: Classifier) -> None:
    """The cat scores 1.89 as given and 1.18 on its side: clearly better turned, but still unfamiliar, so it is
    not called the wrong way up and the reason stays the novelty check's."""
    with Image.open(FIXTURES / "imagenet_chelsea.jpg") as photo:
        prediction = shipped.predict_images([photo], heatmap=False)[0]
    assert prediction.unfamiliar and not prediction.looks_turned
    assert (prediction.doubt or "").startswith("the image does not look like the chest radiographs")


def test_dicom_is_turn_checked_only_when_its_header_does_not_say_which_way_is_up(shipped: Classifier) -> None:
    with_header = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))  # L\F
    without = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    del without.PatientOrientation
    upside_down = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    upside_down.PixelData = np.ascontiguousarray(np.rot90(upside_down.pixel_array, 2)).tobytes()
    del upside_down.PatientOrientation
    checked, plain, flagged = shipped.predict_datasets([without, with_header, upside_down], heatmap=False)
    assert "turn_check" not in plain.timings_ms and not plain.looks_turned  # the header says: no extra cost
    assert "turn_check" in checked.timings_ms and not checked.looks_turned
    assert flagged.better_turn == 2


def test_cli_classify_reads_a_file_as_the_console_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``cxr-node classify`` goes through the same path as the console: an upside-down picture is flagged."""
    from classifier import cli

    picture = Image.fromarray(display_image(pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))))
    path = tmp_path / "chest.png"
    picture.transpose(Image.Transpose.ROTATE_180).save(path)
    assert cli.main(["classify", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out.strip())["better_turn"] == 2
    assert cli.main(["classify", str(path)]) == 0
    assert "wrong-way-up" in capsys.readouterr().out
