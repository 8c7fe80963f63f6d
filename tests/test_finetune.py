"""DP fine-tuning of a publicly pre-trained model: parameter selection and LoRA adapters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import params_select, sample, train
from dpjax.methods import base, dpdm
from dpjax.methods.base import count_params
from dpjax.privacy import clipping
from experiments import dpdm_fmnist
from tests.config_overrides import with_overrides


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
    full = base_method.init(jax.random.PRNGKey(0), SPEC).trainable
    # Stand-in for a pre-trained UNet: a fresh one has zero-initialized output layers.
    leaves, tree = jax.tree_util.tree_flatten(full)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    full = jax.tree_util.tree_unflatten(
        tree, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
    )
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


def test_selected_gradients_are_clipped_together_with_k_copies():
    """Sensitivity with K=2 over the selected leaves and the adapters: norm <= C each."""
    m = _tiny(trainable=("label_embed",), lora_rank=2, lora_targets=("mid_attn",))
    p = m.init(jax.random.PRNGKey(0), SPEC)
    ex = {"image": jax.random.uniform(jax.random.PRNGKey(2), (3, 8, 8, 1), minval=-1, maxval=1),
          "label": jnp.array([0, 1, 2])}  # fmt: skip
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    one_example = jax.jit(
        lambda t, f, e, k: clipping.clipped_grad_sum(m.loss_per_example, t, f, e,
                                                     jnp.ones((1,), bool), k, clip_norm=1e-3,
                                                     microbatch_size=1)  # fmt: skip
    )
    for i in range(3):
        one = jax.tree_util.tree_map(lambda v, i=i: v[i : i + 1], ex)
        r = one_example(p.trainable, p.frozen, one, keys[i : i + 1])
        leaves = jax.tree_util.tree_leaves(r.grad_sum)
        assert float(jnp.sqrt(sum(jnp.sum(g**2) for g in leaves))) <= 1e-3 * (1 + 1e-5)


def test_public_pretraining_then_private_finetuning_changes_only_the_selection(tmp_path):
    """The same loop trains publicly (DP off) and then privately from that checkpoint;
    only the attention blocks and the adapters move; the log's count is the selection's."""
    public = str(tmp_path / "public")
    c = with_overrides(dpdm_fmnist.get_config("smoke"), {"dp.enabled": False})
    train.train(c, public, log=lambda *_: None)
    _, pre, _, _, _ = sample.load_trained(public)
    private = str(tmp_path / "private")
    c = with_overrides(
        dpdm_fmnist.get_config("smoke"),
        {"method_args.init_from": public, "method_args.trainable": ("attn",),
         "method_args.lora_rank": 2, "method_args.lora_targets": ("Dense_0",),
         "train.ema_rate": 0.0},
    )  # fmt: skip
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
