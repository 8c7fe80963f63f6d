"""A folder of PNG/JPEG images: one sub-folder per class, or images at the top level.

Layout ``root/<class name>/**/<image>``: the classes are the sub-folders in sorted
order, label i is the i-th name, and their number must equal ``num_classes`` (so that
train and test agree on what each label means). With the images directly in ``root``
and no sub-folders the data is unlabelled. Files whose extension is not an image's, and
hidden files, are ignored. Examples are ordered by their path relative to ``root``
(so by class, then file name), which is the order ``limit`` takes them in.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
from PIL import Image

from dpjax.data import transforms
from dpjax.data.config import DataConfig
from dpjax.data.dataset import DataError, SourceData

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GREY_MODES = ("1", "L", "LA")
_CHUNK = 1024  # Files decoded per batch of thread-pool work; bounds wasted work on errors.


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(directory: str) -> list[str]:
    """Image files under ``directory`` (recursively), sorted, as absolute paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
    return sorted(found)


def list_files(root: str) -> tuple[list[str], list[int] | None, tuple[str, ...]]:
    """The image files of a folder dataset, their labels (None if unlabelled), classes.

    Raises:
      DataError: if ``root`` is missing, holds no images, mixes top-level images with
        class sub-folders, or has a class sub-folder without images.
    """
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        raise DataError(f"folder: {root} {what}.")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    top = [
        os.path.join(root, e)
        for e in entries
        if _is_image(e) and os.path.isfile(os.path.join(root, e))
    ]
    classes = tuple(e for e in entries if os.path.isdir(os.path.join(root, e)))
    if top and classes:
        raise DataError(
            f"folder: {root} holds both images ({os.path.basename(top[0])}, ...) and "
            f"sub-folders ({classes[0]}, ...). Put all images in class sub-folders "
            "(labelled) or all at the top level (unlabelled)."
        )
    if top:
        return top, None, ()
    files: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        in_class = _images_under(os.path.join(root, cls))
        if not in_class:
            raise DataError(
                f"folder: class sub-folder {os.path.join(root, cls)} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)})."
            )
        files.extend(in_class)
        labels.extend([label] * len(in_class))
    if not files:
        raise DataError(
            f"folder: {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no "
            "class sub-folders."
        )
    return files, labels, classes


def read_image(path: str, channels: int, crop: int, size: int) -> tuple[np.ndarray, str]:
    """Decodes one image file to uint8 (H, W, C), cropped and resized as asked.

    Args:
      path: the file.
      channels: 1 or 3 to convert; 0 keeps grey images grey and makes all others
        (palette, RGBA, CMYK...) RGB; an alpha channel is dropped.
      crop: centred square crop side (0 for none); size: output side (0 keeps).

    Returns:
      The image, and its original size as 'HxW' for error messages.

    Raises:
      DataError: naming the file, if it cannot be decoded or has 16-bit/float pixels.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataError(
                    f"{path}: {im.mode} images (16-bit or float pixels) are not supported; "
                    "convert them to 8-bit."
                )
            grey = im.mode in _GREY_MODES
            mode = {1: "L", 3: "RGB"}.get(channels, "L" if grey else "RGB")
            array = np.asarray(im.convert(mode), dtype=np.uint8)
            original = f"{im.height}x{im.width}"
    except DataError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...).
        raise DataError(f"{path}: cannot decode the image ({type(e).__name__}: {e}).") from e
    if array.ndim == 2:
        array = array[..., None]
    return transforms.center_crop_resize(array, crop, size, path), original


def load_folder(config: DataConfig) -> SourceData:
    """Reads an image folder (``config.path``, '{split}' substituted) into memory.

    Images are decoded in a thread pool, in a deterministic order. With
    ``config.num_classes`` > 0 the number of class sub-folders must equal it.

    Raises:
      DataError: for a missing path, a file that does not decode (naming it), images
        of different sizes without ``image_size``/``center_crop`` (naming two files and
        their sizes), or a class count different from ``num_classes``.
    """
    root = config.resolved_path()
    if not root:
        raise DataError("folder: set data.path to the image folder (it may contain '{split}').")
    files, labels, classes = list_files(root)
    if labels is not None and config.num_classes and len(classes) != config.num_classes:
        raise DataError(
            f"folder: {root} has {len(classes)} class sub-folders {list(classes)} but "
            f"data.num_classes={config.num_classes}."
        )
    if config.limit:
        files = files[: config.limit]
        labels = None if labels is None else labels[: config.limit]
    crop, size, channels = config.center_crop, config.image_size, config.channels

    def decode(path: str) -> tuple[np.ndarray | None, str]:
        try:
            return read_image(path, channels, crop, size)
        except DataError as e:  # Collected: one message names every bad file.
            return None, str(e)

    images: np.ndarray | None = None
    bad: list[str] = []
    first_file = ""
    first_size = ""
    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = (
            item
            for start in range(0, len(files), _CHUNK)
            for item in list(pool.map(decode, files[start : start + _CHUNK]))
        )
        for i, (image, original) in enumerate(decoded):
            if image is None:
                bad.append(original)
                continue
            if images is None:
                images = np.empty((len(files), *image.shape), np.uint8)
                first_size, first_file = original, files[i]
            if image.shape[:2] != images.shape[1:3]:
                raise DataError(
                    f"folder: images of different sizes in {root}: {first_file} is "
                    f"{first_size} (HxW) but {files[i]} is {original}. Set data.image_size "
                    "(and data.center_crop) to bring them to one size."
                )
            if image.shape[-1] != images.shape[-1]:
                # A mix of grey and colour files: grey ones become RGB (channel repeated).
                if images.shape[-1] == 1:
                    images = np.repeat(images, 3, axis=-1)
                else:
                    image = np.repeat(image, 3, axis=-1)
            images[i] = image
    if bad:
        raise DataError(
            f"folder: {len(bad)} of {len(files)} files in {root} cannot be read: "
            + " | ".join(bad[:5]) + (" | ..." if len(bad) > 5 else "")
            + ". Remove or repair them (dpjax never skips one silently: the data, and N in "
            "the privacy guarantee, would change)."
        )
    assert images is not None  # list_files never returns an empty list.
    return SourceData(
        images=images,
        labels=None if labels is None else np.asarray(labels, np.int32),
        name=f"folder:{root}",
        class_names=classes,
        cropped_and_resized=True,
    )
