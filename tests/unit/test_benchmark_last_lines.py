"""A benchmark's last line is JSON a strict parser reads, and its figures say "not defined" as null:
label_noise and age_probe printed bare NaN, crossval ended in a TypeError or KeyError after the folds had
trained, and other_sources called the upper of the two middle values of an even count the median."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import crossval, label_noise, table
from benchmarks.age_probe import auc
from benchmarks.other_sources import score

pytestmark = pytest.mark.unit


def _strict(line: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"bare {constant}")

    return json.loads(line, parse_constant=refuse)


def test_the_last_line_says_an_undefined_figure_as_null() -> None:
    figures = {"auc": math.nan, "rows": [{"ratio": math.inf}, (1.5, -math.inf)], "n": 3, "name": "x"}
    assert _strict(table.json_line(figures)) == {
        "auc": None, "rows": [{"ratio": None}, [1.5, None]], "n": 3, "name": "x"
    }  # fmt: skip


def test_an_auc_without_positives_is_undefined_not_nan() -> None:
    assert auc([], [0.2, 0.4]) is None


def test_label_noise_with_nothing_adjudicated_gives_no_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "manifest.csv").write_text(
        "file,label,group,source\nimgs/n2.jpg,normal,g1,NIH/00000001_000.png\n", encoding="utf-8"
    )
    labels = tmp_path / "labels.csv.gz"
    with gzip.open(labels, "wt", encoding="utf-8") as handle:
        handle.write("Image Index,Airspace opacity\n00009999_000.png,YES\n")
    assert label_noise.main([str(tmp_path), str(labels)]) == 0
    out = capsys.readouterr().out.splitlines()
    result = _strict(out[-1])
    assert result["adjudicated"] == 0
    assert result["disagreement"] is None and result["disagreement_ci95"] is None
    assert "0 of 0 (—)" in out[-2]


def _fold(folder: Path, classes: list[str], covid_auc: float | None) -> None:
    folder.mkdir(parents=True)
    per_class: dict[str, Any] = {label: {"roc_auc": 0.9} for label in classes}
    if "covid" in per_class:
        per_class["covid"]["roc_auc"] = covid_auc  # training writes null without COVID in validation
    validation = {"images": 4, "accuracy": 0.5, "macro_f1": 0.5, "per_class": per_class,
                  "confusion_matrix": [[1, 1], [1, 1]]}  # fmt: skip
    (folder / "model.json").write_text(json.dumps({"validation": validation, "training": {}}))


@pytest.mark.parametrize(
    ("classes", "aucs"), [(["covid", "normal"], [None, 0.9]), (["normal", "pneumonia"], [None, None])]
)
def test_crossval_reports_folds_without_a_covid_auc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], classes: list[str], aucs: list[float | None]
) -> None:
    for fold, value in enumerate(aucs):
        _fold(tmp_path / "out" / f"fold{fold}", classes, value)
    argv = [str(tmp_path / "data"), str(tmp_path / "out"), "--folds", "2", "--report-only"]
    assert crossval.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    summary = _strict(out[-1])
    assert [row["covid_auc"] for row in summary["per_fold"]] == aucs
    assert "covid_auc" not in summary and "accuracy 0.500 ± 0.000, macro-F1 0.500 ± 0.000;" in out[-2]


def _prediction(p_covid: float) -> SimpleNamespace:
    return SimpleNamespace(
        probabilities={"covid": p_covid, "normal": 1.0 - p_covid}, unfamiliar=False, indeterminate=False,
        label="covid" if p_covid > 0.5 else "normal",
    )  # fmt: skip


class _Answers:
    """The classifier's answers, given: this test is of the benchmark's arithmetic, not of a model."""

    def __init__(self, p_covid: list[float]) -> None:
        self.p_covid = p_covid

    def predict_images(self, images: list[Any], heatmap: bool) -> list[SimpleNamespace]:
        return [_prediction(p) for p in self.p_covid]


def test_the_median_p_covid_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    items = [("a", "normal", None), ("b", "normal", None)]
    result = score(_Answers([0.011985, 0.007524]), "kermany", items)  # type: ignore[arg-type]
    assert result["median_p_covid"] == pytest.approx((0.011985 + 0.007524) / 2)


def test_a_receiver_that_did_not_store_everything_gets_no_rate() -> None:
    """Instances a second counted what was sent: a receiver that refused all 40 answered faster than one
    that stored them, and the ratio called it the quicker one."""
    from benchmarks.ingest import Measurement, figures, results_table

    results = [
        Measurement("uncompressed", 1, "node", 40, 2.0, 0, 40, complete=False),
        Measurement("uncompressed", 1, "storescp", 40, 4.0, 40, 0),
    ]
    summary = _strict(table.json_line(figures(results)))
    assert [run["instances_per_s"] for run in summary["runs"]] == [None, 10.0]
    assert summary["ratios"] == {}
    row = results_table(results).splitlines()[1].split()
    assert row[2] == table.MISSING and row[3] == "10.0"


def test_crossval_reads_an_epoch_whose_loss_went_nan_as_model_json_records_it() -> None:
    """model.json records such an epoch as null (JSON has no NaN); math.isfinite(None) was a TypeError."""
    history = {"val_loss": [None, 0.5, 0.7], "val_accuracy": [None, 0.6, 0.4]}
    assert crossval._epoch_accuracies(history) == (0.4, 0.6)
    assert crossval._epoch_accuracies({"val_loss": [0.5, None], "val_accuracy": [0.6, None]}) == (None, 0.6)


def test_ingest_exits_non_zero_when_a_receiver_did_not_store_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node that refused every instance got "—" for a rate, yet the benchmark exited 0 as after a
    good run: a script or CI job timing ingest took the run as measured."""
    from contextlib import contextmanager

    from benchmarks import ingest

    def receiver(port: int, stores: bool) -> Any:
        @contextmanager
        def start(_workdir: Path) -> Any:
            yield port, "ANY", lambda: 3 if stores else 0
        return start

    monkeypatch.setattr(ingest, "make_corpus", lambda _, n, folder: [folder / f"{i}.dcm" for i in range(n)])
    monkeypatch.setattr(ingest, "send", lambda paths, port, *_: (0.5, 1 if port == 1 else 0))
    monkeypatch.setitem(ingest.RECEIVERS, "node", receiver(1, stores=False))
    monkeypatch.setitem(ingest.RECEIVERS, "storescp", receiver(2, stores=True))
    argv = ["--count", "3", "--rounds", "1", "--senders", "1", "--kinds", "uncompressed",
            "--receivers", "node", "storescp", "--workdir", str(tmp_path)]  # fmt: skip
    assert ingest.main(argv) == 1
    captured = capsys.readouterr()
    assert _strict(captured.out.splitlines()[-1])["runs"][0]["instances_per_s"] is None
    assert "node stored 0 of 3" in captured.err


def test_ingest_s_median_of_an_even_number_of_rounds_is_the_mean_of_the_middle_two() -> None:
    """It was the faster of the middle two (``--rounds 2``: the best run), while the JSON said "median"."""
    from benchmarks.ingest import Measurement, _median

    runs = [Measurement("j2k", 1, "node", 40, seconds, 40, 0) for seconds in (4.0, 2.0, 1.0, 8.0)]
    assert _median(runs).per_second == pytest.approx((10.0 + 20.0) / 2)
    assert _median(runs[:3]).per_second == pytest.approx(20.0)
