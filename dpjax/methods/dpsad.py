"""DP-SAD: diffusion distillation with a discriminator (Liu, Wang, Ge; ECCV 2024), made sound.

A student denoiser D_theta (the DPDM UNet family, ``dpjax.models.ncsnpp``) is distilled
from a teacher denoiser D_psi, with a discriminator D_phi (``dpjax.models.discriminator``)
that tells teacher outputs from student outputs. For one private example x, with K
random noise levels (the paper's "stochastic timestep", K = 1 in the paper) drawn as
DPDM draws them, x_k = x + sigma_k n_k, t_k = D_psi(x_k) and s_k = D_theta(x_k):

    L_dis = lambda(sigma) [w_t mean (s - t)^2 + w_x mean (s - x)^2]    (paper's L_dis, EDM weight)
    L_adv = softplus(D_phi(t, s)) + softplus(-D_phi(s, t))             (student: fool D_phi)
    L_D   = softplus(-D_phi(t, s)) + softplus(D_phi(s, t))             (D_phi: BCE, both orders)

(``adv_loss='minimax'`` uses the paper's saturating log(1 - D) form, -L_D, instead.)

What the paper does, and why dpjax does not (see ``method_details.md`` section 6):
the paper trains the teacher on the private data WITHOUT protection, clips and noises
only the gradient at the student's output and divides the noise by the number of
timesteps T. The teacher then depends on every private example, so the student's
clipped gradient does not bound one example's influence, and the division by T
understates sigma by about a factor of T. Its epsilon is not a guarantee.

How dpjax makes the stated epsilon a real (epsilon, delta) guarantee, by construction:

* ONE DP-SGD loop trains the student AND the discriminator: ``trainable = {'student',
  'disc'}``, ``frozen = {'teacher'}``. The per-example loss returns one scalar
  L_dis + lambda L_adv + w_D L_D in which ``jax.lax.stop_gradient`` routes the terms:
  its gradient w.r.t. theta is that of L_dis + lambda L_adv (phi is stopped there) and
  w.r.t. phi that of L_D (the outputs t, s are stopped there). The engine clips this
  joint per-example gradient over student + discriminator ONCE to C, so one example
  changes the noised sum by at most C (add/remove): the plain DP-SGD accounting of the
  plan is exact. The K noise levels are averaged INSIDE the per-example loss, before
  clipping, so they cost nothing; the noise is never divided by K or T.
* The discriminator's only access to private data is this DP-SGD step: it is trained
  with DP-SGD, jointly with the student.
* The teacher is a DPDM run (``teacher_from``) that is itself private, declared by
  ``teacher_privacy``:
  - 'dp': the teacher was trained with DP-SGD on the private data. ``prior_releases``
    reports its training (its sigma, q, and the steps of the loaded checkpoint, read
    from its workdir) and the teacher run's own releases; the train loop composes them
    into the calibration (``dp.epsilon`` is the TOTAL of teacher and student), the
    budget and every privacy report and export.
  - 'public': the teacher was trained on OTHER, public data. It is refused when its
    data section names the same data as ``private_data`` (``provenance.same_data``:
    the same data.name), and when ``private_data`` is not given. Data that overlap under
    different names (e.g. MNIST from two sources) cannot be detected: the declaration
    is the user's.
  A teacher trained WITHOUT DP on the private data is refused: it is not offered. So
  is a teacher whose own ``init_from`` run read the private data. (These checks are
  ``check_private_run``'s, which run setup calls for a private student only, as it
  checks every method's sources: a student trained without DP, a non-private
  ablation, may use any teacher; export checks again.) A 'dp' teacher that
  started from a PUBLIC run (DPDM's ``init_from``) is accepted and still composed: this
  is the best configuration measured (``experiments/dpsad_fmnist.py``). These checks are
  in ``dpsad_teacher.py`` and ``privacy.provenance``.
* The released model is the student (and the DP discriminator, which is DP too). The
  teacher sits in ``frozen`` and ``exported_frozen`` drops it, so ``--mode=export``
  never writes it (also when it is DP or public: it is not the released model).
* GroupNorm everywhere (teacher, student, discriminator): no statistic across examples.

Sampling uses the student only, with DPDM's samplers. The teacher, the student's
preconditioning and its training noise distribution are the teacher run's.

Known limitation (as DPDM's ``init_from``): the method loads the teacher run when it is
built, so sampling, eval and export of a DP-SAD run's workdir need the teacher workdir
too. Its export does not: ``make_released`` rebuilds the student from the teacher's
settings that the export records (``release_record``), never its weights.
Clipping: ``dp.clipping='vmap'``. The layerwise path refuses this loss (it fails closed
on the discriminator's parameters, which L_adv uses through ``stop_gradient``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from dpjax.diffusion import samplers
from dpjax.methods import base, dpdm
from dpjax.methods.dpsad_teacher import (  # noqa: F401 - data_identity: the public name
    DATA_IDENTITY_FIELDS,
    Teacher,
    TeacherRun,
    check_teacher_privacy,
    data_identity,
    load_teacher,
    read_teacher_run,
    teacher_notes,
    teacher_releases,
)
from dpjax.models import discriminator, ncsnpp
from dpjax.privacy import provenance

_ARCH_FIELDS = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")
_PRECOND_FIELDS = ("precond", "sigma_data", "p_mean", "p_std", "logsnr_min", "logsnr_max")


@dataclasses.dataclass(frozen=True)
class Config(samplers.SamplerSettings):
    """DP-SAD settings.

    Attributes:
      teacher_from: workdir of a DPDM run (trained with ``dpjax.main``): the teacher.
      teacher_privacy: 'dp' (trained with DP-SGD on the private data; composed into the
        budget) or 'public' (trained on other, public data). Nothing else is accepted.
      private_data: ``data_identity`` of this run's data (experiments derive it from
        their data section); required with teacher_privacy='public', whose teacher
        must have been trained on other data.
      student_init: 'teacher' (start from the teacher's weights; needs the teacher's
        architecture) or 'scratch'.
      unet: the student's UNet: 'teacher' (the teacher's architecture), or as DPDM's
        ``unet`` ('auto', 'custom', a preset name); then the overrides below apply.
      nf, ch_mult, num_res_blocks, attn_resolutions, dropout: UNet overrides (None keeps).
      timesteps: K, random noise levels per example, averaged inside the per-example
        loss (the paper uses one).
      label_dropout: classifier-free-guidance dropout of the student's label (once per
        example, as DPDM); the teacher sees the same label. The discriminator sees no
        label.
      teacher_weight, data_weight: w_t and w_x of L_dis (the paper: 1 and 1).
      adv_weight: lambda of L_adv (the paper's best: 1).
      disc_weight: w_D, the weight of the discriminator's loss in the joint scalar. It
        scales only the discriminator's gradient, hence its share of the clip norm.
      adv_loss: 'nonsaturating' (label-swapped BCE) or 'minimax' (the paper's log(1 - D)).
      disc_features: channels per level of the discriminator.
      disc_noise_level: give the discriminator the noise level as an input channel.
      sampler, ..., sample_batch: the student's sampler (``samplers.SamplerSettings``,
        inherited).
    """

    teacher_from: str = ""
    teacher_privacy: Literal["dp", "public"] = "dp"
    private_data: str = ""
    student_init: Literal["teacher", "scratch"] = "teacher"
    unet: str = "teacher"
    nf: int | None = None
    ch_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    attn_resolutions: tuple[int, ...] | None = None
    dropout: float | None = None
    timesteps: int = 1
    label_dropout: float = 0.1
    teacher_weight: float = 1.0
    data_weight: float = 1.0
    adv_weight: float = 1.0
    disc_weight: float = 1.0
    adv_loss: Literal["nonsaturating", "minimax"] = "nonsaturating"
    disc_features: tuple[int, ...] = (32, 64)
    disc_noise_level: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_privacy not in ("dp", "public"):
            raise ValueError(
                f"teacher_privacy must be 'dp' or 'public', got {self.teacher_privacy!r}. A "
                "teacher trained without DP on the private data is not offered: the student "
                "would then carry no guarantee (see dpjax/methods/dpsad.py)."
            )
        if self.student_init not in ("teacher", "scratch"):
            raise ValueError(
                f"student_init must be 'teacher' or 'scratch', got {self.student_init!r}."
            )
        if self.adv_loss not in ("nonsaturating", "minimax"):
            raise ValueError(
                f"adv_loss must be 'nonsaturating' or 'minimax', got {self.adv_loss!r}."
            )
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}.")
        if not self.disc_features or min(self.disc_features) < 1:
            raise ValueError(f"disc_features must be positive channels, got {self.disc_features}.")
        for name in ("teacher_weight", "data_weight", "adv_weight", "disc_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")


def student_config(config: Config, teacher: dpdm.Config) -> dpdm.Config:
    """The student's DPDM settings: its UNet, the teacher's preconditioning, K = timesteps."""
    arch = {"unet": teacher.unet if config.unet == "teacher" else config.unet}
    for f in _ARCH_FIELDS:
        own = getattr(config, f)
        arch[f] = own if own is not None or config.unet != "teacher" else getattr(teacher, f)
    return dpdm.Config(
        **arch,
        **{f: getattr(teacher, f) for f in _PRECOND_FIELDS},
        **config.sampler_settings(),
        label_dropout=config.label_dropout,
        noise_multiplicity=config.timesteps,
    )


def _plain(config: dpdm.Config) -> dpdm.Config:
    """``config`` without fine-tuning options: the whole UNet is one parameter tree."""
    return dataclasses.replace(
        config, init_from="", trainable=(), lora_rank=0, lora_targets=(), lora_alpha=0.0
    )


class DPSAD(base.Method):
    """Student + discriminator trained in one DP-SGD loop against a DP or public teacher."""

    name = "dpsad"

    def __init__(self, config: Config, spec: base.DataSpec,
                 released_teacher: dpdm.Config | None = None) -> None:
        """``released_teacher`` (``make_released``): the teacher's architecture and
        preconditioning as an export records them; ``teacher_from`` is then not read,
        and the method can sample (the student) but not train."""
        self.config = config
        self.spec = spec
        if released_teacher is None:
            # The teacher's privacy is checked by ``check_private_run``, for a private run
            # only: a student trained without DP (an ablation) may use any teacher.
            self.teacher_run = load_teacher(read_teacher_run(config.teacher_from), spec)
            teacher_config = self.teacher_run.config
        else:
            self.teacher_run = None
            teacher_config = released_teacher
        self.teacher = dpdm.make(_plain(teacher_config), spec)
        self.student = dpdm.make(_plain(student_config(config, teacher_config)), spec)
        if config.student_init == "teacher" and (
            self.student.unet_config != self.teacher.unet_config
        ):
            raise ValueError(
                "student_init='teacher' needs the teacher's architecture, but the student is "
                f"{self.student.unet_config} and the teacher {self.teacher.unet_config}; use "
                "unet='teacher' without overrides, or student_init='scratch'."
            )
        self.disc = discriminator.Discriminator(tuple(config.disc_features))

    def _loaded_teacher(self):
        if self.teacher_run is None:
            raise ValueError("This DP-SAD was rebuilt from an export, without its teacher: "
                             "it samples, but cannot train or state the teacher's privacy.")
        return self.teacher_run

    def check_private_run(self) -> None:
        """Refuses a teacher whose privacy is not what ``teacher_privacy`` declares
        (``dpsad_teacher.check_teacher_privacy``): run setup calls it for a private run."""
        check_teacher_privacy(self.config, self._loaded_teacher().run)

    def release_record(self) -> dict[str, Any]:
        """The teacher's UNet and preconditioning settings, which the student's are
        derived from (``student_config``); not its weights, nor ``init_from``."""
        teacher = self._loaded_teacher().config
        return {"teacher": {f: getattr(teacher, f)
                            for f in ("unet", *_ARCH_FIELDS, *_PRECOND_FIELDS)}}

    def source_runs(self) -> list[provenance.Source]:
        """The teacher's run; composed (``prior_releases``) when it is a 'dp' teacher."""
        composed = self.config.teacher_privacy == "dp"
        return [provenance.Source("teacher_from", self._loaded_teacher().run.workdir, composed)]

    def prior_releases(self) -> list[dict[str, Any]]:
        """The DP teacher's training (and its own releases); none for a public teacher
        (``dpsad_teacher.teacher_releases``)."""
        return teacher_releases(self._loaded_teacher(), self.config.teacher_privacy)

    def privacy_notes(self) -> list[str]:
        """How the teacher enters the guarantee (``dpsad_teacher.teacher_notes``)."""
        return teacher_notes(self._loaded_teacher(), self.config)

    def exported_frozen(self, frozen: base.PyTree) -> base.PyTree:
        """The frozen parameters an export may publish: none (the teacher stays private)."""
        del frozen
        return {}

    def init(self, key: jax.Array, spec: base.DataSpec) -> base.Params:
        """Trainable {'student', 'disc'} (the student fresh or the teacher's copy), frozen
        {'teacher'}."""
        if spec != self.spec:
            raise ValueError(f"DP-SAD was built for {self.spec}, init was given {spec}.")
        k_student, k_disc = jax.random.split(key)
        if self.teacher_run is not None:
            teacher = jax.tree_util.tree_map(jnp.asarray, self.teacher_run.unet)
        else:  # Rebuilt from an export, which never holds the teacher: its shape only.
            teacher = ncsnpp.init_params(self.teacher.unet_config, k_student)
        if self.config.student_init == "teacher":
            student = jax.tree_util.tree_map(jnp.array, teacher)
        else:
            student = ncsnpp.init_params(self.student.unet_config, k_student)
        x = jnp.zeros((1, *spec.image_shape), jnp.float32)
        level = jnp.zeros((1,)) if self.config.disc_noise_level else None
        disc = self.disc.init(k_disc, x, x, level)["params"]
        return base.Params(
            trainable={"student": student, "disc": disc}, frozen={"teacher": teacher}
        )

    def _disc_logits(
        self, params: base.PyTree, first: jax.Array, second: jax.Array, level: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """(logits of (first, second), logits of (second, first)) in one batched call."""
        k = first.shape[0]
        both = self.disc.apply(
            {"params": params},
            jnp.concatenate([first, second]),
            jnp.concatenate([second, first]),
            None if level is None else jnp.concatenate([level, level]),
        )
        return both[:k], both[k:]

    def loss_terms(
        self, trainable: base.PyTree, frozen: base.PyTree, example: base.Example, key: jax.Array
    ) -> dict[str, jax.Array]:
        """The unweighted terms of ONE example's loss, each averaged over its K noise levels.

        Returns {'distill_teacher': lambda(sigma) mean (s - t)^2, 'distill_data':
        lambda(sigma) mean (s - x)^2, 'adv': L_adv, 'disc': L_D, 'disc_accuracy'} (the
        accuracy has no gradient). Gradient routing, by ``stop_gradient``: the first
        three depend on the student only (the discriminator's parameters are stopped in
        L_adv), 'disc' on the discriminator only (the outputs are stopped in L_D); the
        frozen teacher is never differentiated. Only this example enters.

        Args:
          trainable: {'student': UNet, 'disc': discriminator}.
          frozen: {'teacher': UNet}.
          example: {'image': (H, W, C) in [-1, 1], 'label': () int}.
          key: this example's randomness (labels' dropout, sigma, noise, dropout).
        """
        c = self.config
        x = jnp.asarray(example["image"], jnp.float32)
        if x.shape != self.spec.image_shape:
            raise ValueError(f"Expected an image of shape {self.spec.image_shape}, got {x.shape}.")
        k_label, k_sigma, k_noise, k_dropout = jax.random.split(key, 4)
        num = c.timesteps
        precond = self.student.precond
        labels = self.student.copy_labels(example["label"], k_label)
        sigma = precond.sample_sigma(k_sigma, (num,))
        noise = jax.random.normal(k_noise, (num, *x.shape))
        noisy = x[None] + sigma.reshape(-1, 1, 1, 1) * noise
        teacher_out = jax.lax.stop_gradient(
            self.teacher.denoise(frozen["teacher"], noisy, sigma, labels)
        )
        net = self.student.net(trainable["student"], None, train=True, dropout_key=k_dropout)
        student_out = precond.denoise(net, noisy, sigma, labels)

        def pixel_mean(d: jax.Array) -> jax.Array:
            return jnp.mean(jnp.square(d).reshape(num, -1), axis=-1)

        weight = precond.loss_weight(sigma)  # EDM's lambda(sigma), as DPDM's loss.
        to_teacher = weight * pixel_mean(student_out - teacher_out)
        to_data = weight * pixel_mean(student_out - x[None])
        level = precond.coefficients(sigma).c_noise if c.disc_noise_level else None
        # The student's adversarial term: phi stopped, so it trains theta only.
        ts, st = self._disc_logits(
            jax.lax.stop_gradient(trainable["disc"]), teacher_out, student_out, level
        )
        if c.adv_loss == "nonsaturating":
            adv = jax.nn.softplus(ts) + jax.nn.softplus(-st)
        else:  # The paper's log(1 - D): the negated discriminator loss.
            adv = -(jax.nn.softplus(-ts) + jax.nn.softplus(st))
        # The discriminator's BCE over both orders: the outputs stopped, so it trains phi only.
        ts_d, st_d = self._disc_logits(
            trainable["disc"], teacher_out, jax.lax.stop_gradient(student_out), level
        )
        disc_loss = jax.nn.softplus(-ts_d) + jax.nn.softplus(st_d)
        correct = (ts_d > 0).astype(jnp.float32) + (st_d < 0).astype(jnp.float32)
        return {
            "distill_teacher": jnp.mean(to_teacher),
            "distill_data": jnp.mean(to_data),
            "adv": jnp.mean(adv),
            "disc": jnp.mean(disc_loss),
            "disc_accuracy": jax.lax.stop_gradient(0.5 * jnp.mean(correct)),
        }

    def loss_per_example(
        self, trainable: base.PyTree, frozen: base.PyTree, example: base.Example, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The joint DP-SAD loss of ONE example: one scalar for student and discriminator.

        loss = w_t distill_teacher + w_x distill_data + lambda adv + w_D disc (the terms of
        ``loss_terms``, K-averaged inside). Its gradient w.r.t. ``trainable['student']``
        is that of L_dis + lambda L_adv, w.r.t. ``trainable['disc']`` that of w_D L_D;
        the engine clips the two together to C, once per example.

        Returns:
          (loss, {'loss', and every term of ``loss_terms``}).
        """
        c = self.config
        terms = self.loss_terms(trainable, frozen, example, key)
        loss = (
            c.teacher_weight * terms["distill_teacher"]
            + c.data_weight * terms["distill_data"]
            + c.adv_weight * terms["adv"]
            + c.disc_weight * terms["disc"]
        )
        return loss, {"loss": loss, **terms}

    def sample(
        self, params: base.Params, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> jax.Array:
        """``n`` images in [-1, 1] from the STUDENT only (DPDM's sampler); never the teacher."""
        student = base.Params(trainable=params.trainable["student"], frozen={})
        return self.student.sample(student, key, n, labels)


def make(config: Config, spec: base.DataSpec) -> DPSAD:
    """Builds DP-SAD for data ``spec``; loads and checks the teacher run."""
    return DPSAD(config, spec)


def make_released(config: Config, spec: base.DataSpec, record: dict) -> DPSAD:
    """DP-SAD rebuilt from an export, to sample its student: the teacher's settings
    from ``record`` (``DPSAD.release_record``); its weights are not in an export."""
    teacher = record.get("teacher")
    if not isinstance(teacher, dict):
        raise ValueError("model_config.json has no rebuild.teacher record (an export from "
                         "before dpjax wrote one); export the run again.")
    from dpjax import typed_config  # Deferred: keeps this module light.

    return DPSAD(config, spec, released_teacher=typed_config.from_configdict(
        dpdm.Config, teacher, "model_config.json rebuild.teacher"))
