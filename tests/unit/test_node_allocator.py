"""The malloc thresholds the listener sets for multi-megabyte instances."""

from __future__ import annotations

import sys

import pytest

from dicom_node.allocator import tune_for_large_buffers

pytestmark = pytest.mark.unit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_glibc_takes_the_thresholds_and_a_second_call_is_harmless() -> None:
    assert tune_for_large_buffers() is True
    assert tune_for_large_buffers() is True
    big = bytearray(8 * 1024 * 1024)  # served from the heap now; must still work as memory
    big[-1] = 1
    assert big[-1] == 1
