"""DP fine-tuning of a publicly pre-trained model: parameter selection and LoRA adapters."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import params_select, sample, train
from dpjax.methods import base, dpdm
from dpjax.methods.base import count_params
from dpjax.privacy import clipping
from dpjax.privacy.accounting import PrivacyError
from experiments import dpdm_fmnist
from tests.config_overrides import with_overrides
from tests.tree_utils import jittered


def _tree():
    return {"down": {"conv": {"kernel": np.ones((3, 3)), "bias": np.zeros(3)}},
            "mid_attn": {"NIN_0": {"kernel": np.ones((2, 2))}}}  # fmt: skip


def test_split_and_merge_round_trip():
    selected, rest = params_select.split(_tree(), ["attn", r"conv/bias$"])
    assert set(params_select.flat(selected)) == {"mid_attn/NIN_0/kernel", "down/conv/bias"}
    assert set(params_select.flat(rest)) == {"down/conv/kernel"}
    merged = params_select.merge(selected, rest)
    assert params_select.flat(merged).keys() == params_select.flat(_tree()).keys()
    with pytest.raises(ValueError, match="overlap"):
        params_select.merge(selected, selected)


@pytest.mark.parametrize("pattern", ["atn", "("])
def test_a_pattern_that_selects_nothing_is_an_error(pattern):
    with pytest.raises(ValueError, match="pattern"):
        params_select.split(_tree(), [pattern])


SPEC = base.DataSpec((8, 8, 1), 3)


def _tiny(**kw):
    cfg = dpdm.Config(unet="custom", nf=8, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), noise_multiplicity=2, dropout=0.0, **kw)  # fmt: skip
    return dpdm.make(cfg, SPEC)


def test_lora_at_initialization_leaves_the_model_unchanged():
    base_method = _tiny()
    full = jittered(base_method.init(jax.random.PRNGKey(0), SPEC).trainable)
    adapted = _tiny(lora_rank=2, lora_targets=("attn",))
    params = adapted.init(jax.random.PRNGKey(0), SPEC)
    assert count_params(params.trainable["unet"]) == 0
    params = base.Params(params.trainable, {"unet": full})
    assert set(params.trainable["lora"]) == {"down_1_attn_0.NIN_0", "down_1_attn_0.NIN_1",
                                             "down_1_attn_0.NIN_2", "down_1_attn_0.NIN_3",
                                             "mid_attn.NIN_0", "mid_attn.NIN_1", "mid_attn.NIN_2",
                                             "mid_attn.NIN_3", "up_1_attn.NIN_0",
                                             "up_1_attn.NIN_1", "up_1_attn.NIN_2",
                                             "up_1_attn.NIN_3"}  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
    sigma, y = jnp.array([0.5, 1.0, 3.0]), jnp.array([0, 1, 2])
    want = jax.jit(base_method.denoise)(full, x, sigma, y)
    adapted_denoise = jax.jit(lambda t, f: adapted.denoise(t, x, sigma, y, f))
    got = adapted_denoise(params.trainable, params.frozen)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    # A non-zero B changes the output: the adapters are really on the path.
    bumped = jax.tree_util.tree_map(lambda v: v + 0.3, params.trainable)
    moved = adapted_denoise(bumped, params.frozen)
    assert float(jnp.max(jnp.abs(moved - want))) > 1e-3


def test_lora_target_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="match no dense"):
        _tiny(lora_rank=2, lora_targets=("attention",)).init(jax.random.PRNGKey(0), SPEC)


def test_k_copies_are_clipped_together_as_one_example():
    """K=2 noise draws over the selected leaves and the adapters: each example's clipped
    gradient is its WHOLE gradient (the mean over its K draws) scaled to norm C. Clipping
    the K copies separately (the published DP-LoRA code) gives another direction and a
    norm up to K*C, so it fails here; so does a clip that misses a selected leaf."""
    m = _tiny(trainable=("label_embed",), lora_rank=2, lora_targets=("mid_attn",))
    assert m.config.noise_multiplicity == 2
    p = m.init(jax.random.PRNGKey(0), SPEC)
    # A stand-in pre-trained UNet, and a non-zero B so that A gets gradients too.
    p = base.Params(jax.tree_util.tree_map(lambda v: v + 0.1, p.trainable), jittered(p.frozen))
    ex = {"image": jax.random.uniform(jax.random.PRNGKey(2), (3, 8, 8, 1), minval=-1, maxval=1),
          "label": jnp.array([0, 1, 2])}  # fmt: skip
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    clip = 1e-3
    one_example = jax.jit(
        lambda t, f, e, k: clipping.clipped_grad_sum(m.loss_per_example, t, f, e,
                                                     jnp.ones((1,), bool), k, clip_norm=clip,
                                                     microbatch_size=1)  # fmt: skip
    )
    raw_grad = jax.jit(jax.grad(lambda t, e, k: m.loss_per_example(t, p.frozen, e, k)[0]))
    flat = lambda tree: np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    for i in range(3):
        one = jax.tree_util.tree_map(lambda v, i=i: v[i : i + 1], ex)
        got = flat(one_example(p.trainable, p.frozen, one, keys[i : i + 1]).grad_sum)
        g = flat(raw_grad(p.trainable, jax.tree_util.tree_map(lambda v: v[0], one), keys[i]))
        assert np.linalg.norm(g) > 10 * clip  # The clip is active.
        np.testing.assert_allclose(got, g * clip / np.linalg.norm(g), rtol=1e-3, atol=1e-9)


def test_public_pretraining_then_private_finetuning_changes_only_the_selection(tmp_path):
    """The same loop trains publicly (DP off) and then privately from that checkpoint;
    only the attention blocks and the adapters move; the log's count is the selection's.
    The public run is on other data (fake_seed 0) than the private one (fake_seed 1): a
    private run on the public run's own data is refused before it writes anything."""
    public = str(tmp_path / "public")
    c = with_overrides(dpdm_fmnist.get_config("smoke"), {"dp.enabled": False})
    train.train(c, public, log=lambda *_: None)
    _, pre, _, _, _ = sample.load_trained(public)
    finetune = {"method_args.init_from": public, "method_args.trainable": ("attn",),
                "method_args.lora_rank": 2, "method_args.lora_targets": ("Dense_0",),
                "train.ema_rate": 0.0}  # fmt: skip
    leak = str(tmp_path / "leak")
    with pytest.raises(PrivacyError, match=r"init_from=.*public.*WITHOUT DP"):
        train.train(with_overrides(dpdm_fmnist.get_config("smoke"), finetune), leak)
    assert not os.path.exists(os.path.join(leak, "dp_plan.json"))
    ckpts = os.path.join(leak, "checkpoints")
    assert not os.path.isdir(ckpts) or not os.listdir(ckpts)
    private = str(tmp_path / "private")
    c = with_overrides(dpdm_fmnist.get_config("smoke"), {**finetune, "data.fake_seed": 1})
    logs: list[str] = []
    state = train.train(c, private, log=logs.append)
    n_attn = count_params(params_select.split(pre.trainable, ["attn"])[0])
    n_lora = count_params(state.trainable["lora"])
    assert any(f"{n_attn + n_lora:,} trainable parameters" in line for line in logs), logs[:3]
    before = params_select.flat(pre.trainable)
    after_frozen = params_select.flat(state.frozen["unet"])
    after_trained = params_select.flat(state.trainable["unet"])
    assert set(after_trained) == {k for k in before if "attn" in k}
    for k, v in after_frozen.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(before[k]), err_msg=k)
    assert any(not np.array_equal(np.asarray(v), np.asarray(before[k]))
               for k, v in after_trained.items())  # fmt: skip
    assert any(float(jnp.max(jnp.abs(ad["B"]))) > 0 for ad in state.trainable["lora"].values())
    # Its export (init_from redacted) samples again without the public run: the frozen
    # UNet travels in frozen_params.npz, the adapters and attention in ema_params.npz.
    from unittest import mock

    from dpjax import export, released

    out = str(tmp_path / "release")
    export.export_run(private, out, num_samples=4, log=lambda *_: None)
    with mock.patch.object(dpdm, "_load_pretrained", side_effect=AssertionError("read")):
        model = released.load_export(out)
        again = released.sample_from_export(out, str(tmp_path / "again"), log=lambda *_: None)
    assert set(model.params.trainable) == {"unet", "lora"}
    for a, b in zip(jax.tree_util.tree_leaves(model.params.frozen),
                    jax.tree_util.tree_leaves(state.frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with np.load(again) as a, np.load(os.path.join(out, "samples.npz")) as b:
        np.testing.assert_array_equal(a["images"], b["images"])
