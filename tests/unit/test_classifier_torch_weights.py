"""Reading PyTorch state dicts without PyTorch.

The fixtures were written by ``torch.save`` of PyTorch 2.13.0 (CPU), once in each of its formats:
``state_dict = {"conv.weight": arange(24).reshape(2, 3, 2, 2), "transposed": arange(12.).reshape(3, 4).t(),
"bn.num_batches_tracked": tensor(7), "half_view": arange(10, dtype=float16)[2:7]}``, and
``module_pickle.pt`` holds ``{"model": torch.nn.Linear(2, 2)}`` (a pickled module, not a state dict).
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from classifier.errors import WeightsUnavailableError
from classifier.torch_weights import check_hub_hash, load_state_dict

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


class _Storage:
    """What a checkpoint's pickle names as a storage: ("storage", type, key, device, elements)."""

    def __init__(self, kind: type, key: str, elements: int) -> None:
        self.kind, self.key, self.elements = kind, key, elements


class _Tensor:
    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.elements)
        return None


@pytest.fixture
def torch_names(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Stand-ins for the names torch.save pickles (torch.FloatStorage, torch._utils._rebuild_tensor_v2), so
    these tests can write checkpoints of any content without PyTorch; removed after each test."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for name in ("FloatStorage", "DoubleStorage"):
        kind = type(name, (), {})
        kind.__module__ = "torch"
        setattr(torch, name, kind)

    def _rebuild_tensor_v2(*args: Any) -> None: ...

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _zip_checkpoint(
    path: Path,
    state: Any,
    storages: dict[str, bytes],
    order: bytes = b"little",
    packing: int = zipfile.ZIP_STORED,
) -> Path:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", compression=packing) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", order)
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def _legacy_checkpoint(path: Path, state: Any, storages: dict[str, tuple[int, bytes]]) -> Path:
    buffer = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, buffer, protocol=2)
    _Pickler(buffer, protocol=2).dump(state)
    pickle.dump(list(storages), buffer, protocol=2)
    for count, data in storages.values():
        buffer.write(struct.pack("<q", count) + data)
    path.write_bytes(buffer.getvalue())
    return path


def test_a_checkpoint_written_big_endian_is_read_in_its_byte_order(
    torch_names: types.ModuleType, tmp_path: Path
) -> None:
    """torch.save records the writer's byte order and torch.load swaps; the reader took the bytes as
    little-endian and loaded 0, 4.6e-41, 9.0e-44, ... for arange(6) without a word."""
    values = np.arange(6, dtype=np.float32)
    state = OrderedDict(w=_Tensor(_Storage(torch_names.FloatStorage, "0", 6), 0, (2, 3), (3, 1), False, {}))
    path = _zip_checkpoint(tmp_path / "big.pt", state, {"0": values.astype(">f4").tobytes()}, order=b"big")
    loaded = load_state_dict(path)["w"]
    np.testing.assert_array_equal(loaded, values.reshape(2, 3))
    assert loaded.dtype == np.float32 and loaded.dtype.isnative


def test_a_legacy_checkpoint_holding_a_zip_signature_in_its_weights_is_read(
    torch_names: types.ModuleType, tmp_path: Path
) -> None:
    """zipfile.is_zipfile looks for a zip's end anywhere in the last 64 KiB: weights holding those four
    bytes made a legacy file a zip, refused. torch.load, like the reader now, goes by the first bytes."""
    data = bytearray(np.zeros(64, dtype="<f4").tobytes())
    data[100:104] = b"PK\x05\x06"
    state = OrderedDict(w=_Tensor(_Storage(torch_names.FloatStorage, "0", 64), 0, (64,), (1,), False, {}))
    path = _legacy_checkpoint(tmp_path / "legacy.pt", state, {"0": (64, bytes(data))})
    np.testing.assert_array_equal(load_state_dict(path)["w"], np.frombuffer(bytes(data), dtype="<f4"))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("storage-is-a-number", "a tensor is not storage, offset, size, stride"),
        ("size-is-a-number", "a tensor is not storage, offset, size, stride"),
        ("stride-0-view-of-10^14", "claim 100000000000000 elements"),  # a 364 TiB copy
        ("ordered-dict-of-a-number", "unreadable PyTorch checkpoint .TypeError"),
        ("legacy-count-past-the-end", "elements past the file's end"),
        ("bad-crc", "unreadable PyTorch checkpoint .BadZipFile"),
        ("stride-0-views-repeating-6-elements", "claim 3221225472 elements in all"),  # 12 GiB in a KB
        ("header-declaring-2^50-bytes", "unreadable PyTorch checkpoint .ValueError: expected 11258999068"),
        ("memo-slot-2^32", "memo slot is out of range"),
        ("deflated-member", "compressed or encrypted"),  # a 2 MB file unpacked to 2 GiB
        ("build-over-a-tensor", "sets the fields of a tensor"),
    ],
)
def test_a_malformed_checkpoint_is_a_weights_error_not_a_crash(
    torch_names: types.ModuleType, tmp_path: Path, case: str, reason: str
) -> None:
    """Each of these escaped as AttributeError, TypeError, MemoryError, OverflowError or BadZipFile, or
    was read: gigabytes for a few bytes, a tensor that was not an array, NaN weights from a damaged file."""
    kind, one = torch_names.FloatStorage, np.ones(6, dtype="<f4").tobytes()
    good = _Tensor(_Storage(kind, "0", 6), 0, (6,), (1,), False, {})
    tensor = {
        "storage-is-a-number": _Tensor(5, 0, (6,), (1,), False, {}),
        "size-is-a-number": _Tensor(_Storage(kind, "0", 6), 0, 6, (1,), False, {}),
        "stride-0-view-of-10^14": _Tensor(_Storage(kind, "0", 6), 0, (10**7, 10**7), (0, 0), False, {}),
        "stride-0-views-repeating-6-elements": [
            _Tensor(_Storage(kind, "0", 6), 0, (2**14, 2**14), (0, 0), False, {}) for _ in range(12)
        ],
        "build-over-a-tensor": _TensorWithFields(_Storage(kind, "0", 6), 0, (6,), (1,), False, {}),
    }
    path = tmp_path / "bad.pt"
    if case == "stride-0-views-repeating-6-elements":
        _zip_checkpoint(path, OrderedDict((f"w{i}", t) for i, t in enumerate(tensor[case])), {"0": one})
    elif case in tensor:
        _zip_checkpoint(path, OrderedDict(w=tensor[case]), {"0": one})
    elif case == "header-declaring-2^50-bytes":  # BINBYTES8 of 2**50 bytes: a 12-byte file
        path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**50) + b".")
    elif case == "memo-slot-2^32":  # None put in memo slot 2**32 - 16
        path.write_bytes(b"\x80\x02Nr\xf0\xff\xff\xff.")
    elif case == "deflated-member":
        _zip_checkpoint(path, OrderedDict(w=good), {"0": one}, packing=zipfile.ZIP_DEFLATED)
    elif case == "ordered-dict-of-a-number":
        _zip_checkpoint(path, _OrderedDictOf(5), {})
    elif case == "legacy-count-past-the-end":
        _legacy_checkpoint(path, OrderedDict(w=good), {"0": (2**62, one)})
    else:
        whole = _zip_checkpoint(tmp_path / "good.pt", OrderedDict(w=good), {"0": one})
        np.testing.assert_array_equal(load_state_dict(whole)["w"], np.ones(6, dtype=np.float32))
        flipped = bytearray(whole.read_bytes())
        flipped[flipped.index(one) + 2] ^= 0xFF  # inside the stored (uncompressed) storage member
        path.write_bytes(bytes(flipped))
    with pytest.raises(WeightsUnavailableError, match=reason):
        load_state_dict(path)


class _TensorWithFields(_Tensor):
    """A tensor whose pickle goes on to BUILD it with fields: its ``array`` method became a class."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.args, {"array": OrderedDict})


class _OrderedDictOf:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (OrderedDict, (self.value,))


def test_a_file_named_by_pytorch_hubs_convention_must_have_that_hash(tmp_path: Path) -> None:
    """The legacy format has no checksum: a damaged copy of efficientnet-lite0-57934424.pth loaded NaN
    weights. The start of the sha256 in the name is checked, as torch.hub does, where the project knows
    the file by that name; a name ending in a date or an epoch is read as it is."""
    import hashlib

    data = (FIXTURES / "state_dict_legacy.pt").read_bytes()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    right = tmp_path / f"weights-{prefix}.pth"
    right.write_bytes(data)
    check_hub_hash(right)
    wrong = tmp_path / f"weights-{'0' if prefix[0] != '0' else '1'}{prefix[1:]}.pth"
    wrong.write_bytes(data)
    with pytest.raises(WeightsUnavailableError, match=f"its sha256 begins {prefix}, not "):
        check_hub_hash(wrong)
    dated = tmp_path / "lite0-finetuned-20240315.pth"
    dated.write_bytes(data)
    assert set(load_state_dict(dated)) >= {"conv.weight"}


def test_an_expanded_buffer_and_a_non_finite_one_are_read_as_torch_saves_them(
    torch_names: types.ModuleType, tmp_path: Path
) -> None:
    """``register_buffer("w", torch.ones(3).expand(4, 3))`` saves 3 elements viewed as 4 × 3 (stride 0), and
    an attention mask may hold -inf: both are what torch.save writes, and were refused."""
    kind = torch_names.FloatStorage
    state = OrderedDict(
        w=_Tensor(_Storage(kind, "0", 3), 0, (4, 3), (0, 1), False, {}),
        mask=_Tensor(_Storage(kind, "1", 2), 0, (2,), (1,), False, {}),
    )
    storages = {"0": np.ones(3, dtype="<f4").tobytes(), "1": np.array([0, -np.inf], dtype="<f4").tobytes()}
    loaded = load_state_dict(_zip_checkpoint(tmp_path / "expanded.pt", state, storages))
    np.testing.assert_array_equal(loaded["w"], np.ones((4, 3), dtype=np.float32))
    np.testing.assert_array_equal(loaded["mask"], [0, -np.inf])
