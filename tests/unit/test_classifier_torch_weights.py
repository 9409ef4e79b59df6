"""Reading PyTorch state dicts without PyTorch.

The fixtures were written by ``torch.save`` of PyTorch 2.13.0 (CPU), once in each of its formats:
``state_dict = {"conv.weight": arange(24).reshape(2, 3, 2, 2), "transposed": arange(12.).reshape(3, 4).t(),
"bn.num_batches_tracked": tensor(7), "half_view": arange(10, dtype=float16)[2:7]}``, and
``module_pickle.pt`` holds ``{"model": torch.nn.Linear(2, 2)}`` (a pickled module, not a state dict).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from classifier.errors import WeightsUnavailableError
from classifier.torch_weights import load_state_dict

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["state_dict_zip.pt", "state_dict_legacy.pt"])
def test_both_torch_save_formats_give_the_same_arrays(name: str) -> None:
    state = load_state_dict(FIXTURES / name)
    assert list(state) == ["conv.weight", "transposed", "bn.num_batches_tracked", "half_view"]
    np.testing.assert_array_equal(state["conv.weight"], np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2))
    assert state["conv.weight"].dtype == np.float32
    np.testing.assert_array_equal(state["transposed"], np.arange(12.0).reshape(3, 4).T)  # a strided view
    assert state["bn.num_batches_tracked"].dtype == np.int64 and int(state["bn.num_batches_tracked"]) == 7
    np.testing.assert_array_equal(state["half_view"], np.arange(2, 7, dtype=np.float16))  # an offset view
    assert state["half_view"].dtype == np.float16
    state["transposed"][0, 0] = 99.0  # arrays are writable copies, not views of the file's buffer


def test_a_pickled_module_is_refused_not_executed() -> None:
    with pytest.raises(WeightsUnavailableError, match="not a plain state dict: .*torch.nn"):
        load_state_dict(FIXTURES / "module_pickle.pt")


def test_missing_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_state_dict(tmp_path / "absent.pth")
    foreign = tmp_path / "foreign.pth"
    foreign.write_bytes(b"\x80\x04K\x01.")  # a pickle of the integer 1
    with pytest.raises(WeightsUnavailableError, match="bad magic number"):
        load_state_dict(foreign)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((FIXTURES / "state_dict_legacy.pt").read_bytes()[:200])
    with pytest.raises(WeightsUnavailableError, match="unreadable"):
        load_state_dict(truncated)


def test_a_legacy_header_that_calls_code_is_refused_not_executed(tmp_path: Path) -> None:
    """The legacy format's magic-number, protocol, system-info and key pickles are read without resolving
    any name: a pickle whose first object is ``open(marker, "w")`` must neither create the marker nor load."""
    marker = tmp_path / "created-by-the-pickle"
    checkpoint = tmp_path / "hostile.pth"
    checkpoint.write_bytes(pickle.dumps(_OpensAFile(str(marker))))
    with pytest.raises(WeightsUnavailableError, match="not a PyTorch checkpoint: a header refers to .*open"):
        load_state_dict(checkpoint)
    assert not marker.exists()


def test_a_tensor_larger_than_its_storage_is_refused(tmp_path: Path) -> None:
    """``conv.weight`` (24 floats) whose storage member was cut to 4 floats: a strided view over it would
    read memory outside the buffer (garbage or a segmentation fault), so the file is refused."""
    source = zipfile.ZipFile(FIXTURES / "state_dict_zip.pt")
    cut = tmp_path / "cut_storage.pt"
    with source, zipfile.ZipFile(cut, "w") as target:
        for member in source.infolist():
            data = source.read(member)
            target.writestr(member, data[:16] if member.filename.endswith("/data/0") else data)
    with pytest.raises(WeightsUnavailableError, match="reaches element 23 of 4"):
        load_state_dict(cut)


class _OpensAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))
