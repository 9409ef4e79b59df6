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
from classifier.novelty import NOVELTY_FILE, FeatureDensity, NoveltyCheck, fit_density, fit_novelty
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
