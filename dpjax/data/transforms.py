"""Image preparation shared by the sources: centre crop, resize, channel conversion.

All functions take and return uint8 arrays and are deterministic. Resizing uses PIL's
Lanczos filter, as the StyleGAN/EDM ``dataset_tool.py`` that DPDM ships does; it
antialiases when downsampling.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dpjax.data.dataset import DataError


def center_crop_resize(image: np.ndarray, crop: int, size: int, where: str) -> np.ndarray:
    """Crops the centred ``crop`` x ``crop`` square, then resizes to ``size`` x ``size``.

    Args:
      image: uint8 array (H, W, C).
      crop: side of the centred square to keep; 0 for no crop.
      size: output side; 0 keeps the (cropped) size. When resizing a non-square image,
        its centred square of side min(H, W) is taken first, so nothing is stretched.
      where: names the image in error messages (a file, a dataset and index).

    Returns:
      A uint8 array (size, size, C), or the cropped image when size is 0.

    Raises:
      DataError: if the image is smaller than ``crop``.
    """
    h, w = image.shape[:2]
    if crop:
        if crop > h or crop > w:
            raise DataError(
                f"{where}: image is {h}x{w} (HxW), smaller than data.center_crop={crop}."
            )
        top, left = (h - crop) // 2, (w - crop) // 2
        image = image[top : top + crop, left : left + crop]
        h = w = crop
    if not size:
        return image
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top : top + side, left : left + side]
        h = w = side
    if h == size:
        return np.ascontiguousarray(image)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
    return out.reshape(size, size, image.shape[-1])


def crop_resize_all(images: np.ndarray, crop: int, size: int, name: str) -> np.ndarray:
    """Applies ``center_crop_resize`` to every image of a (N, H, W, C) uint8 array.

    Returns ``images`` itself when there is nothing to do.
    """
    h, w = images.shape[1:3]
    if not crop and (not size or (h == size and w == size)):
        return images
    first = center_crop_resize(images[0], crop, size, f"{name}, image 0")
    out = np.empty((len(images), *first.shape), np.uint8)
    out[0] = first
    for i in range(1, len(images)):
        out[i] = center_crop_resize(images[i], crop, size, f"{name}, image {i}")
    return out


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Converts (N, H, W, C) uint8 images to ``channels`` channels (0 keeps them).

    Grey to RGB repeats the channel; RGB to grey is ITU-R 601-2 luma
    (L = 0.299 R + 0.587 G + 0.114 B, rounded): PIL's convert('L') rule, within 1.
    """
    c = images.shape[-1]
    if not channels or channels == c:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    weights = np.array([299, 587, 114], np.uint32)
    luma = (images.astype(np.uint32) @ weights + 500) // 1000
    return luma.astype(np.uint8)[..., None]
