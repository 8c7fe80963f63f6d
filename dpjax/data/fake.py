"""Seeded synthetic images for smoke tests, with a pattern per class.

Class k (of K) is a sinusoidal grating at angle pi k / K and spatial frequency
2 + (k mod 3) cycles per image, each colour channel phase-shifted by a third of a
period; an example is its class's grating, with a random brightness and contrast, plus
uniform noise. Classes are thus easy to tell apart, so a conditional model trained a
few hundred steps visibly learns something, while no real data is touched.

The output depends only on (seed, split, num_examples, image shape, num_classes): the
same config gives the same bytes on every machine. Labels cycle 0, 1, ..., K-1, 0, ...
so any prefix (``limit``) is balanced; ``limit`` keeps a prefix of the
``fake_num_examples`` examples, as it does for every other source.
"""

from __future__ import annotations

import numpy as np

from dpjax.data.config import DataConfig
from dpjax.data.dataset import SourceData

_SPLIT_STREAM = {"train": 0, "test": 1}


def make_fake(
    num_examples: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    seed: int,
    split: str = "train",
) -> tuple[np.ndarray, np.ndarray]:
    """Returns uint8 images (N, H, W, C) and int32 labels (N,) as described above.

    With ``num_classes`` 0 every example uses the class-0 grating and labels are zero.
    The test split draws from a different random stream than the train split.
    """
    h, w, c = image_shape
    k = max(num_classes, 1)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    labels = (np.arange(num_examples) % k).astype(np.int32)
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    angle = np.pi * np.arange(k) / k
    freq = 2.0 + np.arange(k) % 3
    proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    phase = 2.0 * np.pi * np.arange(c) / 3.0
    # (K, H, W, C) gratings in [0, 1].
    templates = 0.5 + 0.5 * np.sin(
        2.0 * np.pi * freq[:, None, None, None] * proj[..., None] + phase
    )
    contrast = rng.uniform(0.6, 0.9, (num_examples, 1, 1, 1))
    brightness = rng.uniform(-0.1, 0.1, (num_examples, 1, 1, 1))
    noise = rng.uniform(-0.1, 0.1, (num_examples, h, w, c))
    x = 0.5 + contrast * (templates[labels] - 0.5) + brightness + noise
    images = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    return images, labels


def load_fake(config: DataConfig) -> SourceData:
    """The 'fake' source: ``fake_num_examples`` seeded examples, of which ``limit`` keeps
    the first, as every source does (the whole set is drawn, then cut: ``make_fake``'s
    examples depend on how many are drawn)."""
    shape = tuple(int(d) for d in config.fake_image_shape)
    images, labels = make_fake(
        config.fake_num_examples, shape, config.num_classes, config.fake_seed, config.split
    )
    if config.limit:
        images, labels = images[: config.limit], labels[: config.limit]
    return SourceData(
        images=images,
        labels=labels if config.num_classes else None,
        name=f"fake:seed={config.fake_seed},{shape} ({config.split})",
        class_names=tuple(f"pattern_{i}" for i in range(config.num_classes)),
    )
