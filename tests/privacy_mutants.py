"""Mutation check of the privacy-critical code: every mutant here must fail a test.

Each mutant is one small edit that would break a guarantee (noise too small or reused,
a wrong sensitivity, a release left out of the accountant, a leak through a source run,
a teacher in an export). The script applies one mutant at a time, runs the tests named
with it, restores the file (also on Ctrl-C), and reports KILLED (a test failed, as it
must) or SURVIVED (no test noticed: a hole in the suite). It exits 1 if any survived, or
if a mutant's text no longer occurs exactly once (the code moved: update the mutant).

Not part of ``make test`` (each mutant re-runs its tests: about 15 minutes for all on 2 cores)::

    make mutants    # or: PYTHONPATH=. .venv/bin/python tests/privacy_mutants.py [-k SUBSTRING]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


ENGINE = ("tests/test_privacy_engine.py",)

MUTANTS = (
    Mutant("noise std 0.7 sigma C", "dpjax/privacy/noise.py",
           "x.astype(jnp.float32) + std * z", "x.astype(jnp.float32) + 0.7 * std * z", ENGINE),
    Mutant("one key for every piece of the noise", "dpjax/privacy/noise.py",
           "jax.random.fold_in(key, i)", "key", ENGINE),
    Mutant("one noise key for every step", "dpjax/privacy/dp_step.py",
           "jax.random.fold_in(streams.noise, t)", "streams.noise", ENGINE),
    Mutant("Poisson rate 0.8 q", "dpjax/privacy/sampling.py",
           "< self.rate)", "< 0.8 * self.rate)", ENGINE),
    Mutant("clip factor up to 2", "dpjax/privacy/clipping.py",
           "jnp.minimum(1.0, clip_norm", "jnp.minimum(2.0, clip_norm", ENGINE),
    Mutant("padding rows not masked", "dpjax/privacy/clipping.py",
           "return jnp.where(valid, scale, 0.0)", "return scale", ENGINE),
    Mutant("routed sum halved", "dpjax/privacy/clipping.py",
           "return jax.ops.segment_sum(", "return 0.5 * jax.ops.segment_sum(",
           ("tests/test_dplflow.py", "-k", "routed")),
    Mutant("an out-of-range route summed into slice 0", "dpjax/privacy/clipping.py",
           "loss = jnp.where(in_range, loss, jnp.nan)", "loss = loss",
           ("tests/test_dplflow.py", "-k", "routed")),
    Mutant("the update divided by 0.9 N q, not N q", "dpjax/privacy/private_gradient.py",
           "lambda g: g / plan.expected_batch_size",
           "lambda g: g / jax.numpy.maximum(1, 0.9 * plan.expected_batch_size)", ENGINE),
    Mutant("layerwise conv bias halved", "dpjax/privacy/unfolding.py",
           'out["bias"] = jnp.sum(gg, axis=1, dtype=f32)',
           'out["bias"] = 0.5 * jnp.sum(gg, axis=1, dtype=f32)',
           ("tests/test_layerwise.py",)),
    Mutant("the outside-use check ignores every use", "dpjax/privacy/layerwise.py",
           'if eqn.primitive.name == "stop_gradient":', "if True:",
           ("tests/test_layerwise.py", "-k", "outside")),
    Mutant("the clipped sum at TF32 precision on GPUs", "dpjax/privacy/clipping.py",
           "jnp.where(keep, g, 0.0), precision=lax.Precision.HIGHEST",
           "jnp.where(keep, g, 0.0)", ("tests/test_ghost.py", "-k", "highest")),
    Mutant("ghost norm without cross-position terms", "dpjax/privacy/ghost.py",
           "jnp.sum(uu * gg_gram, axis=(1, 2))",
           "jnp.sum(jnp.diagonal(uu * gg_gram, axis1=1, axis2=2), axis=1)",
           ("tests/test_ghost.py",)),
    Mutant("ghost norm without its rounding bound", "dpjax/privacy/ghost.py",
           "return jnp.square(jnp.sqrt(ghost_sq + gram_error) + (b * t + 2) * u * s)",
           "return ghost_sq", ("tests/test_ghost.py", "-k", "cancel")),
    Mutant("a plan reused over changed prior releases", "dpjax/run_setup.py",
           "            if planned != prior:", "            if False:",
           ("tests/test_train_loop.py", "-k", "prior_release")),
    Mutant("a shared kernel ghost-normed per call", "dpjax/privacy/ghost.py",
           "if not all(uses[i] == 1 for i in call.leaf_ids):", "if False:",
           ("tests/test_ghost.py",)),
    Mutant("a NaN row's input not zeroed in the ghost sum", "dpjax/privacy/ghost.py",
           'jnp.einsum("btc,bto->co", jnp.where(keep, v, 0.0), wg, precision=_HI)',
           'jnp.einsum("btc,bto->co", v, wg, precision=_HI)',
           ("tests/test_ghost.py",)),
    Mutant("half the DP-SGD steps accounted", "dpjax/privacy/accounting.py",
           "SelfComposedDpEvent(step, steps)", "SelfComposedDpEvent(step, max(1, steps // 2))",
           ("tests/test_accounting.py",)),
    Mutant("RDP replace-one sensitivity C", "dpjax/privacy/accounting.py",
           "GaussianDpEvent(event.noise_multiplier / 2.0)",
           "GaussianDpEvent(event.noise_multiplier)", ("tests/test_accounting.py",)),
    Mutant("only the first event accounted", "dpjax/privacy/accounting.py",
           "event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(list(events))",
           "event = events[0]", ("tests/test_accounting.py",)),
    Mutant("prior releases left out of calibration", "dpjax/privacy/plan.py",
           "accountant, neighbouring, extra_events=prior_events", "accountant, neighbouring",
           ("tests/test_accounting.py", "tests/test_dpsad.py")),
    Mutant("T = epochs / (2q)", "dpjax/privacy/plan.py",
           "steps = int(epochs / q)", "steps = int(epochs / q / 2)", ("tests/test_accounting.py",)),
    Mutant("a NaN noise multiplier accounted as free", "dpjax/privacy/accounting.py",
           "    for e in events:\n        check_event(e)\n", "", ("tests/test_accounting.py",)),
    Mutant("delta of 1/N or more accepted", "dpjax/privacy/plan.py",
           "not 0.0 < delta < 1.0 / num_examples", "not 0.0 < delta < 1.0",
           ("tests/test_accounting.py",)),
    Mutant("the plan file and report after the checkpoint", "dpjax/run_records.py",
           "        _write_records(run, steps_done, meta)\n"
           "    run.checkpointer.save(steps_done, state, meta)",
           "        pass\n    run.checkpointer.save(steps_done, state, meta)\n"
           "    if parallel.is_main_process():\n        _write_records(run, steps_done, meta)",
           ("tests/test_train_loop.py",)),
    Mutant("a resume may change sigma", "dpjax/privacy/plan.py",
           'if k != "steps"', 'if k not in ("steps", "noise_multiplier")',
           ("tests/test_accounting.py",)),
    Mutant("releases left out of the report", "dpjax/privacy/report.py",
           "[plan.dp_event(steps_done), *extra]", "[plan.dp_event(steps_done)]",
           ("tests/test_accounting.py", "tests/test_dpmepf.py", "tests/test_dpsad.py")),
    Mutant("a prior DP-SGD run at half its steps", "dpjax/privacy/report.py",
           'int(release["steps"]),', 'int(release["steps"]) // 2,',
           ("tests/test_dpsad.py",)),
    Mutant("a non-private release costs nothing", "dpjax/privacy/report.py",
           "        return dp_accounting.NonPrivateDpEvent()",
           "        return dp_accounting.NoOpDpEvent()",
           ("tests/test_accounting.py", "tests/test_dpmepf.py", "tests/test_train_loop.py")),
    Mutant("a DP source deeper in the chain is composed", "dpjax/privacy/provenance.py",
           "if not top.composed or depth > 0:", "if not top.composed:",
           ("tests/test_provenance.py",)),
    Mutant("sources of sources not checked", "dpjax/privacy/provenance.py",
           "        _check_chain(top, nested_what, nested_dir, private, depth + 1, (*seen, key))",
           "        pass", ("tests/test_provenance.py",)),
    Mutant("only init_from followed", "dpjax/privacy/provenance.py",
           'if key.endswith("_from") and', 'if key == "init_from" and',
           ("tests/test_provenance.py",)),
    Mutant("a composed source's randomness not checked", "dpjax/privacy/provenance.py",
           "            check_composed_randomness(source, run, seed, secret_noise)",
           "            pass",
           ("tests/test_provenance.py",)),
    Mutant("a composed source with seed-derived noise accepted", "dpjax/privacy/provenance.py",
           '    elif secret_noise:\n        raise PrivacyError(',
           '    elif False:\n        raise PrivacyError(',
           ("tests/test_provenance.py",)),
    Mutant("the loop does not pass its secret_noise to the source check", "dpjax/run_setup.py",
           "cfg.seed,\n                                 cfg.dp.secret_noise)",
           "cfg.seed,\n                                 False)",
           ("tests/test_dpsad.py", "-k", "seed")),
    Mutant("PLD calibration bracket never widened", "dpjax/privacy/calibration.py",
           "        for _ in range(_PLD_BRACKET_HALVINGS):", "        for _ in range(0):",
           ("tests/test_accounting.py", "-k", "large_prior")),
    Mutant("DP-MEPF composes the plan file's lagging step count", "dpjax/methods/dpmepf.py",
           '"steps_done": int(step)}', '"steps_done": plan_file.get("steps_done", 0)}',
           ("tests/test_dpmepf.py", "-k", "composed")),
    Mutant("DP-MEPF release noise 0.5 sigma", "dpjax/methods/dpmepf.py",
           "sums + sigma * jax.random", "sums + 0.5 * sigma * jax.random",
           ("tests/test_dpmepf.py",)),
    Mutant("DP-MEPF validation release reuses the main noise", "dpjax/methods/dpmepf.py",
           "s_val * jax.random.normal(k_val,", "s_val * jax.random.normal(k_main,",
           ("tests/test_dpmepf.py",)),
    Mutant("DP-MEPF validation release not accounted", "dpjax/methods/dpmepf.py",
           "        if self.config.val_noise_scale > 0:\n            events.append(",
           "        if False:\n            events.append(", ("tests/test_dpmepf.py",)),
    Mutant("a release making fewer mechanisms than planned passes", "dpjax/advance.py",
           "or len(made) != len(planned)", "or False",
           ("tests/test_dpmepf.py", "-k", "not_the_planned")),
    Mutant("DP-MEPF padding rows counted", "dpjax/methods/dpmepf.py",
           "keep = (rows >= 0) & jnp.all(", "keep = (rows >= -1) & jnp.all(",
           ("tests/test_dpmepf.py",)),
    Mutant("DP-SAD exports its teacher", "dpjax/methods/dpsad.py",
           "        del frozen\n        return {}", "        return frozen",
           ("tests/test_dpsad.py",)),
    Mutant("export ignores the method's exported_frozen", "dpjax/export.py",
           "public_frozen = exported_frozen(run.method, run.state.frozen)",
           "public_frozen = run.state.frozen", ("tests/test_dpsad.py",)),
    Mutant("an export says that an audit on the private rows passed", "dpjax/model_card.py",
           'return {"status": "none"}  # Not even', 'return {"status": "passed"}  # Not even',
           ("tests/test_export.py", "-k", "audit")),
    Mutant("downstream model selection on the real test set", "dpjax/eval/downstream.py",
           "    val = (jnp.asarray(val_x), jnp.asarray(val_y))",
           "    val = (jnp.asarray(test_x), jnp.asarray(test_y))",
           ("tests/test_downstream.py", "-k", "never_looks")),
    Mutant("DP-SAD teacher chain not checked", "dpjax/methods/dpsad_teacher.py",
           "    provenance.check_sources_against([source], config.private_data)", "    pass",
           ("tests/test_dpsad.py", "-k", "without_dp")),
    Mutant("DP noise from the public seed", "dpjax/run_noise.py",
           "    streams = dataclasses.replace(streams, noise=noise_secret.noise_key(noise))\n",
           "", ("tests/test_noise_secret.py", "-k", "follows or loss_draws")),
    Mutant("Poisson batches from the public seed", "dpjax/run_noise.py",
           "    return streams, batches, source, loss_source",
           "    return streams, sampler_seed(cfg.seed), source, loss_source",
           ("tests/test_noise_secret.py", "-k", "follows")),
    Mutant("per-example loss draws from the public seed", "dpjax/run_noise.py",
           "        streams = dataclasses.replace(streams, loss=noise_secret.loss_key(noise))",
           "        pass", ("tests/test_noise_secret.py", "-k", "loss_draws")),
    Mutant("loss key on the noise key's fold_in chain", "dpjax/privacy/noise_secret.py",
           '    digest = hashlib.sha256(_LOSS_LABEL + secret.to_bytes(SECRET_BITS // 8, "little"))'
           '.digest()\n', "    return jax.random.fold_in(noise_key(secret), 1)\n",
           ("tests/test_noise_secret.py", "-k", "come_from_the_secret")),
    Mutant("a checkpoint without loss_source counts as secret draws",
           "dpjax/privacy/noise_secret.py",
           "    return NONE if meta.get(NOISE_SOURCE_KEY) == NONE else SEED",
           "    return NONE if meta.get(NOISE_SOURCE_KEY) == NONE else SECRET",
           ("tests/test_noise_secret.py", "-k", "come_from_the_secret")),
    Mutant("a pre-loss-draws secret replayed from step 0", "dpjax/privacy/noise_secret.py",
           "    if stored is not None and not resuming and stored.get(LOSS_DRAWS_FIELD) != "
           "LOSS_DRAWS_SECRET:", "    if False:",
           ("tests/test_noise_secret.py", "-k", "before_secret_loss")),
    Mutant("a composed source with seed loss draws", "dpjax/privacy/provenance.py",
           "        if not run.loss_draws_void:\n            return\n", "        return\n",
           ("tests/test_provenance.py", "-k", "needs_secret_noise")),
    Mutant("a routed sum weights a dropped row's NaN", "dpjax/privacy/clipping.py",
           "jax.ops.segment_sum(jnp.where(keep, w * g, 0.0), routes, num_segments=k)",
           "jax.ops.segment_sum((w * g), routes, num_segments=k)",
           ("tests/test_privacy_engine.py", "-k", "routed_sum")),
    Mutant("RDP replace-one rewrite skips composed events", "dpjax/privacy/accounting.py",
           "        return dp_accounting.ComposedDpEvent(\n"
           "            [for_accountant(e, kind, relation) for e in event.events]\n"
           "        )", "        return event",
           ("tests/test_accounting.py", "-k", "inside_a_composition")),
    Mutant("calibration returns the search's sigma unchecked", "dpjax/privacy/calibration.py",
           "        if got <= target_epsilon:\n            return sigma\n        sigma += tol",
           "        if True:\n            return sigma\n        sigma += tol",
           ("tests/test_accounting.py", "-k", "checks_the_searchs")),
    Mutant("export of a run with public loss draws", "dpjax/privacy/noise_secret.py",
           'return loss_source == SEED and mechanism != "release"',
           'return False and mechanism != "release"',
           ("tests/test_noise_secret.py", "-k", "loss_draws")),
    Mutant("a resume draws a new noise secret", "dpjax/privacy/noise_secret.py",
           "stored = _read(path) if (resuming or reuse) and os.path.exists(path) else None",
           "stored = _read(path) if reuse and os.path.exists(path) else None",
           ("tests/test_noise_secret.py", "-k", "resume")),
    Mutant("export of a run with seed-derived noise", "dpjax/export.py",
           "    check_secret_noise(run.meta, run.plan)\n", "",
           ("tests/test_noise_secret.py", "-k", "export_refuses")),
    Mutant("npz float range guessed from every image", "dpjax/data/npz.py",
           "        low = -1.0 if float_range == \"-1,1\" else 0.0",
           "        low = -1.0 if images.min() < 0 else 0.0",
           ("tests/test_data.py", "-k", "other_images")),
    Mutant("data.limit accepted for a private run", "dpjax/run_config.py",
           "    if data.limit:\n", "    if False:\n",
           ("tests/test_export.py", "-k", "began_with")),
    Mutant("a private run that read float npz before float_range goes on", "dpjax/data/npz.py",
           "    if floats:\n", "    if False:\n",
           ("tests/test_train_loop.py", "-k", "from_before_float_range")),
    Mutant("the loop stops on the private loss", "dpjax/train.py",
           "private_loss = plan.enabled and loss_name.endswith(\"_nonprivate\")",
           "private_loss = False",
           ("tests/test_train_loop.py", "-k", "overflows")),
    Mutant("DP-MEPF: a non-finite feature row spreads to every class", "dpjax/methods/dpmepf.py",
           "row = jnp.where(keep[:, None], row, 0.0)", "row = row * keep[:, None]",
           ("tests/test_dpmepf.py", "-k", "non_finite_features")),
    Mutant("a composed source's plan file is trusted over its checkpoint",
           "dpjax/privacy/provenance.py",
           "    if not plan_lib.recorded_plan_matches(recorded, plan):",
           "    if False:",
           ("tests/test_dpsad.py", "-k", "plan_file")),
    Mutant("a private run skips the method's own source checks", "dpjax/run_setup.py",
           "            method.check_private_run()\n", "            pass\n",
           ("tests/test_dpsad.py", "-k", "any_teacher")),
    Mutant("export skips the method's own source checks", "dpjax/export.py",
           "        run.method.check_private_run()  # As run setup did",
           "        pass  # As run setup did",
           ("tests/test_dpsad.py", "-k", "any_teacher")),
    Mutant("a device's looped micro-batches stop after its first", "dpjax/privacy/dp_step.py",
           "num_local = jnp.sum(mask.astype(jnp.int32))",
           "num_local = jnp.minimum(jnp.sum(mask.astype(jnp.int32)), 1)",
           ("tests/test_multidevice.py", "-k", "looped_or_unrolled")),
    Mutant("a report without a finite epsilon states a guarantee", "dpjax/privacy/report.py",
           'if report.get("epsilon") and stated_epsilon(report) is None:', "if False:",
           ("tests/test_accounting.py", "-k", "gate_on")),
    Mutant("the guarantee's epsilon is the largest, nan included", "dpjax/privacy/report.py",
           "finite = sorted((v, k) for k, v in eps.items() if math.isfinite(v))",
           "finite = sorted(((v, k) for k, v in eps.items()), reverse=True)",
           ("tests/test_accounting.py", "-k", "gate_on")),
)  # fmt: skip


def run_mutant(m: Mutant) -> str:
    """'KILLED', 'SURVIVED', 'STALE' (the text to mutate is not there exactly once) or
    'INVALID' (the mutated file does not compile: it would fail every test for nothing)."""
    path = ROOT / m.path
    original = path.read_text()
    if original.count(m.old) != 1:
        return "STALE"
    mutated = original.replace(m.old, m.new)
    try:
        compile(mutated, str(path), "exec")
    except SyntaxError:
        return "INVALID"
    try:
        path.write_text(mutated)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    finally:
        path.write_text(original)
    return "SURVIVED" if result.returncode == 0 else "KILLED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run the mutants whose name contains this")
    args = parser.parse_args()
    bad = 0
    for m in MUTANTS:
        if args.k not in m.name:
            continue
        outcome = run_mutant(m)
        bad += outcome != "KILLED"
        print(f"{outcome:8s} {m.name} ({m.path})", flush=True)
    print(f"{bad} mutant(s) not killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
