"""benchmarks/crossval.py runs the folds as processes of its own (its table: test_benchmark_last_lines)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from benchmarks import crossval

pytestmark = pytest.mark.unit


def test_a_fold_that_fails_stops_the_folds_still_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The benchmark exited on the failed fold and left the other one training, pinned to a CPU, with no
    parent to report it: an hour of a shared machine's CPU for a figure nobody would see."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two folds at once need two CPUs")
    started = tmp_path / "fold1.pid"
    scripts = {
        0: f"import pathlib, sys, time\nwhile not pathlib.Path({str(started)!r}).exists(): time.sleep(0.05)\n"
           "sys.exit(1)",
        1: f"import os, pathlib, time\npathlib.Path({str(started)!r}).write_text(str(os.getpid()))\n"
           "time.sleep(120)",
    }  # fmt: skip

    def command(data: Path, output: Path, fold: int, *_: object) -> list[str]:
        return [sys.executable, "-c", scripts[fold]]

    monkeypatch.setattr(crossval, "_fold_command", command)
    with pytest.raises(SystemExit) as exit_status:
        crossval.main([str(tmp_path / "data"), str(tmp_path / "out"), "--folds", "2", "--jobs", "2"])
    assert "fold 0 failed (exit 1)" in str(exit_status.value.code)
    pid = int(started.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # stopped and reaped
    os.kill(pid, 9)  # what the benchmark left running (a child of this process: reaped here)
    os.waitpid(pid, 0)
    pytest.fail(f"fold 1 (pid {pid}) still running after the benchmark exited")


def test_report_only_names_a_fold_not_trained_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fold not trained (still training, or failed) ended the report in a FileNotFoundError traceback."""
    with pytest.raises(SystemExit) as exit_status:
        crossval.main([str(tmp_path / "data"), str(tmp_path / "out"), "--folds", "2", "--report-only"])
    message = str(exit_status.value.code)
    assert "fold 0" in message and "model.json" in message and "--only" in message
