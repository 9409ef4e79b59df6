"""The benchmarks' counts and seeds are checked by the classifier CLI's own argparse types before any
work starts. Before, ``--rounds 0`` or ``--repeats 0`` ended in statistics' error on an empty median
after the set-up (100,000 studies written, a model loaded), ``crossval --jobs 0`` waited for a fold
before starting any (ChildProcessError), more jobs than CPUs ran out of CPUs to pin them to
(StopIteration), and a negative seed failed in a fold's log instead of on the command line."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import import_module

import pytest

pytestmark = pytest.mark.unit

CASES = [
    ("classify", ["--no-training", "--model", "/nonexistent"], "--repeats", "0"),
    ("classify", ["--no-training", "--model", "/nonexistent"], "--repeats", "-2"),
    ("calibration", ["/nonexistent-model", "/nonexistent-data"], "--repeats", "0"),
    ("calibration", ["/nonexistent-model", "/nonexistent-data"], "--seed", "-1"),
    ("console_scale", ["--work", "/nonexistent"], "--rounds", "0"),
    ("crossval", ["/nonexistent-data", "/nonexistent-output"], "--folds", "1"),
    ("crossval", ["/nonexistent-data", "/nonexistent-output"], "--jobs", "0"),
    ("crossval", ["/nonexistent-data", "/nonexistent-output"], "--seed", "-1"),
    ("e2e", [], "--studies", "0"),
    ("ingest", [], "--count", "0"),
    ("ingest", [], "--senders", "0"),
    ("ingest", [], "--rounds", "-3"),
]


def _main(name: str) -> Callable[[list[str]], int]:
    main: Callable[[list[str]], int] = import_module(f"benchmarks.{name}").main
    return main


@pytest.mark.parametrize(("name", "required", "option", "value"), CASES)
def test_a_count_or_seed_out_of_range_is_refused_before_any_work(
    name: str, required: list[str], option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_status:
        _main(name)([*required, option, value])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}" in error
    assert "less than" in error


@pytest.mark.parametrize("name", ["classify", "ingest"])
def test_a_count_that_is_not_a_whole_number_says_so(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    option = "--repeats" if name == "classify" else "--count"
    with pytest.raises(SystemExit):
        _main(name)([option, "2.5"])
    assert "'2.5' is not a whole number" in capsys.readouterr().err


def test_crossval_refuses_more_jobs_than_it_has_cpus_to_pin_them_to(
    capsys: pytest.CaptureFixture[str],
) -> None:
    jobs = len(os.sched_getaffinity(0)) + 1
    with pytest.raises(SystemExit) as exit_status:
        _main("crossval")(["/nonexistent-data", "/nonexistent-output", "--jobs", str(jobs)])
    assert exit_status.value.code == 2
    assert f"--jobs: at most {jobs - 1}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "says"), [([], "expected at least one argument"), (["JPEG:30"], "JPEG:30")]
)
def test_evaluate_refuses_degradations_it_cannot_apply_before_the_model_loads(
    values: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No value ended in an IndexError after every degradation had run, an unknown one in a traceback
    after the model had loaded."""
    with pytest.raises(SystemExit) as exit_status:
        _main("evaluate")(["/nonexistent-model", "/nonexistent-data", "--degradations", *values])
    assert exit_status.value.code == 2
    assert says in capsys.readouterr().err


def test_calibration_refuses_to_cross_fit_a_single_group() -> None:
    """Its empty half was scored as 0.0 and averaged in: the 'before' figures came out halved."""
    import numpy as np

    from benchmarks.calibration import cross_fit

    probabilities = np.full((20, 3), 1 / 3)
    with pytest.raises(ValueError, match="two groups at least, not 1"):
        cross_fit(probabilities, np.zeros(20, dtype=np.int64), ["one"] * 20, repeats=2, seed=0)


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("classify", ["--no-training", "--repeats", "1", "--model", "/nonexistent-model"]),
        ("evaluate", ["/nonexistent-model", "/nonexistent-data", "--degradations", "none"]),
        ("calibration", ["/nonexistent-model", "/nonexistent-data"]),
        ("novelty", ["/nonexistent-model", "/nonexistent-data"]),
        ("orientation", ["/nonexistent-model", "/nonexistent-data"]),
        ("prior", ["/nonexistent-model", "/nonexistent-data"]),
    ],
)
def test_a_model_it_cannot_use_is_one_line_not_a_traceback(
    name: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped model folder ended in a ModelArtifactError traceback; cxr-classifier says it in a line."""
    assert _main(name)(argv) == 2
    assert capsys.readouterr().err.strip() == "error: no model.json in /nonexistent-model"
