"""A NumPy ``.npz`` file holding 'images' and, optionally, 'labels'.

'images' may be:
  * uint8 (N, H, W, C) with C in {1, 3}, or (N, H, W) (one channel is added);
  * another integer type whose values all lie in [0, 255] (converted losslessly);
  * floating point, only with ``data.float_range`` set: '0,1' reads [0, 1] ->
    round(255 x), '-1,1' reads [-1, 1] -> round(127.5 (x + 1)); a value outside the
    declared range (or a NaN/inf) is an error. The range is never guessed from the
    values: a rule chosen on the whole array (as this reader did before 2026-12-07)
    let one image with a negative pixel rescale every other image, so adding one
    example changed all N rows outside the DP guarantee (taint review).
Channels-first arrays (N, C, H, W) are rejected with a message saying so, rather than
guessed. 'labels', when present, must be integers of shape (N,). The file is opened
with ``allow_pickle=False``: it cannot run code.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from dpjax.data.config import DataConfig
from dpjax.data.dataset import DataError, SourceData


def to_uint8_images(images: np.ndarray, where: str, float_range: str = "") -> np.ndarray:
    """Converts an 'images' array to uint8 (N, H, W, C) by the rule in the module doc.

    Each output pixel depends on its own input value and the declared ``float_range``
    only, never on other images.

    Raises:
      DataError: naming ``where``, for a shape or dtype that the rule does not cover.
    """
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(
            f"{where}: 'images' must have shape (N, H, W, C) or (N, H, W), got {images.shape}."
        )
    if images.shape[-1] not in (1, 3):
        hint = ""
        if images.shape[1] in (1, 3):
            hint = " It looks channels-first (N, C, H, W): transpose it to (N, H, W, C)."
        raise DataError(
            f"{where}: 'images' must have 1 or 3 channels last, got shape {images.shape}.{hint}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{where}: the dataset is empty ('images' has shape {images.shape}).")
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.integer):  # (bool is not an integer type here)
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{where}: integer 'images' ({images.dtype}) must lie in [0, 255], found "
                f"[{lo}, {hi}]."
            )
        return images.astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating):
        if not float_range:
            raise DataError(
                f"{where}: 'images' are {images.dtype}: set data.float_range to '0,1' or "
                "'-1,1' (the range is not guessed from the values), or store uint8. A run "
                "without DP begun before this setting resumes with "
                "--config.data.float_range=... (accepted if the images read the same); a "
                "private one must be trained again (its steps scaled the images by a rule "
                "chosen on the whole array, outside the DP guarantee)."
            )
        if not np.isfinite(images).all():
            raise DataError(f"{where}: 'images' contains NaN or infinite values.")
        low = -1.0 if float_range == "-1,1" else 0.0
        outside = (images < low) | (images > 1.0)
        if outside.any():
            i = int(np.argmax(outside.reshape(len(images), -1).any(axis=1)))
            raise DataError(
                f"{where}: image {i} has values outside data.float_range [{float_range}] "
                f"(e.g. {float(images[i][outside[i]][0]):g})."
            )
        scaled = (images.astype(np.float64) - low) * (255.0 / (1.0 - low))
        return np.rint(scaled).astype(np.uint8)
    raise DataError(
        f"{where}: 'images' has dtype {images.dtype}; expected uint8, an integer type in "
        "[0, 255], or float with data.float_range set."
    )


def check_labels(labels: np.ndarray, num_images: int, where: str) -> np.ndarray:
    """Checks a 'labels' array (integers of shape (N,)) and returns it as int32.

    Raises:
      DataError: naming ``where``, for a wrong shape or dtype, or values outside int32.
    """
    if labels.ndim == 2 and labels.shape[0] == num_images and labels.shape[1] > 1:
        raise DataError(
            f"{where}: 'labels' has shape {labels.shape}; it looks one-hot. Store the class "
            "indices, shape (N,), e.g. labels.argmax(1)."
        )
    if labels.shape != (num_images,):
        raise DataError(
            f"{where}: 'labels' must have shape ({num_images},) to match 'images', "
            f"got {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        raise DataError(f"{where}: 'labels' must be integers, got dtype {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        i = int(np.argmax((labels < 0) | (labels > np.iinfo(np.int32).max)))
        raise DataError(f"{where}: label {int(labels[i])} at index {i} is out of range.")
    return labels.astype(np.int32)


def images_are_float(path: str) -> bool:
    """Whether the npz file at ``path`` holds floating-point 'images', read from the
    array's header only (no pixel is read).

    Raises:
      DataError: naming the file, when it is missing, not an npz archive, or has no
        readable 'images' array header.
    """
    try:
        with zipfile.ZipFile(path) as z, z.open("images.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            _, _, dtype = read_header(f)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read the header of its 'images' ({e}).") from e
    return bool(np.issubdtype(dtype, np.floating))


def check_float_range_from_start(
    data: Mapping[str, Any], dp_enabled: bool, path: str | None = None
) -> None:
    """Raises DataError for a private run whose stored data section (``data``, from its
    ``config.json``) predates ``data.float_range`` (the key is missing) on an npz file
    of float images (``path``: where the file is now, default the stored path).

    Such a run scaled every image by a rule chosen on the whole array (255 x if all values
    lay in [0, 1], else 127.5 (x + 1)): one added image with one pixel at -0.01 changed
    every other image (taint review, 2026-12-07). Its steps were not the stated DP
    mechanism, and declaring the range afterwards does not change the steps done, so it
    can be neither resumed nor exported nor composed as private. Integer images were read
    the same then and now: such a run passes, and so does a run without DP.
    """
    if not dp_enabled or "float_range" in data or data.get("source", "idx") != "npz":
        return
    where = DataConfig(path=path or str(data.get("path") or ""),
                       split=str(data.get("split") or "train")).resolved_path()
    try:
        floats = images_are_float(where)
    except DataError as e:
        raise DataError(
            f"This private run began before data.float_range existed, on npz data whose "
            f"images cannot be checked now ({e}). Had they been floats, the run would have "
            "scaled them by a rule chosen on the whole array, outside the DP guarantee; "
            "put the file back at its path so that it can be checked.") from None
    if floats:
        raise DataError(
            f"This private run began before data.float_range existed and read float images "
            f"from {where}: it scaled them by a rule chosen on the whole array (255 x if "
            "all values lay in [0, 1], else 127.5 (x + 1)), so one added image could "
            "rescale every other and its steps are outside the stated DP guarantee. It can "
            "be neither resumed nor exported nor composed as private: train it again in a "
            "new --workdir with --config.data.float_range='0,1' or '-1,1'.")


def load_npz(config: DataConfig) -> SourceData:
    """Reads ``config.path`` ('{split}' substituted), keeping the first ``limit`` rows.

    Raises:
      DataError: naming the file, when it is missing, not a valid npz, lacks 'images',
        or holds arrays of a wrong dtype or shape.
    """
    path = config.resolved_path()
    if not path:
        raise DataError("npz: set data.path to the .npz file (it may contain '{split}').")
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise DataError(f"npz: {path} {what}.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a valid .npz file ({type(e).__name__}: {e}).") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path}: holds a single array (.npy), not an .npz archive. Save with "
            "np.savez(path, images=..., labels=...)."
        )
    with loaded as f:
        keys = list(f.keys())
        if "images" not in keys:
            raise DataError(
                f"{path}: no array named 'images' (it holds {keys}). Save with "
                "np.savez(path, images=..., labels=...)."
            )
        try:
            images = f["images"]
            labels = f["labels"] if "labels" in keys else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"{path}: cannot read its arrays ({type(e).__name__}: {e}).") from e
    images = to_uint8_images(images, path, config.float_range)
    if labels is not None:
        labels = check_labels(labels, len(images), path)
    if config.limit:
        images = images[: config.limit]
        labels = None if labels is None else labels[: config.limit]
    return SourceData(images=images, labels=labels, name=f"npz:{path}")
