"""glibc malloc thresholds for a process that receives multi-megabyte DICOM instances.

Every received instance passes through buffers of its own size and of the PDU size (128 KiB by
default): the PDUs, the assembled data set, the parsed pixel data. With glibc's defaults, allocations
from 128 KiB up are served by fresh ``mmap`` pages, and freed memory above 256 KiB at the top of the
heap is handed back to the kernel — so the next instance faults the same pages in again, each one
zeroed by the kernel first. Measured with four JPEG 2000 senders: 600–860 page faults per 4.3 MB
instance with the defaults, 83 with the thresholds below, and 2 ms less CPU per instance (15.2 → 12.9
and 16.4 → 14.2 ms in two paired runs).

The price is memory kept after a burst: up to :data:`TRIM_THRESHOLD` of free heap per malloc arena.
Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

LOGGER = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 * 1024 * 1024
"""Allocations below this come from the heap (32 MiB is glibc's upper limit on 64-bit systems)."""

TRIM_THRESHOLD = 128 * 1024 * 1024
"""Free memory at the top of a heap that glibc keeps instead of returning it to the kernel."""

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3


def tune_for_large_buffers() -> bool:
    """Apply the thresholds to this process (idempotent); ``True`` if glibc took them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        LOGGER.debug("mallopt not available: malloc thresholds left as they are")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        LOGGER.warning("glibc refused the malloc thresholds for large DICOM buffers")
        return False
    return True
