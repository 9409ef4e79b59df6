"""The real CR chest images benchmarks measure on: files of the PyPI package pydicom-data.

``RG1_UNCI.dcm`` (uncompressed) and ``RG1_J2KR.dcm`` (JPEG 2000 lossless) are the same CR chest film;
``RG3_UNCI.dcm`` is a second one. pydicom looks them up in the installed package and, with ``download=False``,
never reaches for the network (there is none on a hospital server).
"""

from __future__ import annotations

from pathlib import Path


class MissingTestData(SystemExit):
    """A benchmark's real image is not installed; the message says how to install it."""


def pydicom_data_file(name: str) -> Path:
    """The installed path of ``name``, or exit with a message naming the package that provides it."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise MissingTestData(
            f"{name} is not installed: it comes with the PyPI package pydicom-data (`make install-test` installs it)"
        )
    return Path(str(path))
