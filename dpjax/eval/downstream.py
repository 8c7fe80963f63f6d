"""Downstream classifier accuracy of labelled synthetic images (the DPDM protocol).

A generator's labelled samples are useful if a classifier trained on them does well on
real data. DPDM (Dockhorn et al., 2023, ``train_downstream_classifiers.py``) trains three
classifiers on synthetic MNIST/FashionMNIST: logistic regression, an MLP 784-100-10 and
a small CNN, each with Adam (lr 3e-4), batch 128, for 50 epochs, picks the epoch by
accuracy on a separate *synthetic* set and reports the real-test accuracy of that epoch.

Privacy of the selection. DPImageBench (Gong et al., CCS'25) showed that picking the
epoch (or the classifier) by accuracy on the real test set leaks information about the
sensitive data and overstates utility. Here the epoch is chosen on a held-out part of
the synthetic data (or on a synthetic validation set given by the caller), and the real
test set is used exactly once, after training and selection are over, to score the
selected checkpoint. ``_train_and_select`` does not receive the test data at all.

Inputs. Images are NHWC (a 3-D NHW array is read as one channel) and either
* ``uint8`` in [0, 255], mapped to ``x / 127.5 - 1`` (what DPDM does: ``x/255*2-1``), or
* floating point already in [-1, 1] (the range ``Method.sample`` returns); values
  outside [-1, 1] raise ``ValueError``.
Train and test images may use different dtypes; both end in the same [-1, 1] range.

Differences from DPDM's script, on purpose: the training set is shuffled every epoch
(DPDM's synthetic loader is not shuffled); weights use Flax's default initializers
(LeCun normal) rather than PyTorch's; input sizes other than 28x28 and any number of
channels are accepted (the CNN's fully connected layer adapts, so it needs H, W >= 18).
The last, partial batch of an epoch is kept, as in DPDM, through a mask so that every
step has the same static shape.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

_EVAL_BATCH = 1000  # batch size for accuracy evaluation; only affects speed and memory
_CNN_MIN_SIZE = 18  # smallest H and W for which three valid 3x3 convs and two pools fit


class LogReg(nn.Module):
    """Multinomial logistic regression on the flattened image."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class MLP(nn.Module):
    """One hidden layer of 100 ReLU units (784 -> 100 -> 10 on MNIST)."""

    num_classes: int = 10
    hidden: int = 100

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout
        x = nn.relu(nn.Dense(self.hidden)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """DPDM's downstream CNN: three valid 3x3 convs (32, 64, 128), fc 128, dropout 0.5.

    Layout (28x28 input): conv32 -> maxpool2 -> relu -> dropout -> conv64 -> maxpool2 ->
    relu -> dropout -> conv128 -> relu -> flatten (3*3*128 = 1152) -> fc128 -> relu ->
    dropout -> fc(num_classes). Dropout is active only with ``train=True`` and then
    needs a ``'dropout'`` PRNG stream. No normalization layers.
    """

    num_classes: int = 10
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        drop = lambda h: nn.Dropout(self.dropout, deterministic=not train)(h)
        for i, features in enumerate((32, 64, 128)):
            x = nn.Conv(features, (3, 3), padding="VALID")(x)
            if i < 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                x = drop(nn.relu(x))
            else:
                x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = drop(nn.relu(nn.Dense(128)(x)))
        return nn.Dense(self.num_classes)(x)


# name -> flax module class; every class takes ``num_classes`` and is called as
# ``module.apply(variables, images_in_[-1,1]_NHWC, train=bool)`` returning logits.
DOWNSTREAM_MODELS: dict[str, type[nn.Module]] = {"logreg": LogReg, "mlp": MLP, "cnn": CNN}


def _as_nhwc(images: np.ndarray | jax.Array, name: str) -> np.ndarray:
    """Checks dtype and range; returns NHWC host array (uint8 or float32, not rescaled)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{name}: expected images (N, H, W, C) or (N, H, W), got {images.shape}.")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: no images.")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name}: images must be uint8 or float in [-1, 1], got {images.dtype}.")
    images = images.astype(np.float32)
    lo, hi = float(images.min()), float(images.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"{name}: float images must lie in [-1, 1], got [{lo:.4g}, {hi:.4g}].")
    if lo >= 0.0:
        warnings.warn(
            f"{name}: float images lie in [{lo:.3g}, {hi:.3g}], all non-negative; they are "
            "read as [-1, 1] images. Pass uint8 or rescale if they are in [0, 1].",
            stacklevel=3,
        )
    return images


def _to_unit_range(x: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]; float inputs are already in [-1, 1]."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 127.5 - 1.0
    return x.astype(jnp.float32)


def _as_labels(labels: np.ndarray | jax.Array, n: int, num_classes: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: expected {n} integer labels, got {labels.dtype} {labels.shape}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}).")
    return labels.astype(np.int32)


def _padded_batches(order: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits an index order into (steps, batch) indices and a mask; the tail is padded."""
    steps = -(-len(order) // batch_size)
    idx = np.zeros(steps * batch_size, np.int32)
    idx[: len(order)] = order
    mask = np.zeros(steps * batch_size, np.float32)
    mask[: len(order)] = 1.0
    return idx.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def _use_scan() -> bool:
    """Whether to fuse a whole epoch into one ``lax.scan``.

    On GPU/TPU a scan removes per-step dispatch. On XLA:CPU the convolutions of a loop
    body run about 5x slower than the same step jitted alone (jaxlib 0.10.2, 2 cores:
    2.5 s vs 0.4 s per CNN step of 128), so on CPU we loop in Python over a jitted
    step. Both paths compute the same updates (tested).
    """
    return jax.default_backend() != "cpu"


@dataclasses.dataclass(frozen=True)
class _Fns:
    """Jitted pieces for one module and optimizer (single-batch and whole-epoch forms)."""

    module: nn.Module
    tx: optax.GradientTransformation
    train_step: Any
    train_epoch: Any
    count_batch: Any
    count_all: Any
    init: Any

    def run_epoch(self, params, opt_state, images, labels, batch_idx, batch_mask, key):
        """One pass over ``batch_idx``; returns (params, opt_state, mean training loss)."""
        if _use_scan():
            return self.train_epoch(params, opt_state, images, labels, batch_idx, batch_mask, key)
        total = 0.0
        for i in range(batch_idx.shape[0]):
            params, opt_state, weighted = self.train_step(
                params, opt_state, images, labels, batch_idx[i], batch_mask[i], key, i
            )
            total = total + weighted  # stays on device: no sync per step
        return params, opt_state, total / np.sum(batch_mask)

    def correct(self, params, images, labels, batch_idx, batch_mask) -> float:
        """Number of correctly classified (unmasked) examples."""
        if _use_scan():
            return float(self.count_all(params, images, labels, batch_idx, batch_mask))
        counts = [self.count_batch(params, images, labels, i, m)
                  for i, m in zip(batch_idx, batch_mask)]
        return float(sum(counts))


@functools.lru_cache(maxsize=16)
def _make_fns(name: str, num_classes: int, lr: float) -> _Fns:
    """Builds the jitted training step, its epoch scan and the accuracy counters.

    Cached, so that evaluating several checkpoints' samples in one process compiles once.

    Data arrays are arguments, never closed-over constants, so they are not baked into
    the compiled program; each batch is gathered on device from an index row, and the
    padded tail of the last batch is masked out of the loss and of the counts.
    """
    module = DOWNSTREAM_MODELS[name](num_classes=num_classes)
    tx = optax.adam(lr)

    def train_step(params, opt_state, images, labels, idx, mask, key, i):
        x, y = _to_unit_range(images[idx]), labels[idx]
        dropout_key = jax.random.fold_in(key, i)

        def loss_fn(p):
            logits = module.apply({"params": p}, x, train=True, rngs={"dropout": dropout_key})
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss * jnp.sum(mask)

    def train_epoch(params, opt_state, images, labels, batch_idx, batch_mask, key):
        def body(carry, xs):
            params, opt_state, total = carry
            idx, mask, i = xs
            params, opt_state, weighted = train_step(
                params, opt_state, images, labels, idx, mask, key, i
            )
            return (params, opt_state, total + weighted), None

        init = (params, opt_state, jnp.zeros((), jnp.float32))
        steps = jnp.arange(batch_idx.shape[0])
        (params, opt_state, total), _ = jax.lax.scan(body, init, (batch_idx, batch_mask, steps))
        return params, opt_state, total / jnp.sum(batch_mask)

    def count_batch(params, images, labels, idx, mask):
        logits = module.apply({"params": params}, _to_unit_range(images[idx]), train=False)
        return jnp.sum((jnp.argmax(logits, axis=-1) == labels[idx]).astype(jnp.float32) * mask)

    def count_all(params, images, labels, batch_idx, batch_mask):
        def body(total, xs):
            return total + count_batch(params, images, labels, *xs), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (batch_idx, batch_mask))
        return total

    return _Fns(module, tx, jax.jit(train_step), jax.jit(train_epoch), jax.jit(count_batch),
                jax.jit(count_all), jax.jit(functools.partial(module.init, train=False)))


def _accuracy(fns: _Fns, params: PyTree, images: jax.Array, labels: jax.Array) -> float:
    n = int(images.shape[0])
    idx, mask = _padded_batches(np.arange(n), min(_EVAL_BATCH, n))
    return fns.correct(params, images, labels, idx, mask) / n


def _train_and_select(
    name: str,
    num_classes: int,
    train: tuple[jax.Array, jax.Array],
    val: tuple[jax.Array, jax.Array],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int | None,
    seed: int,
) -> tuple[PyTree, _Fns, dict[str, Any]]:
    """Trains one classifier and returns the parameters of the epoch best on ``val``.

    Sees only synthetic data (``train`` and ``val``); the real test set is not an input.
    The selected epoch is the first one with the highest validation accuracy (ties keep
    the earlier epoch, as DPDM's strict ``>``).
    """
    fns = _make_fns(name, num_classes, float(lr))
    # Per-model streams that do not depend on which other models are evaluated.
    name_id = zlib.crc32(name.encode()) & 0x7FFFFFFF
    # 'rbg' keys: this is public-data evaluation, so the statistical quality of an XLA
    # RngBitGenerator suffices, and on XLA:CPU it compiles several seconds faster than
    # threefry (which is inlined at every init and dropout call site).
    model_key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), name_id)
    init_key, dropout_key = jax.random.split(model_key)
    rng = np.random.default_rng([seed, name_id])
    train_x, train_y = train
    params = fns.init(init_key, _to_unit_range(train_x[:1]))["params"]
    opt_state = fns.tx.init(params)

    best_params, best_acc, best_epoch = params, -1.0, 0
    val_history, loss_history = [], []
    for epoch in range(1, epochs + 1):
        idx, mask = _padded_batches(rng.permutation(train_x.shape[0]), batch_size)
        epoch_key = jax.random.fold_in(dropout_key, epoch)
        params, opt_state, loss = fns.run_epoch(
            params, opt_state, train_x, train_y, idx, mask, epoch_key
        )
        acc = _accuracy(fns, params, *val)
        val_history.append(acc)
        loss_history.append(float(loss))
        if not np.isfinite(loss_history[-1]):
            raise FloatingPointError(f"downstream {name}: non-finite loss at epoch {epoch}.")
        if acc > best_acc:  # jax arrays are immutable and not donated: a reference suffices
            best_params, best_acc, best_epoch = params, acc, epoch
        if patience is not None and epoch - best_epoch >= patience:
            break
    info = {
        "selected_epoch": best_epoch,
        "val_accuracy": best_acc,
        "val_accuracy_history": val_history,
        "train_loss_history": loss_history,
        "epochs_run": len(val_history),
    }
    return best_params, fns, info


def evaluate_downstream(
    train_images: np.ndarray | jax.Array,
    train_labels: np.ndarray | jax.Array,
    test_images: np.ndarray | jax.Array,
    test_labels: np.ndarray | jax.Array,
    num_classes: int,
    *,
    models: Sequence[str] = ("logreg", "mlp", "cnn"),
    epochs: int = 50,
    batch_size: int = 128,
    lr: float = 3e-4,
    val_fraction: float = 0.1,
    val_images: np.ndarray | jax.Array | None = None,
    val_labels: np.ndarray | jax.Array | None = None,
    patience: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Trains classifiers on labelled synthetic images; scores the selected epoch on real test.

    Guarantees:
      * Model selection (the epoch) uses synthetic data only: a random ``val_fraction``
        of the synthetic set, held out from training (the same split for every model),
        or the synthetic ``val_images``/``val_labels`` if given (then all synthetic
        training images are used for training, as DPDM's separate ``eval_path``).
      * The real test set is read once per model, after training, for the selected
        parameters only; changing test images or labels cannot change any other field.
      * Deterministic for a fixed ``seed`` on a given backend and jax version (split,
        init, shuffling and dropout all derive from it; each model's streams do not
        depend on which other models are listed). Init and dropout use JAX 'rbg' keys,
        whose bits may differ across backends.

    Args:
      train_images: synthetic images (N, H, W, C) (or (N, H, W)), uint8 in [0, 255] or
        float in [-1, 1].
      train_labels: their integer labels (N,), in [0, num_classes).
      test_images: real test images, same shape per image, uint8 or float in [-1, 1].
      test_labels: real test labels.
      num_classes: number of classes.
      models: names from ``DOWNSTREAM_MODELS``.
      epochs: maximum number of epochs (DPDM: 50).
      batch_size: training batch size (DPDM: 128).
      lr: Adam learning rate (DPDM: 3e-4).
      val_fraction: fraction of the synthetic set held out for selection, in (0, 1);
        ignored when ``val_images`` is given.
      val_images: optional separate synthetic validation images.
      val_labels: their labels; required with ``val_images``.
      patience: stop a model after this many epochs without a new best validation
        accuracy; None trains all ``epochs`` (DPDM).
      seed: seed for everything random.

    Returns:
      ``{model_name: {...}}`` with, per model: ``test_accuracy`` (real test, selected
      epoch), ``selected_epoch`` (1-based), ``val_accuracy`` (synthetic validation
      accuracy of that epoch), ``val_accuracy_history`` and ``train_loss_history`` (per
      epoch, synthetic), ``epochs_run``, ``num_train``, ``num_val``, ``num_test`` and
      ``seconds`` (wall time, compilation included).

    Raises:
      ValueError: on bad shapes, dtypes, ranges, labels, model names or fractions.
    """
    unknown = [m for m in models if m not in DOWNSTREAM_MODELS]
    if unknown:
        raise ValueError(f"unknown downstream models {unknown}; known: {list(DOWNSTREAM_MODELS)}.")
    if epochs < 1 or batch_size < 1 or num_classes < 2:
        raise ValueError("epochs and batch_size must be >= 1 and num_classes >= 2.")
    train_x = _as_nhwc(train_images, "train_images")
    train_y = _as_labels(train_labels, len(train_x), num_classes, "train_labels")
    test_x = _as_nhwc(test_images, "test_images")
    test_y = _as_labels(test_labels, len(test_x), num_classes, "test_labels")
    if val_images is not None:
        if val_labels is None:
            raise ValueError("val_labels must be given with val_images.")
        val_x = _as_nhwc(val_images, "val_images")
        val_y = _as_labels(val_labels, len(val_x), num_classes, "val_labels")
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
        num_val = int(round(val_fraction * len(train_x)))
        if not 0 < num_val < len(train_x):
            raise ValueError(f"val_fraction={val_fraction} of {len(train_x)} images leaves "
                             "an empty training or validation split.")
        perm = np.random.default_rng([seed, 0x5EED]).permutation(len(train_x))
        val_x, val_y = train_x[perm[:num_val]], train_y[perm[:num_val]]
        train_x, train_y = train_x[perm[num_val:]], train_y[perm[num_val:]]
    for name, x in (("val_images", val_x), ("test_images", test_x)):
        if x.shape[1:] != train_x.shape[1:]:
            raise ValueError(f"{name} have shape {x.shape[1:]}, train images {train_x.shape[1:]}.")
    if "cnn" in models and min(train_x.shape[1:3]) < _CNN_MIN_SIZE:
        raise ValueError(f"the CNN needs images of at least {_CNN_MIN_SIZE}x{_CNN_MIN_SIZE}, "
                         f"got {train_x.shape[1:3]}.")

    train = (jnp.asarray(train_x), jnp.asarray(train_y))
    val = (jnp.asarray(val_x), jnp.asarray(val_y))
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        start = time.perf_counter()
        params, fns, info = _train_and_select(
            name, num_classes, train, val, epochs=epochs, batch_size=batch_size, lr=lr,
            patience=patience, seed=seed,
        )
        # The only use of the real test set: score the already selected parameters.
        info["test_accuracy"] = _accuracy(fns, params, jnp.asarray(test_x), jnp.asarray(test_y))
        info.update(num_train=len(train_x), num_val=len(val_x), num_test=len(test_x),
                    seconds=time.perf_counter() - start)
        results[name] = info
    return results
