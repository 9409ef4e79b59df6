"""The novelty check: its density is the stated Mahalanobis distance, it travels with the artifact, and
the shipped model tells a chest radiograph from a lower leg and a photograph."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps

from classifier.errors import ModelArtifactError
from classifier.inference import Classifier, default_model_path
from classifier.novelty import (
    NOVELTY_FILE,
    PRESENTATION_PROBE_FILE,
    PRESENTATIONS,
    FeatureDensity,
    LinearProbe,
    NoveltyCheck,
    Presentation,
    confirmed,
    fit_density,
    fit_novelty,
    fit_probe,
    presentations,
)
from classifier.preprocess import display_image, framed_model_input, pil_to_gray
from classifier.types import doubt_reason
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
    # a hand-edited model.json; true, "2.5" and " 7 " were read as 1.0, 2.5 and 7.0
    for threshold in (0, "high", [2.0], float("inf"), float("nan"), True, "2.5", " 7 ", None):
        with pytest.raises(ModelArtifactError, match="threshold"):
            NoveltyCheck.load(tmp_path, {**record, "threshold": threshold})
    for probe in ("probe.npz", [], False, 0, ""):  # the falsy ones turned the turn and negative checks off
        with pytest.raises(ModelArtifactError, match="presentation_probe"):
            NoveltyCheck.load(tmp_path, {**record, "presentation_probe": probe})
    with pytest.raises(ModelArtifactError, match="not in"):
        NoveltyCheck.load(tmp_path, {**record, "file": "elsewhere.npz"})


def test_a_check_file_that_does_not_hold_a_fitted_check_is_refused(tmp_path: Path) -> None:
    """Files whose sha256 was recorded anew (as a re-fit does) but whose content no fit writes: weights of 1
    or more made every distance negative, so no image was ever unfamiliar; a column of weights gave N×N
    ratios; a .npy array or a 1-D mean raised TypeError or IndexError instead of a model error; and a file
    outside the artifact folder was read."""
    features, labels = _features()
    density = fit_density(features, labels, rank=6)
    broken = {
        "weights-of-one-or-more": replace(density, weights=density.weights + 1.0),
        "a-column-of-weights": replace(density, weights=density.weights[:, None]),
        "one-dimensional-means": replace(density, means=density.means[0]),
    }
    for name, changed in broken.items():
        changed.save(tmp_path / f"{name}.npz")
        with pytest.raises(ModelArtifactError, match="inconsistent shapes|not positive in every direction"):
            FeatureDensity.load(tmp_path / f"{name}.npz")
    with (tmp_path / "array.npz").open("wb") as handle:
        np.save(handle, density.means)  # an array, not an archive of arrays, under the archive's name
    with pytest.raises(ModelArtifactError, match="is not a feature density"):
        FeatureDensity.load(tmp_path / "array.npz")
    probe = fit_probe(features, labels, 2)
    replace(probe, mean=probe.mean[:, None]).save(tmp_path / "probe.npz")
    with pytest.raises(ModelArtifactError, match="inconsistent shapes"):
        LinearProbe.load(tmp_path / "probe.npz", 2)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    density.save(outside / NOVELTY_FILE)
    from classifier.artifact import sha256_file

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    for name in (str(outside / NOVELTY_FILE), f"../elsewhere/{NOVELTY_FILE}"):
        record = {"file": name, "sha256": sha256_file(outside / NOVELTY_FILE), "threshold": 2.0}
        with pytest.raises(ModelArtifactError, match="not a file name in"):
            NoveltyCheck.load(artifact, record)


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
    probe_record = saved["presentation_probe"]
    assert (output / PRESENTATION_PROBE_FILE).is_file() and probe_record["file"] == PRESENTATION_PROBE_FILE
    assert 0.0 <= probe_record["validation"]["named_right"] <= 1.0
    assert len(probe_record["validation"]["named_right_by_presentation"]) == PRESENTATIONS
    assert probe_record["validation"]["images"] == saved["validation"]["images"]
    classifier = Classifier.load(output)
    assert classifier.novelty is not None and classifier.novelty.probe is not None
    pictures = sorted(collection.rglob("*.png"))[:4]
    predictions = classifier.predict_images([Image.open(p) for p in pictures], heatmap=False)
    with_maps = classifier.predict_images([Image.open(p) for p in pictures], heatmap=True)
    for plain, mapped in zip(predictions, with_maps, strict=True):
        assert plain.novelty is not None and plain.novelty > 0
        assert mapped.novelty == pytest.approx(plain.novelty, rel=1e-4)  # both paths read the same features
        assert "input_checks" in plain.timings_ms and 0 <= plain.better_turn <= 3

    from classifier.artifact import read_metadata, write_metadata

    metadata = read_metadata(output)  # fitted before the probe: no turn or negative check, and no error
    older_record = {k: v for k, v in saved.items() if k != "presentation_probe"}
    write_metadata(output, replace(metadata, novelty=older_record))
    older = Classifier.load(output)
    assert older.novelty is not None and older.novelty.probe is None
    unchecked = older.predict_images([Image.open(pictures[0])], heatmap=False)[0]
    assert unchecked.better_turn == 0 and not unchecked.negative
    assert unchecked.novelty == pytest.approx(predictions[0].novelty, rel=1e-4)
    write_metadata(output, metadata)

    from classifier.evaluation import evaluate

    # A hospital's check on its own export says how many the node would skip: the images the node's own
    # checks doubt, by reason. Counted from the novelty score alone, it said 26 % where the node skipped all
    # of a set of inverted images (review).
    everything = sorted(collection.rglob("*.png"))
    inverted = collection.parent / f"{collection.name}-inverted"
    for path in everything:
        target = inverted / path.relative_to(collection)
        target.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(path).convert("L")).save(target)
    for folder in (collection, inverted):
        report = evaluate(output, folder)
        expected = [classifier.predict_file(path).doubt is not None for path in sorted(folder.rglob("*.png"))]
        assert report["images"] == 24 and report["doubted"]["images"] == sum(expected)
        assert report["doubted"]["fraction"] == pytest.approx(sum(expected) / 24)
        reasons = ("negative", "wrong-way-up", "unfamiliar")
        assert sum(report["doubted"][reason] for reason in reasons) == sum(expected)
    assert report["doubted"]["negative"] > 0  # the probe, fitted on 24 pictures, finds some of them inverted


def _presented_features(images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """12-dimensional features of ``images`` images in their eight presentations: each presentation shifts
    them its own way, and the images vary half as much as a shift along one feature: all of them together
    tell the presentation."""
    rng = np.random.default_rng(seed)
    shifts = np.random.default_rng(99).normal(size=(PRESENTATIONS, 12))
    images_at = rng.normal(size=(images, 1, 12)) * 0.5
    classes = np.tile(np.arange(PRESENTATIONS), images)
    noise = rng.normal(size=(images, PRESENTATIONS, 12)) * 0.2
    return (images_at + shifts[None] + noise).reshape(-1, 12), classes


def test_the_presentation_probe_names_turn_and_polarity_of_images_it_never_saw(tmp_path: Path) -> None:
    features, classes = _presented_features(100, seed=0)
    probe = fit_probe(features, classes, PRESENTATIONS, steps=300)
    held_out, held_classes = _presented_features(50, seed=1)
    named = presentations(probe, held_out)
    # class k + 4·i: turned k anticlockwise (so k back the other way), inverted when i
    expected = [Presentation(turn_back=(4 - c % 4) % 4, negative=bool(c >= 4)) for c in held_classes]
    assert np.mean([n == e for n, e in zip(named, expected, strict=True)]) > 0.97
    assert Presentation() == named[0] and named[0].as_trained
    probabilities = probe.probabilities(held_out)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)

    probe.save(tmp_path / PRESENTATION_PROBE_FILE)
    loaded = LinearProbe.load(tmp_path / PRESENTATION_PROBE_FILE, PRESENTATIONS)
    np.testing.assert_allclose(loaded.probabilities(held_out), probabilities, atol=1e-4)
    assert presentations(loaded, held_out) == named
    with pytest.raises(ModelArtifactError, match="4 classes"):
        LinearProbe.load(tmp_path / PRESENTATION_PROBE_FILE, 4)
    with pytest.raises(ValueError, match="dimensions"):
        loaded.probabilities(held_out[:, :5])
    with pytest.raises(ValueError, match="all 8 classes"):
        fit_probe(features[classes < 7], classes[classes < 7], PRESENTATIONS)

    from classifier.artifact import sha256_file

    density = fit_density(*_features(), rank=6)
    density.save(tmp_path / NOVELTY_FILE)
    entry = {"file": PRESENTATION_PROBE_FILE, "sha256": sha256_file(tmp_path / PRESENTATION_PROBE_FILE)}
    record = {
        "file": NOVELTY_FILE, "sha256": sha256_file(tmp_path / NOVELTY_FILE), "threshold": 2.0,
        "presentation_probe": entry,
    }  # fmt: skip
    check = NoveltyCheck.load(tmp_path, record)
    assert check.probe is not None and presentations(check.probe, held_out) == named
    assert NoveltyCheck.load(tmp_path, {**record, "presentation_probe": {}}).probe is None  # fitted before it
    with pytest.raises(ModelArtifactError, match="sha256"):
        NoveltyCheck.load(tmp_path, {**record, "presentation_probe": {**entry, "sha256": "0" * 64}})
    other = fit_probe(np.hstack([features, features]), classes, PRESENTATIONS, steps=5)
    other.save(tmp_path / PRESENTATION_PROBE_FILE)
    with pytest.raises(ModelArtifactError, match="different features"):
        NoveltyCheck.load(tmp_path, {**record, "presentation_probe": {**entry, "sha256": sha256_file(
            tmp_path / PRESENTATION_PROBE_FILE)}})


@pytest.mark.parametrize("l2", [0.01, 1.0, 30.0])
def test_the_probe_is_the_minimum_of_its_objective_even_on_strongly_correlated_features(l2: float) -> None:
    """A network's features are strongly correlated: on the shipped model's, λmax of the standardised Gram
    matrix is 112–175. A fixed step of 0.1 then overshoots (benchmarks/age_probe.py's probe oscillated
    without converging), so the fit must find its own step. Here 200 features share two factors (λmax ≈ 95):
    at the fitted probe the gradient of the mean cross-entropy + l2/2·‖W‖² is zero, for the weights and the
    bias, and the fit is deterministic."""
    rng = np.random.default_rng(3)
    factors = rng.normal(size=(300, 2))
    features = factors @ rng.normal(size=(2, 200)) + 0.3 * rng.normal(size=(300, 200))
    labels = (factors[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(np.int64) + (factors[:, 1] > 1.0)
    probe = fit_probe(features, labels, 3, l2=l2)
    standard = (features - probe.mean) / probe.scale
    assert np.linalg.eigvalsh(standard.T @ standard / len(standard))[-1] > 50  # the hard case
    residual = (probe.probabilities(features) - np.eye(3)[labels]) / len(labels)
    np.testing.assert_allclose(standard.T @ residual + l2 * probe.weights, 0.0, atol=1e-4)
    np.testing.assert_allclose(residual.sum(axis=0), 0.0, atol=1e-4)  # the bias is not penalised
    again = fit_probe(features, labels, 3, l2=l2)
    np.testing.assert_array_equal(again.weights, probe.weights)
    with pytest.raises(ValueError, match="at least one step"):
        fit_probe(features, labels, 3, steps=0)


def test_a_presentation_is_undone_by_inverting_then_turning_back() -> None:
    gray = np.random.default_rng(5).random((6, 9)).astype(np.float32)
    for k in range(4):
        for inverted in (False, True):
            shown = np.rot90(1.0 - gray if inverted else gray, k)
            presentation = Presentation(turn_back=(4 - k) % 4, negative=inverted)
            np.testing.assert_allclose(presentation.undo(shown), gray, atol=1e-6)


@pytest.mark.parametrize(
    ("named", "novelty", "novelty_undone", "expected"),
    [
        (Presentation(turn_back=2), 0.77, 0.58, (Presentation(turn_back=2), 0.77)),  # upside down, familiar
        (Presentation(turn_back=3), 1.22, 1.0, (Presentation(turn_back=3), 1.22)),  # on its side; limit
        (Presentation(negative=True), 0.95, 0.6, (Presentation(negative=True), 0.95)),  # a negative
        (Presentation(turn_back=1), 1.48, 1.18, (Presentation(), 1.48)),  # a photograph called turned
        # Familiar as given, but not presented as trained and unfamiliar undone: unlike the training images
        # both ways (the lower-leg CR upside down), so unfamiliar, with the larger novelty.
        (Presentation(turn_back=3, negative=True), 0.985, 1.4, (Presentation(), 1.4)),
    ],
)
def test_the_probe_is_believed_only_when_the_image_is_familiar_undone(
    named: Presentation, novelty: float, novelty_undone: float, expected: tuple[Presentation, float]
) -> None:
    assert confirmed(named, novelty, novelty_undone) == expected


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
    """A picture has no Patient Orientation: the turn probe names the turn of the hospital CR as a picture,
    an image from outside the training archive. Upside down it passes the novelty check (0.77) and was
    called indeterminate before the turn check; now it is flagged."""
    picture = Image.fromarray(display_image(pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))))
    prediction = shipped.predict_images([picture if transpose is None else picture.transpose(transpose)])[0]
    assert prediction.better_turn == turn and prediction.looks_turned == (turn != 0)
    assert "input_checks" in prediction.timings_ms and not prediction.negative
    # On its side the chest is unfamiliar as given too (1.14, 1.24); the reason names the turn, which is what
    # to fix, and says that as it is the image is unfamiliar.
    assert (prediction.doubt or "").startswith("the image looks the wrong way up") == (turn != 0)
    assert ("as it is, it does not look like" in (prediction.doubt or "")) == prediction.unfamiliar
    assert prediction.unfamiliar == (turn in (1, 3))


def test_a_leg_upside_down_is_unlike_a_chest_both_ways(shipped: Classifier) -> None:
    """The lower-leg CR as a picture, upside down, scores just under the limit as given (0.985), so the
    density alone lets it through. The probe reads it as not presented as trained, and undone it is
    unfamiliar: it is unlike the training images both ways, so it is refused as unfamiliar, with the
    larger novelty, and not called turned or a negative."""
    leg = Image.fromarray(display_image(pydicom.dcmread(peers.pydicom_data_file("RG3_UNCI.dcm"))))
    upside_down = leg.transpose(Image.Transpose.ROTATE_180)
    as_given = shipped.predict([framed_model_input(pil_to_gray(upside_down), shipped.spec, shipped.lungs)[0]])
    assert as_given[0].novelty is not None and 0.9 < as_given[0].novelty <= 1.0  # the density alone: passes
    prediction = shipped.predict_images([upside_down], heatmap=False)[0]
    assert prediction.unfamiliar and not prediction.looks_turned and not prediction.negative
    assert prediction.novelty is not None and prediction.novelty > 1.5
    assert (prediction.doubt or "").startswith("the image does not look like the chest radiographs")


def test_a_leg_that_looks_familiar_turned_or_inverted_is_not_called_a_chest() -> None:
    """The lower-leg CR as a picture, upright, is unfamiliar (1.22) but looks like an upside-down chest to the
    probe, and familiar that way (0.985); on its side it looks like a negative. The turn or the negative is
    still what a chest radiograph would need fixed, so the reason names it, but it does not say the image is
    a chest radiograph: it gives the novelty as it is and leaves that to the reader. A familiar image keeps
    the short words."""
    turned = doubt_reason(1.22, 2, False) or ""
    assert turned.startswith("the image looks the wrong way up: as it is, it does not look like the chest ")
    assert "(novelty 1.22, limit 1.00); turned upside down, it does; if it is a chest radiograph, " in turned
    negative = doubt_reason(2.21, 1, True) or ""
    assert negative.startswith("the image looks like a negative (bone dark, lungs light): as it is, it does")
    assert "; inverted and turned a quarter turn anticlockwise, it does; if it is a chest " in negative
    assert doubt_reason(0.77, 2, False) == (
        "the image looks the wrong way up: the model knows it better turned upside down; "
        "send it head up, or with a correct Patient Orientation"
    )
    assert (doubt_reason(0.95, 0, True) or "").startswith(
        "the image looks like a negative (bone dark, lungs light): the model knows it better inverted; check"
    )
    assert doubt_reason(1.22, 0, False) == (
        "the image does not look like the chest radiographs the model was trained on "
        "(novelty 1.22, limit 1.00)"
    )
    assert doubt_reason(0.5, 0, False) is None and doubt_reason(None, 0, False) is None
    # just over the limit is printed over it: 1.004 read "novelty 1.00, limit 1.00" (review)
    assert (doubt_reason(1.004, 0, False) or "").endswith("(novelty 1.01, limit 1.00)")


def test_a_photograph_is_unlike_a_chest_whichever_way_it_is_turned(shipped: Classifier) -> None:
    """The presentation probe answers for anything: it reads the espresso cup as an upside-down negative.
    Undone, the cup is still unfamiliar, so it is not called the wrong way up or a negative, and the reason
    stays the novelty check's; the same for the cat (1.89 as given)."""
    assert shipped.novelty is not None and shipped.novelty.probe is not None
    named = {}
    for name in ("imagenet_coffee.jpg", "imagenet_chelsea.jpg"):
        with Image.open(FIXTURES / name) as photo:
            prediction = shipped.predict_images([photo], heatmap=False)[0]
            features = shipped.embed([framed_model_input(pil_to_gray(photo), shipped.spec, shipped.lungs)[0]])
        assert prediction.unfamiliar and not prediction.looks_turned and not prediction.negative, name
        assert (prediction.doubt or "").startswith("the image does not look like the chest radiographs")
        named[name] = presentations(shipped.novelty.probe, features)[0]
    assert not named["imagenet_coffee.jpg"].as_trained  # the probe doubted it; undone, it is still unfamiliar


def test_a_dicom_image_is_turn_checked_as_its_patient_orientation_turns_it(shipped: Classifier) -> None:
    """The probe reads the image the model read: head up by its Patient Orientation when there is one. An
    upside-down image is flagged without a Patient Orientation, and also with one that says it is upright."""

    def rg1(*, upside_down: bool, orientation: bool) -> pydicom.Dataset:
        ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))  # L\F: head up as stored
        if upside_down:
            ds.PixelData = np.ascontiguousarray(np.rot90(ds.pixel_array, 2)).tobytes()
        if not orientation:
            del ds.PatientOrientation
        return ds

    as_stored, without, flagged, contradicted = shipped.predict_datasets(
        [
            rg1(upside_down=False, orientation=True),
            rg1(upside_down=False, orientation=False),
            rg1(upside_down=True, orientation=False),
            rg1(upside_down=True, orientation=True),  # a modality that turned the pixels, not the header
        ],
        heatmap=False,
    )
    assert not as_stored.looks_turned and not without.looks_turned
    assert all("input_checks" in p.timings_ms for p in (as_stored, without, flagged, contradicted))
    assert flagged.better_turn == 2 and contradicted.better_turn == 2


def test_a_negative_is_told_apart_from_the_header_and_from_the_pixels(shipped: Classifier) -> None:
    """RG1 is MONOCHROME1. With that label lost on the way it reaches the model as a negative, passes the
    novelty check (0.95) and used to be called covid; the negative check flags it. A picture inverted is
    flagged the same way; the image as stored, and the picture as shown, are not."""
    stored = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    assert stored.PhotometricInterpretation == "MONOCHROME1"
    relabelled = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    relabelled.PhotometricInterpretation = "MONOCHROME2"
    if "PresentationLUTShape" in relabelled:
        del relabelled.PresentationLUTShape
    as_stored, lost = shipped.predict_datasets([stored, relabelled], heatmap=False)
    assert not as_stored.negative and as_stored.doubt is None
    assert lost.negative and not lost.unfamiliar
    assert (lost.doubt or "").startswith("the image looks like a negative")
    picture = Image.fromarray(display_image(stored))
    shown, inverted = shipped.predict_images([picture, ImageOps.invert(picture)], heatmap=False)
    assert not shown.negative and inverted.negative


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


def test_the_fit_reads_a_dicom_image_as_inference_does(shipped: Classifier) -> None:
    """The density is fitted on the features of images read as the node reads them: a DICOM image reduced
    for the model's input size (224 px here), not for the 256 px default of ``load_gray``, which gives the
    hospital CR another box average (614 instead of 460 px) and another novelty score (0.5769 for 0.5762)."""
    from classifier.novelty import _degraded_grays
    from classifier.preprocess import gray_to_model_input, read_dataset

    path = peers.pydicom_data_file("RG1_UNCI.dcm")
    [gray] = _degraded_grays([path], "none", max(shipped.spec.input_size))
    assert shipped.novelty is not None
    fitted = shipped.novelty.ratios(shipped.embed([gray_to_model_input(gray, shipped.spec)]))[0]
    [read] = shipped.predict_datasets([read_dataset(path)], heatmap=False)
    assert read.novelty == pytest.approx(float(fitted), rel=1e-5)
