"""benchmarks/classify.py: what its decode column times, and the options it refuses."""

from __future__ import annotations

import time

import pytest

from benchmarks import classify

pytestmark = pytest.mark.unit


def test_a_stage_timed_after_its_input_is_read_leaves_the_read_out() -> None:
    """The decode column timed read + decode (the read was half of it for RG1_UNCI), and so did the peer's:
    the ratio between them was understated."""
    def slow_read() -> int:
        time.sleep(0.02)
        return 1

    assert classify._median_ms_after(slow_read, lambda value: value + 1, repeats=3) < 5.0
    assert classify._median_ms(lambda: slow_read() + 1, repeats=3) >= 20.0


@pytest.mark.parametrize("repeats", ["0", "-2"])
def test_repeats_below_one_are_refused_before_the_model_loads(
    repeats: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--repeats 0 loaded the model, then failed with statistics' own error on an empty median."""
    with pytest.raises(SystemExit) as exit_status:
        classify.main(["--repeats", repeats, "--no-training", "--model", "/nonexistent"])
    assert exit_status.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
