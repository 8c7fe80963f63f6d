"""Tests for dpjax.eval.downstream: learning, selection on synthetic data only, inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.eval import downstream
from dpjax.eval.downstream import DOWNSTREAM_MODELS, evaluate_downstream

NUM_CLASSES = 4


def _patterns(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """An easy problem: class c lights up quadrant c; uint8 images with noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = rng.normal(60.0, 30.0, (n, size, size, 1))
    half = size // 2
    for c in range(NUM_CLASSES):
        r, q = divmod(c, 2)
        images[labels == c, r * half : (r + 1) * half, q * half : (q + 1) * half] += 120.0
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


@pytest.mark.parametrize("name", sorted(DOWNSTREAM_MODELS))
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_models_output_logits(name, shape):
    module = DOWNSTREAM_MODELS[name](num_classes=7)
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)  # shapes only: nothing is compiled
    params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    assert jax.eval_shape(module.apply, {"params": params}, x).shape == (2, 7)
    if name == "cnn":  # DPDM's 1152 = 3 * 3 * 128 flattened features on 28x28
        assert params["Dense_0"]["kernel"].shape[0] == (1152 if shape[0] == 28 else 2048)


def test_learns_easy_problem_and_reports_fields():
    # Sizes, batch and lr as in the next tests, so that their compilations are shared.
    train_x, train_y = _patterns(600, seed=0)
    test_x, test_y = _patterns(300, seed=1)
    out = evaluate_downstream(
        train_x, train_y, _to_float(test_x), test_y, NUM_CLASSES,  # uint8 train, float test
        models=("logreg", "mlp"), epochs=3, batch_size=32, lr=3e-3,
    )
    for name in ("logreg", "mlp"):
        r = out[name]
        assert r["test_accuracy"] > 0.95, (name, r)
        assert r["val_accuracy"] == max(r["val_accuracy_history"])
        assert r["val_accuracy_history"][r["selected_epoch"] - 1] == r["val_accuracy"]
        assert (r["num_train"], r["num_val"], r["num_test"], r["epochs_run"]) == (540, 60, 300, 3)
        assert len(r["train_loss_history"]) == 3


def test_cnn_learns():
    train_x, train_y = _patterns(256, seed=0)
    test_x, test_y = _patterns(100, seed=1)
    out = evaluate_downstream(train_x, train_y, test_x, test_y, NUM_CLASSES, models=("cnn",),
                              epochs=2, batch_size=32, lr=1e-3)
    assert out["cnn"]["test_accuracy"] > 0.9, out


def test_selection_never_looks_at_test_data(monkeypatch):
    """Scrambled test labels and noise test images change nothing but test_accuracy.

    A spy on the accuracy function also checks that the test set (recognized by its
    size, 37) is evaluated exactly once per model, after the last training epoch.
    """
    train_x, train_y = _patterns(600, seed=0)
    test_x, test_y = _patterns(37, seed=1)
    calls: list[int] = []
    real_accuracy = downstream._accuracy

    def spy(fns, params, images, labels):
        calls.append(int(images.shape[0]))
        return real_accuracy(fns, params, images, labels)

    monkeypatch.setattr(downstream, "_accuracy", spy)
    kwargs = dict(models=("logreg", "mlp"), epochs=4, batch_size=32, lr=3e-3, seed=3)
    real = evaluate_downstream(train_x, train_y, test_x, test_y, NUM_CLASSES, **kwargs)
    assert calls == [60] * 4 + [37] + [60] * 4 + [37]  # val each epoch, then test once

    rng = np.random.default_rng(9)
    noise_x = rng.integers(0, 256, test_x.shape, dtype=np.uint8)
    fake = evaluate_downstream(train_x, train_y, noise_x, (test_y + 1) % NUM_CLASSES,
                               NUM_CLASSES, **kwargs)
    for name in ("logreg", "mlp"):
        for key in ("selected_epoch", "val_accuracy", "val_accuracy_history",
                    "train_loss_history"):
            assert real[name][key] == fake[name][key], (name, key)
        assert real[name]["test_accuracy"] > 0.9
        assert fake[name]["test_accuracy"] < 0.6


def test_scan_path_matches_step_loop(monkeypatch):
    """The whole-epoch scan (used on accelerators) and the CPU step loop agree."""
    train_x, train_y = _patterns(600, seed=0)
    test_x, test_y = _patterns(40, seed=1)
    kwargs = dict(models=("mlp",), epochs=2, batch_size=32, lr=3e-3)
    loop = evaluate_downstream(train_x, train_y, test_x, test_y, NUM_CLASSES, **kwargs)["mlp"]
    monkeypatch.setattr(downstream, "_use_scan", lambda: True)
    scan = evaluate_downstream(train_x, train_y, test_x, test_y, NUM_CLASSES, **kwargs)["mlp"]
    np.testing.assert_allclose(scan["train_loss_history"], loop["train_loss_history"], rtol=1e-4)
    for key in ("val_accuracy_history", "selected_epoch", "test_accuracy"):
        assert scan[key] == loop[key], key


def test_separate_validation_set_and_patience():
    train_x, train_y = _patterns(300, seed=0)
    val_x, val_y = _patterns(50, seed=2)
    test_x, test_y = _patterns(50, seed=1)
    out = evaluate_downstream(train_x, train_y, test_x, test_y, NUM_CLASSES, models=("logreg",),
                              epochs=30, batch_size=32, lr=1e-2, val_images=val_x,
                              val_labels=val_y, patience=2)
    r = out["logreg"]
    assert (r["num_train"], r["num_val"]) == (300, 50)
    assert r["epochs_run"] == r["selected_epoch"] + 2 < 30  # stopped after 2 flat epochs


def test_rejects_bad_inputs():
    x, y = _patterns(20, seed=0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        evaluate_downstream(x.astype(np.float32), y, x, y, NUM_CLASSES, models=("logreg",))
    with pytest.raises(ValueError, match="unknown"):
        evaluate_downstream(x, y, x, y, NUM_CLASSES, models=("resnet",))
    with pytest.raises(ValueError, match="labels"):
        evaluate_downstream(x, y + NUM_CLASSES, x, y, NUM_CLASSES, models=("logreg",))
    with pytest.raises(ValueError, match="at least 18"):
        small, ys = _patterns(20, seed=0, size=16)
        evaluate_downstream(small, ys, small, ys, NUM_CLASSES, models=("cnn",))
    with pytest.warns(UserWarning, match="non-negative"):  # floats in [0, 1] look suspicious
        downstream._as_nhwc(x.astype(np.float32) / 255.0, "test_images")
