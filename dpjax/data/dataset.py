"""The in-memory dataset every source produces, and its validation."""

from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
    """A dataset is missing, corrupt or inconsistent. The message says which and where."""


@dataclasses.dataclass(frozen=True)
class InMemoryDataset:
    """Images and labels held in host memory.

    Attributes:
      images: uint8 array (N, H, W, C).
      labels: int32 array (N,); all zeros for unlabelled data.
      num_classes: number of classes (0 for unlabelled data).
      name: a human-readable description of where the data came from.
      class_names: the name of each class, in label order, where the source knows
        them (sub-folder names, TFDS ClassLabel names); empty otherwise.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate(self.images, self.labels, self.num_classes, self.name)
        if self.class_names and len(self.class_names) != self.num_classes:
            raise DataError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]


def validate(images: np.ndarray, labels: np.ndarray, num_classes: int, name: str) -> None:
    """Raises DataError unless the arrays form a well-typed, non-empty labelled dataset."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataError(
            f"{name}: images must be a uint8 numpy array, got "
            f"{getattr(images, 'dtype', type(images).__name__)}."
        )
    if images.ndim != 4:
        raise DataError(f"{name}: images must have shape (N, H, W, C), got {images.shape}.")
    if images.shape[0] == 0:
        raise DataError(f"{name}: the dataset is empty.")
    if 0 in images.shape[1:3]:
        raise DataError(f"{name}: images of zero height or width: {images.shape}.")
    if images.shape[-1] not in (1, 3):
        raise DataError(f"{name}: images must have 1 or 3 channels, got shape {images.shape}.")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{name}: {images.shape[0]} images but labels of shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: labels must be integers, got {labels.dtype}.")
    if num_classes > 0:
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{name}: label {int(labels[i])} at index {i} is out of range "
                f"[0, {num_classes}) ({int(bad.sum())} labels out of range in all)."
            )


@dataclasses.dataclass(frozen=True)
class SourceData:
    """What a source reads, before ``dpjax.data.load`` applies the config to it.

    Attributes:
      images: uint8 array (N, H, W, C) with C in {1, 3}.
      labels: integer array (N,), or None when the source has no labels.
      name: where the data came from (a path, a TFDS name), used in every error message.
      class_names: class names in label order where the source knows them, else ().
      cropped_and_resized: True when the source already applied the config's
        ``center_crop`` and ``image_size`` (it must, per image, when its images may
        differ in size); ``load`` then does not apply them again.
    """

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    class_names: tuple[str, ...] = ()
    cropped_and_resized: bool = False
