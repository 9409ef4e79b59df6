"""How the classifier's commands end when they cannot go on: an error line and exit status 2 for what the
user can correct, 130 and one line for Ctrl-C; never a traceback."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from classifier import cli
from dicom_node import cli as node_cli

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("restore_logging")]  # node_cli.main sets it


def test_several_architectures_with_members_is_an_option_error_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was ``raise SystemExit(text)``: the right words, but exit status 1."""
    code = cli.main(["train", str(tmp_path), str(tmp_path / "out"), "-a", "cxr-compact,sugandi-cnn",
                     "--members", "2"])
    assert code == 2
    assert "error: several architectures train one member each" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["train", "DATA", "OUT", "--fold", "0/5", "--validation-fraction", "0.3"],
         "argument --validation-fraction: not allowed with argument --fold"),
        (["train-lungs", "DATA", "MASKS", "OUT", "--fold", "0/5", "--validation-fraction", "0.3"],
         "argument --validation-fraction: not allowed with argument --fold"),
        (["train", "DATA", "OUT", "--members", "5", "--seeds", "1,2"],
         "argument --seeds: not allowed with argument --members"),
    ],
)
def test_options_of_which_one_would_be_ignored_are_refused_together(
    command: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fold holds out 1/K, so --validation-fraction beside it was dropped; with --seeds, --members was.
    Both ran with exit 0 (review)."""
    (tmp_path / "masks").mkdir()
    given = {"DATA": str(tmp_path), "OUT": str(tmp_path / "out"), "MASKS": str(tmp_path / "masks")}
    with pytest.raises(SystemExit) as exit_status:
        cli.main([given.get(part, part) for part in command])
    assert exit_status.value.code == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lung_epochs_without_the_masks_to_train_on_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It trained the classifier and used the number for nothing (review)."""
    code = cli.main(["train", str(tmp_path), str(tmp_path / "out"), "--lung-epochs", "5"])
    assert code == 2
    assert "error: --lung-epochs sets the epochs of the lung U-Net that --lung-masks trains" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["train", "DATA", "OUT", "--lung-masks", "MASKS"],
                                     ["train-lungs", "DATA", "MASKS", "OUT"]])
def test_a_missing_mask_folder_is_refused_before_anything_is_made(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was a FileNotFoundError traceback, after train had made its output folder."""
    given = {"DATA": str(tmp_path), "OUT": str(tmp_path / "out"), "MASKS": str(tmp_path / "no-masks")}
    with pytest.raises(SystemExit) as exit_status:
        cli.main([given.get(part, part) for part in command])
    assert exit_status.value.code == 2
    assert f"no folder {tmp_path / 'no-masks'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("main", [cli.main, node_cli.main])
def test_ctrl_c_ends_a_command_with_one_line_and_status_130(
    main: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_evaluate", interrupted)
    assert callable(main)
    try:
        code = main(["evaluate", str(tmp_path / "model"), str(tmp_path)])
    except KeyboardInterrupt:  # let through, it would stop the test session itself
        pytest.fail("Ctrl-C ended the command with a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize(("terminal", "options", "bar"), [(True, [], True), (True, ["--no-progress"], False),
                                                          (False, [], False)])
def test_the_progress_bar_is_drawn_only_on_a_terminal(
    terminal: bool, options: list[str], bar: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its carriage returns went into a log file too, where every per-epoch line then began inside a bar
    (review): an unattended run had to remember --no-progress."""
    import io

    from classifier import training

    class Stopped(Exception):
        pass

    asked: list[bool] = []

    def train(config: training.TrainingConfig, argv: list[str] | None = None) -> None:
        asked.append(config.progress)
        raise Stopped

    stderr = io.StringIO()
    monkeypatch.setattr(stderr, "isatty", lambda: terminal)
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setattr(training, "train", train)
    with pytest.raises(Stopped):
        cli.main(["train", str(tmp_path), str(tmp_path / "out"), "--no-novelty", *options])
    assert asked == [bar]


def test_the_command_recorded_is_the_one_main_was_given_not_the_process_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cli.main([...])`` from a script or notebook recorded in model.json the interpreter's own
    ``sys.argv`` (``cxr-node -m ipykernel_launcher -f ...``), not the training it ran (review)."""
    from classifier import training

    class Stopped(Exception):
        pass

    recorded: list[list[str] | None] = []

    def train(config: training.TrainingConfig, argv: list[str] | None = None) -> None:
        recorded.append(argv)
        raise Stopped

    monkeypatch.setattr(training, "train", train)
    monkeypatch.setattr("sys.argv", ["notebook.py", "-f", "kernel.json"])
    words = ["train", str(tmp_path), str(tmp_path / "out"), "--no-novelty", "--seed", "7"]
    with pytest.raises(Stopped):
        cli.main(words)
    assert recorded == [["cxr-node", *words]]
