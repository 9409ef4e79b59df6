"""How benchmarks find the real CR files of pydicom-data (benchmarks/testdata.py)."""

from __future__ import annotations

import pydicom
import pytest

from benchmarks.testdata import MissingTestData, pydicom_data_file
from tests.peers import pydicom_data_file as peer_file

pytestmark = pytest.mark.unit


def test_an_installed_file_is_found_and_is_the_cr_chest() -> None:
    peer_file("RG1_UNCI.dcm")  # skips (fails in CI) when pydicom-data is missing
    path = pydicom_data_file("RG1_UNCI.dcm")
    assert path.is_file()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.Modality == "CR"


def test_a_missing_file_exits_with_the_package_to_install() -> None:
    with pytest.raises(MissingTestData) as raised:
        pydicom_data_file("NO_SUCH_FILE_4711.dcm")
    assert "pydicom-data" in str(raised.value.code)
    assert isinstance(raised.value, SystemExit)
