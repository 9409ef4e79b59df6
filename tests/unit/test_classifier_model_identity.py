"""A model's name and version go into every report as DICOM Long Strings (Manufacturer's Model Name and
Software Versions of the algorithm's equipment) and into the node's database, 64 characters each. A
67-character ensemble name (Lite1 and Lite2 beside the shipped pair) and the 90-character version
``cxr-node ensemble`` made for it loaded without complaint; then every study failed to build its SR
(review). They are refused at load, generated to fit, and a ``--version`` is checked before training."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from classifier import cli
from classifier.artifact import ArtifactMetadata, read_metadata
from classifier.ensemble import _architectures, _default_version, _ensemble_name, _member_version
from classifier.errors import ModelArtifactError, OptionError
from classifier.inference import default_model_path
from classifier.training import TrainingConfig, check_recipe_options
from classifier.types import IDENTITY_MAX_CHARS, identity_problem

pytestmark = pytest.mark.unit

LITES = ["cxr-compact", *(f"efficientnet-lite{variant}-transfer" for variant in range(3))]


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("name", "+".join(LITES[:3]), "is 67 characters long, more than the 64 a DICOM report can carry"),
        ("version", "x" * 65, "is 65 characters long"),
        ("version", "cxr-duo\\2", "holds a backslash or a control character"),
        ("version", "cxr-duo-2\n", "holds a backslash or a control character"),
        ("name", " ", "is empty"),
    ],
)
def test_a_name_or_version_no_report_can_carry_is_refused_at_load(
    key: str, value: str, why: str, tmp_path: Path
) -> None:
    data = json.loads((default_model_path() / "model.json").read_text())
    data[key] = value
    (tmp_path / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelArtifactError, match=f"the model {key} .* {why}"):
        read_metadata(tmp_path)


def test_the_shipped_model_s_identity_fits() -> None:
    metadata: ArtifactMetadata = read_metadata(default_model_path())
    assert identity_problem(metadata.name) is None and identity_problem(metadata.version) is None


def test_an_ensemble_s_generated_name_and_version_fit_a_report() -> None:
    created = datetime(2026, 12, 7, 9, 30, tzinfo=UTC)
    assert _ensemble_name(LITES[:2]) == "cxr-compact+efficientnet-lite0-transfer"
    assert _ensemble_name(LITES[:3]) == "cxr-compact+efficientnet-lite0-transfer+1 more"
    assert _ensemble_name(LITES) == "cxr-compact+efficientnet-lite0-transfer+2 more"
    assert _ensemble_name(["n" * 64, "m"]) == "ensemble of 2"
    assert _default_version(_ensemble_name(LITES[:2]), 2, created) == (
        "cxr-compact+efficientnet-lite0-transfer-ensemble2-202612070930"
    )
    assert _default_version(_ensemble_name(LITES), 4, created) == "ensemble4-202612070930"
    assert _member_version("v" * 60, "efficientnet-lite0-transfer", 7) == (
        "member-efficientnet-lite0-transfer-seed7"
    )
    assert _member_version("site-2", "cxr-compact", 1) == "site-2-cxr-compact-seed1"
    for parts in (LITES[:1], LITES[:2], LITES[:3], LITES, ["n" * 64] * 2):
        name = _ensemble_name(parts)
        assert len(name) <= IDENTITY_MAX_CHARS
        assert len(_default_version(name, len(parts), created)) <= IDENTITY_MAX_CHARS


@pytest.mark.parametrize("command", ["train", "ensemble"])
def test_a_version_no_report_can_carry_is_refused_before_anything_runs(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, str(tmp_path / "data"), str(tmp_path / "out")]
    if command == "ensemble":
        argv = [command, str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(SystemExit) as stopped:
        cli.main([*argv, "--version", "v" * 65])
    assert stopped.value.code == 2
    assert "is 65 characters long" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_training_config_s_version_is_checked_before_the_training(tmp_path: Path) -> None:
    config = TrainingConfig(
        data=tmp_path, output=tmp_path / "out", architecture="cxr-compact", version="a\\b"
    )
    with pytest.raises(OptionError, match=re.escape("the version 'a\\\\b' holds a backslash")):
        check_recipe_options(config)


def test_an_ensemble_of_shortened_ensembles_is_named_by_its_networks() -> None:
    """Two ensembles named "...+2 more" merged into "...+2 more+1 more": the shortened names were split at
    "+" and "2 more" counted as a member (review)."""
    first = [{"architecture": name} for name in LITES]
    second = [{"architecture": "resnet152-transfer"}, {"architecture": "cxr-compact"}]
    names = _architectures([first, second])
    assert names == [*LITES, "resnet152-transfer"]
    assert _ensemble_name(names) == "cxr-compact+efficientnet-lite0-transfer+3 more"
