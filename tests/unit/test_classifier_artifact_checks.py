"""What a model artifact and its inputs are checked for before a prediction is believed (review findings):
a novelty check fitted for another network, a head that is not a softmax, repeated class names, damaged
check files, and inputs with nothing to read (blank, thumbnail-sized, not finite)."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from classifier import cli
from classifier.artifact import read_metadata, sha256_file
from classifier.errors import ModelArtifactError, UnsupportedImageError
from classifier.inference import Classifier, default_model_path
from classifier.novelty import NOVELTY_FILE, FeatureDensity, NoveltyCheck

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier.load(default_model_path())


def _copy_of_the_shipped_model(target: Path) -> tuple[Path, dict[str, Any]]:
    shutil.copytree(default_model_path(), target)
    return target, json.loads((target / "model.json").read_text())


def _density(features: int) -> FeatureDensity:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(features, 2)))[0]
    return FeatureDensity(means=rng.normal(size=(3, features)), basis=basis, weights=np.array([0.5, 0.2]),
                          isotropic=1.0)


def test_a_novelty_check_fitted_for_another_network_is_refused_at_load(tmp_path: Path) -> None:
    """A 10-feature density beside a 1,472-feature network loaded, then every prediction failed with a
    ValueError and the pipeline marked every image FAILED."""
    folder, metadata = _copy_of_the_shipped_model(tmp_path / "model")
    _density(10).save(folder / NOVELTY_FILE)
    del metadata["novelty"]["presentation_probe"]
    metadata["novelty"]["sha256"] = sha256_file(folder / NOVELTY_FILE)
    (folder / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelArtifactError, match="reads 10 features, the model gives 1472"):
        Classifier.load(folder)


def test_a_head_that_is_not_a_dense_softmax_is_refused_at_load(tmp_path: Path) -> None:
    """A sigmoid head loaded and then failed every prediction (and its outputs would not sum to 1)."""
    import keras

    inputs = keras.Input((32, 32, 3))
    features = keras.layers.Conv2D(4, 3, name="features")(inputs)
    outputs = keras.layers.Dense(3, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(features))
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    metadata = json.loads((default_model_path() / "model.json").read_text())
    preprocessing = {**metadata["preprocessing"], "input_size": [32, 32]}
    metadata.update(input_size=[32, 32], preprocessing=preprocessing, gradcam_layer="features",
                    sha256=sha256_file(tmp_path / "model.keras"))
    del metadata["novelty"]
    (tmp_path / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelArtifactError, match="not a dense softmax"):
        Classifier.load(tmp_path)


@pytest.mark.parametrize("classes", [["covid", "covid", "pneumonia"], ["covid", "Normal", "normal"],
                                     "cnp", ["covid", "", "pneumonia"]])
def test_model_json_classes_must_be_distinct_names(tmp_path: Path, classes: object) -> None:
    """Two classes of one name collapsed their probabilities into one dictionary entry: "covid" 0.17
    where the model said 0.73; a string was read letter by letter as three classes."""
    metadata = json.loads((default_model_path() / "model.json").read_text())
    (tmp_path / "model.keras").symlink_to(default_model_path() / "model.keras")
    (tmp_path / "model.json").write_text(json.dumps({**metadata, "classes": classes}))
    with pytest.raises(ModelArtifactError, match="not a list of distinct names"):
        read_metadata(tmp_path)


def test_damaged_novelty_files_are_refused_as_model_errors(tmp_path: Path) -> None:
    """A truncated file escaped as zipfile.BadZipFile, a density of NaN loaded and never called an image
    unfamiliar, and a record without a sha256 was not checked at all."""
    _density(6).save(tmp_path / NOVELTY_FILE)
    whole = (tmp_path / NOVELTY_FILE).read_bytes()
    record = {"file": NOVELTY_FILE, "threshold": 2.0}
    with pytest.raises(ModelArtifactError, match="records no sha256"):
        NoveltyCheck.load(tmp_path, record)
    (tmp_path / NOVELTY_FILE).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelArtifactError, match="not a feature density"):
        NoveltyCheck.load(tmp_path, {**record, "sha256": sha256_file(tmp_path / NOVELTY_FILE)})
    nan = _density(6)
    FeatureDensity(nan.means, nan.basis, nan.weights, float("nan")).save(tmp_path / NOVELTY_FILE)
    with pytest.raises(ModelArtifactError, match="not finite"):
        NoveltyCheck.load(tmp_path, {**record, "sha256": sha256_file(tmp_path / NOVELTY_FILE)})


@pytest.mark.parametrize(
    ("picture", "reason"),
    [
        (Image.new("L", (300, 300), 0), "blank"),
        (Image.new("L", (300, 300), 200), "blank"),
        (Image.new("L", (1, 1), 0), "too small"),
        (Image.fromarray(np.tile(np.arange(20, dtype=np.uint8) * 12, (400, 1))), "too small"),
    ],
)
def test_a_blank_or_thumbnail_picture_is_refused(
    shipped: Classifier, picture: Image.Image, reason: str
) -> None:
    """A black square was called COVID-19 at 0.73; only the novelty check, 4 % over its limit, doubted it."""
    with pytest.raises(UnsupportedImageError, match=reason):
        shipped.predict_images([picture], heatmap=False)


def test_a_blank_dicom_image_is_refused(shipped: Classifier) -> None:
    path = get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        pytest.fail("pydicom-data's RG1_UNCI.dcm is not installed (a dependency of the test extra)")
    ds = pydicom.dcmread(path)
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, dtype=np.uint16).tobytes()
    with pytest.raises(UnsupportedImageError, match="blank"):
        shipped.predict_datasets([ds], heatmap=False)


def test_model_inputs_must_be_finite_and_may_come_stacked(shipped: Classifier) -> None:
    """NaN in gave NaN probabilities labelled "indeterminate" with no doubt; an N×H×W×3 array raised
    "truth value of an array is ambiguous"."""
    height, width = shipped.spec.input_size
    stacked = np.full((2, height, width, 3), 0.5, dtype=np.float32)
    assert len(shipped.predict(stacked, heatmap=False)) == 2  # type: ignore[arg-type]
    assert shipped.embed(stacked).shape == (2, 1472)  # type: ignore[arg-type]
    broken = stacked[0].copy()
    broken[0, 0, 0] = np.nan
    with pytest.raises(UnsupportedImageError, match="not finite"):
        shipped.predict([broken], heatmap=False)


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({"version": None}, "version None is not text"),
        ({"name": 7}, "name 7 is not text"),
        ({"format": True}, "model.json format True: this node reads format"),
        ({"novelty": []}, "novelty is not an object"),
        ({"sha256": "not-a-digest"}, "sha256 'not-a-digest' is not a hex digest"),
        ({"preprocessing": {"equalization": "histeq"}}, "unknown preprocessing keys"),
    ],
)
def test_a_mistyped_model_json_field_is_refused_not_converted(
    tmp_path: Path, change: dict[str, Any], refusal: str
) -> None:
    """``"version": null`` became the text "None" in every report, ``"format": true`` read as format 1,
    and ``"novelty": []`` turned the novelty, turn and negative checks off without a word."""
    folder, metadata = _copy_of_the_shipped_model(tmp_path / "model")
    for key, value in change.items():
        if key == "preprocessing":
            metadata[key] = {**metadata[key], **value}
        else:
            metadata[key] = value
    (folder / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelArtifactError, match=refusal):
        read_metadata(folder, verify=False)


def test_a_sha256_recorded_in_upper_case_matches(tmp_path: Path) -> None:
    """As PowerShell's Get-FileHash prints it: the right digest was refused as "does not match"."""
    folder, metadata = _copy_of_the_shipped_model(tmp_path / "model")
    metadata["sha256"] = sha256_file(folder / "model.keras").upper()
    (folder / "model.json").write_text(json.dumps(metadata))
    assert read_metadata(folder).sha256 == sha256_file(folder / "model.keras")


def test_a_model_json_nested_past_the_parser_s_reach_is_a_model_error(tmp_path: Path) -> None:
    folder, _ = _copy_of_the_shipped_model(tmp_path / "model")
    (folder / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelArtifactError, match="model.json is not valid JSON: maximum recursion depth"):
        read_metadata(folder)


def _rehash(folder: Path, metadata: dict[str, Any]) -> None:
    metadata["sha256"] = sha256_file(folder / "model.keras")
    (folder / "model.json").write_text(json.dumps(metadata))


@pytest.mark.parametrize("damage", ["no config.json", "config.json nested too deep"])
def test_a_model_file_keras_cannot_parse_is_an_artifact_error_and_one_line_from_the_cli(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A KeyError (no config.json) and a RecursionError escaped: the CLI printed a 34-line traceback and
    the console answered 500 (review)."""
    folder, metadata = _copy_of_the_shipped_model(tmp_path / "model")
    with zipfile.ZipFile(default_model_path() / "model.keras") as shipped_file:
        weights = shipped_file.read("model.weights.h5")
    with zipfile.ZipFile(folder / "model.keras", "w") as damaged:
        damaged.writestr("model.weights.h5", weights)
        if damage != "no config.json":
            damaged.writestr("config.json", "[" * 100_000 + "]" * 100_000)
    _rehash(folder, metadata)
    with pytest.raises(ModelArtifactError, match=r"model\.keras cannot be loaded: (KeyError|RecursionError)"):
        Classifier.load(folder)
    image = tmp_path / "grey.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(image)
    assert cli.main(["classify", "--model", str(folder), str(image)]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded" in err and "Traceback" not in err


def test_a_number_python_will_not_convert_in_model_json_is_an_artifact_error(tmp_path: Path) -> None:
    """An integer of 5,000 digits raised a plain ValueError (Python's limit on converting digits)."""
    folder, metadata = _copy_of_the_shipped_model(tmp_path / "model")
    text = json.dumps(metadata).replace('"format": 1', '"format": ' + "1" * 5000, 1)
    (folder / "model.json").write_text(text)
    with pytest.raises(ModelArtifactError, match="is not valid JSON"):
        read_metadata(folder)


def test_a_novelty_threshold_past_float_range_is_an_artifact_error(tmp_path: Path) -> None:
    """``"threshold": 1e400`` was refused, the integer 10**400 escaped as an OverflowError."""
    folder, metadata = _copy_of_the_shipped_model(tmp_path / "model")
    metadata["novelty"]["threshold"] = 10**400
    (folder / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelArtifactError, match="novelty threshold in model.json must be positive and finite"):
        Classifier.load(folder)


def test_a_model_file_renamed_in_between_the_hash_and_the_load_is_not_loaded_as_the_old_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retraining renames its new model.keras into place, then model.json. Renamed after the hash was
    checked and before Keras opened the file, the new weights were loaded under the old version (review).
    The bytes hashed are now the bytes loaded: the load is refused, or gets the old model."""
    import keras

    from classifier import inference

    folder, metadata = _copy_of_the_shipped_model(tmp_path / "model")
    retrained = tmp_path / "retrained.keras"
    keras.saving.load_model(folder / "model.keras", compile=False).save(retrained)  # same shapes, new bytes
    assert sha256_file(retrained) != metadata["sha256"]
    read = inference.read_metadata

    def read_then_renamed(path: Path, **options: bool) -> Any:
        found = read(path, **options)
        retrained.replace(folder / "model.keras")
        return found

    monkeypatch.setattr(inference, "read_metadata", read_then_renamed)
    with pytest.raises(ModelArtifactError, match="does not match the sha256 recorded in model.json"):
        Classifier.load(folder)


def test_a_temporary_folder_that_takes_no_working_copy_is_named_in_an_artifact_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model is loaded from a private copy of the bytes hashed; a temporary folder that could not take
    it (full, read-only, gone) was an OSError traceback naming neither it nor the model (review)."""
    gone = tmp_path / "no-tmp"
    monkeypatch.setattr(tempfile, "tempdir", str(gone))
    with pytest.raises(ModelArtifactError, match=f"model.keras cannot be loaded: no working copy in {gone}"):
        Classifier.load(default_model_path())
