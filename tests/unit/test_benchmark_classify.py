"""benchmarks/classify.py: what its decode column times (its options: test_benchmark_arguments)."""

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
