"""Reading torch weight files without torch.

A TorchScript archive (``torch.jit.save``) or a ``torch.save`` state dict (zip or the
legacy format) is parsed with zipfile and a restricted unpickler that maps torch's
storage and rebuild functions to NumPy and refuses every other global, so loading a
file cannot run code.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C



class _TorchObject:
    """Stand-in for a pickled TorchScript module: keeps its attributes."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


class _Storage:
    """A torch storage: dtype, length, and (once read) its flat data."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor view into a storage, materialized once all storages are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> np.ndarray:
        data = self.storage.data
        if data is None or data.size < self.storage.numel:
            raise ValueError(f"storage {self.storage.key!r} is missing or truncated")
        size, stride = tuple(self.size), tuple(self.stride)
        if 0 in size:
            return np.zeros(size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(size, stride))
        if self.offset < 0 or min(stride, default=0) < 0 or last >= data.size:
            raise ValueError(f"tensor view out of bounds of storage {self.storage.key!r}")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], size, [s * data.itemsize for s in stride], writeable=False
        )
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *unused: data,
    ("torch._tensor", "_rebuild_from_type_v2"): lambda fn, typ, args, state: fn(*args),
    ("torch.nn.parameter", "Parameter"): _TorchObject,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_str: value,
}
for _kind in ("intlist", "doublelist", "boollist", "tensorlist", "stringlist"):
    _ALLOWED_GLOBALS[("torch.jit._pickle", f"build_{_kind}")] = list


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles torch's formats into plain Python + ``_TensorRef``; nothing else runs."""

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):  # TorchScript module classes.
            return type(name, (_TorchObject,), {})
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, dtype, key, _location, numel, *view = pid
        if view and view[0] is not None:
            raise pickle.UnpicklingError("legacy storage views are not supported")
        if key not in self._storages:
            self._storages[key] = _Storage(str(key), np.dtype(dtype), int(numel))
        return self._storages[key]


def _read_zip(path: pathlib.Path) -> tuple[Any, dict[str, _Storage]]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pickles = [n for n in names if n.split("/")[-1] == "data.pkl" and n.count("/") <= 1]
        if not pickles:
            raise ValueError("zip archive without data.pkl: not a torch file")
        prefix = pickles[0][: -len("data.pkl")]
        order = "little"
        if prefix + "byteorder" in names:
            order = zf.read(prefix + "byteorder").decode().strip()
        storages: dict[str, _Storage] = {}
        with zf.open(pickles[0]) as f:
            obj = _TorchUnpickler(f, storages).load()
        for s in storages.values():
            raw = zf.read(f"{prefix}data/{s.key}")  # Checks the zip CRC.
            s.data = np.frombuffer(raw, s.dtype.newbyteorder("<" if order == "little" else ">"))
    return obj, storages


def _read_legacy(path: pathlib.Path) -> tuple[Any, dict[str, _Storage]]:
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        if _TorchUnpickler(f, storages).load() != _LEGACY_MAGIC:
            raise ValueError("neither a zip archive nor a legacy torch file")
        _TorchUnpickler(f, storages).load()  # Protocol version.
        sys_info = _TorchUnpickler(f, storages).load()
        obj = _TorchUnpickler(f, storages).load()
        order = "<" if sys_info.get("little_endian", True) else ">"
        for key in _TorchUnpickler(f, storages).load():
            s = storages[str(key)]
            numel = int.from_bytes(f.read(8), "little")
            raw = f.read(numel * s.dtype.itemsize)
            s.data = np.frombuffer(raw, s.dtype.newbyteorder(order))
    return obj, storages


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    items = obj.items() if isinstance(obj, Mapping) else vars(obj).items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, _TensorRef):
            out[name] = value.materialize()
        elif isinstance(value, (_TorchObject, Mapping)):
            _flatten(value, name + ".", out)


def read_torch_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a torch file (TorchScript archive or state dict).

    Args:
      path: a ``torch.jit.save`` archive, or a ``torch.save`` state dict in the zip or
        the legacy format.

    Returns:
      Dotted name (``net.layers.conv.weight``, ``Mixed_5b.branch1x1.conv.weight``) ->
      array in native byte order.

    Raises:
      ValueError: if the file cannot be parsed as a torch file.
    """
    path = pathlib.Path(path)
    try:
        reader = _read_zip if zipfile.is_zipfile(path) else _read_legacy
        obj, _ = reader(path)
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        tensors: dict[str, np.ndarray] = {}
        _flatten(obj, "", tensors)
    except OSError:
        raise
    except Exception as e:  # Any parse failure of a corrupt or foreign file.
        raise ValueError(f"Cannot read {path} as a torch weights file: {e}") from e
    return {k: v.astype(v.dtype.newbyteorder("=")) for k, v in tensors.items()}
