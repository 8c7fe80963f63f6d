"""TensorFlow Datasets ('mnist', 'cifar10', 'celeb_a', ...) read into memory.

The reader is ``tfds.data_source``: random access to datasets prepared in the
``array_record`` format, which needs no TensorFlow (``pip install 'dpjax[tfds]'`` is
enough). Datasets prepared in TFDS's default ``tfrecord`` format are read with
``tfds.load`` instead when TensorFlow is installed; otherwise the error says how to
prepare an array_record copy. Nothing is downloaded unless ``data.tfds_download`` is
set. tensorflow_datasets is imported only when this source is used.

CelebA (``celeb_a``, 218x178): DPDM's released code (nv-tlabs/DPDM) has no CelebA
preparation step; its configs read a pre-made 32x32 or 64x64 image zip. The recipe in
common use for CelebA-32/64 in DP generative modelling is a centred 140x140 crop, then
a resize: set ``center_crop=140`` and ``image_size=32`` (or 64). DPDM's CelebA models
are unconditional (``num_classes=0``); gender-conditional variants (DP-MEPF, DP-LFlow)
use ``tfds_label_key='attributes/Male'`` with ``num_classes=2``.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from typing import Any

import numpy as np

from dpjax.data import transforms
from dpjax.data.config import DataConfig
from dpjax.data.dataset import DataError, SourceData

INSTALL = "pip install 'dpjax[tfds]'  (or: pip install tensorflow-datasets)"


def import_tfds() -> types.ModuleType:
    """Imports tensorflow_datasets, or raises DataError saying how to install it."""
    try:
        return importlib.import_module("tensorflow_datasets")
    except ImportError as e:
        raise DataError(
            f"data.source='tfds' needs tensorflow-datasets, which is not installed ({e}). "
            f"Install it with: {INSTALL}"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read(fetch, where: str, what: str):
    """``fetch()``; a failure while reading the prepared split (a corrupt or truncated
    record shard, an image that does not decode) becomes one DataError naming it."""
    try:
        return fetch()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - array_record and TF raise many kinds.
        raise DataError(
            f"{where}: reading {what} failed ({type(e).__name__}: {e}); the prepared files "
            "may be corrupt or incomplete: prepare the dataset again."
        ) from e


def _open(tfds: types.ModuleType, config: DataConfig, where: str) -> Any:
    """A random-access sequence of example dicts (numpy values) for the split."""
    data_dir = config.tfds_data_dir or None
    not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", ())
    try:
        return tfds.data_source(
            config.name, split=config.split, data_dir=data_dir, download=config.tfds_download
        )
    except not_found as e:
        raise DataError(f"{where}: {_first_line(e)} Check data.name.") from e
    except NotImplementedError as e:
        # Not prepared at all, or prepared as tfrecord (random access unsupported).
        try:
            builder = tfds.builder(config.name, data_dir=data_dir)
            prepared, builder_dir = builder.is_prepared(), builder.data_dir
        except Exception:  # Only used to word the message better.
            prepared, builder_dir = False, config.tfds_data_dir or "the TFDS data_dir"
        if not prepared:
            raise DataError(
                f"{where}: dataset is not prepared under {builder_dir}. Set "
                "data.tfds_download=True to download it, or prepare it once with "
                f"`tfds build {config.name} --file_format=array_record"
                f"{' --data_dir=' + config.tfds_data_dir if config.tfds_data_dir else ''}`."
            ) from e
        if importlib.util.find_spec("tensorflow") is not None:
            return _load_with_tensorflow(tfds, config, where)
        raise DataError(
            f"{where}: prepared under {builder_dir} in tfrecord format, which only "
            "TensorFlow can read. Either pip install tensorflow-cpu, or prepare an "
            f"array_record copy: `tfds build {config.name} --file_format=array_record`."
        ) from e
    except Exception as e:
        raise DataError(f"{where}: cannot open ({type(e).__name__}: {_first_line(e)}).") from e


def _load_with_tensorflow(tfds: types.ModuleType, config: DataConfig, where: str) -> list:
    """The split as a list of numpy example dicts, via tfds.load (needs TensorFlow)."""
    split = config.split if not config.limit else f"{config.split}[:{config.limit}]"
    try:
        ds = tfds.load(
            config.name,
            split=split,
            data_dir=config.tfds_data_dir or None,
            download=config.tfds_download,
            shuffle_files=False,
        )
        return list(tfds.as_numpy(ds))
    except Exception as e:
        raise DataError(f"{where}: tfds.load failed ({type(e).__name__}: {_first_line(e)}).") from e


def _get(example: dict, key: str, where: str) -> Any:
    """``example[key]``, where a '/' in ``key`` walks into nested feature dicts."""
    value: Any = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(
                f"{where}: examples have no feature {key!r} (at {part!r}, found {have}). "
                "Set data.tfds_image_key / data.tfds_label_key ('' for no labels)."
            )
        value = value[part]
    return value


def _class_names(source: Any, key: str) -> tuple[str, ...]:
    try:
        feature = source.dataset_info.features
        for part in key.split("/"):
            feature = feature[part]
        return tuple(feature.names)
    except Exception:  # Not a ClassLabel, or no info: names are optional.
        return ()


def load_tfds(config: DataConfig) -> SourceData:
    """Reads ``config.split`` of TFDS dataset ``config.name`` into memory.

    Images are taken from ``tfds_image_key``, centre-cropped and resized per
    ``center_crop``/``image_size``; labels from ``tfds_label_key`` (bools become 0/1)
    unless ``num_classes`` is 0 or the key is ''. The first ``limit`` examples of the
    split are read, in the split's stored order.

    Raises:
      DataError: if tensorflow-datasets is missing, the dataset is unknown or not
        prepared, or examples lack the image/label features or have mixed sizes.
    """
    tfds = import_tfds()
    where = f"tfds:{config.name} ({config.split})"
    source = _open(tfds, config, where)
    n = _read(lambda: len(source), where, "its length")
    n = n if not config.limit else min(config.limit, n)
    if n == 0:
        raise DataError(f"{where}: the split is empty.")
    label_key = config.tfds_label_key if config.num_classes else ""
    images: np.ndarray | None = None
    labels = np.zeros(n, np.int64)
    for i in range(n):
        example = _read(lambda i=i: source[i], where, f"example {i}")
        image = np.asarray(_get(example, config.tfds_image_key, where))
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise DataError(
                f"{where}: example {i}: {config.tfds_image_key!r} is {image.dtype} "
                f"{image.shape}, expected a uint8 (H, W, 1 or 3) image."
            )
        image = transforms.center_crop_resize(
            image, config.center_crop, config.image_size, f"{where}, example {i}"
        )
        if images is None:
            images = np.empty((n, *image.shape), np.uint8)
        if image.shape != images.shape[1:]:
            raise DataError(
                f"{where}: example 0 is {images.shape[1:]} but example {i} is {image.shape} "
                "(HxWxC). Set data.image_size to resize them to one size."
            )
        images[i] = image
        if label_key:
            label = np.asarray(_get(example, label_key, where))
            if label.ndim != 0 or not (
                np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_
            ):
                raise DataError(
                    f"{where}: example {i}: label {label_key!r} is {label.dtype} "
                    f"{label.shape}, expected an integer or bool scalar."
                )
            labels[i] = int(label)
    assert images is not None
    return SourceData(
        images=images,
        labels=labels if label_key else None,
        name=where,
        class_names=_class_names(source, label_key) if label_key else (),
        cropped_and_resized=True,
    )
