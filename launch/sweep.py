"""Runs an experiment's ``sweep()`` locally, as a SLURM array job, or on a Cloud TPU VM.

An experiment file may define ``sweep() -> list[str]``: one string per point, the
experiment argument (what follows the colon in ``--config=file.py:ARG``) optionally
followed by config overrides, e.g. ``"eps=1 --config.seed=2"``. Every point gets its own
workdir ``ROOT/<point name>``, named from the point alone, so re-running a sweep resumes
every point where it stopped and never mixes two points.

    python -m launch.sweep experiments/dpdm_fmnist.py --root=runs/fm_sweep [--dry-run]
    python -m launch.sweep experiments/dpdm_fmnist.py --root=runs/fm --mode=slurm \
        --partition=gpu --time=24:00:00 [--dry-run]
    python -m launch.sweep experiments/dpdm_fmnist.py --root=/mnt/shared/fm --mode=tpu \
        --tpu-name=my-v4 --zone=us-central2-b [--dry-run]
    python -m launch.sweep experiments/toy_fake.py:smoke --root=/tmp/s --limit=2 --gpus=none

``FILE.py:BASE`` puts ``BASE`` in front of every point's argument (``smoke,sigma=1``).
Every point is checked before anything runs: its argument builds a config and every
``--config.KEY`` it sets exists. ``--dry-run`` writes the manifest (``ROOT/sweep.json``)
and the sbatch/TPU script and prints what would run, without running or submitting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from launch import local, slurm, tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES_KEY = "train.num_devices"


class SweepError(ValueError):
    """The experiment has no valid sweep, or a point is malformed."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point.

    Attributes:
      name: the workdir's basename, derived from the point's text only (stable).
      config_arg: the experiment argument string (base argument first).
      flags: ``--config.KEY=VALUE`` overrides passed to ``dpjax.main``.
    """

    name: str
    config_arg: str
    flags: tuple[str, ...]


def point_name(text: str) -> str:
    """A filesystem-safe name for a point from its text alone (the last part of each
    overridden key): 'eps=1 --config.optim.learning_rate=0.001' -> 'eps=1_learning_rate=0.001'."""
    text = re.sub(r"--config\.(?:[A-Za-z0-9_]+\.)*", " ", text)
    name = re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")
    return name or "default"


def parse_point(text: str, base_arg: str = "") -> Point:
    """Parses one point string (see the module docstring)."""
    tokens = shlex.split(text)
    flags = tuple(t for t in tokens if t.startswith("--"))
    args = [t for t in tokens if not t.startswith("--")]
    if len(args) > 1:
        raise SweepError(f"Point {text!r}: one experiment argument (a,b=1,...) at most.")
    for f in flags:
        if not re.fullmatch(r"--config\.[A-Za-z0-9_.]+=.*", f):
            raise SweepError(f"Point {text!r}: {f!r} is not a --config.KEY=VALUE override.")
    config_arg = ",".join(a for a in (base_arg, *args) if a)
    return Point(point_name(text), config_arg, flags)


def load_experiment(path: str) -> Any:
    """Imports an experiment file by path (the repository root goes on sys.path)."""
    if not os.path.isfile(path):
        raise SweepError(f"No experiment file {path}.")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    name = "_sweep_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    from dpjax import experiment_file  # Only here: the launcher's own imports stay light.

    return experiment_file.load(path, name)


def check_point(module: Any, point: Point) -> None:
    """Builds the point's config and checks every key it overrides exists (fail early)."""
    try:
        config = module.get_config(point.config_arg)
    except Exception as e:
        raise SweepError(f"Point {point.name}: get_config({point.config_arg!r}): {e}") from e
    for flag in point.flags:
        key = flag[len("--config.") :].split("=", 1)[0]
        try:
            _config_value(config, key)
        except KeyError:
            raise SweepError(f"Point {point.name}: the config has no key '{key}'.") from None


def _config_value(config: Any, key: str) -> Any:
    """The value at dotted ``key`` of a config.

    Raises:
      KeyError: the config has no such key.
    """
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


# Keys whose value makes others unused: a given noise multiplier replaces the target
# epsilon (run_setup plans with sigma and ignores dp.epsilon).
_OVERRIDES = {"dp.noise_multiplier": ("dp.epsilon",)}


def _check_sets_leave_the_sweep_alone(module: Any, points: list[Point], sets: Sequence[str]):
    """Refuses a ``--set`` of a key that the sweep varies: appended after the point's own
    flags, it would win, and every point would run the same value under its own label.

    A key is varied if a point's ``--config.KEY`` flag sets it, or if the points'
    experiment arguments give it different values (``eps=1`` and ``eps=10`` set
    ``dp.epsilon``). Setting a key also overrides the keys it makes unused
    (``_OVERRIDES``: ``dp.noise_multiplier`` over ``dp.epsilon``)."""
    configs = []  # Each point's config, built once; None for a bad point (check_point reports it).
    for p in points if sets else ():
        try:
            configs.append(module.get_config(p.config_arg))
        except Exception:
            configs.append(None)
    for s in sets:
        key = s.split("=", 1)[0]
        for varied in (key, *_OVERRIDES.get(key, ())):
            flagged = [p.name for p in points
                       if any(f.startswith(f"--config.{varied}=") for f in p.flags)]
            if flagged:
                raise SweepError(f"--set {s!r}: the points {flagged[:3]} set {varied} "
                                 "themselves; --set would override what the sweep varies.")
            try:
                values = {repr(_config_value(c, varied)) for c in configs if c is not None}
            except KeyError:  # A missing key: check_point reports it.
                continue
            if len(values) > 1:
                raise SweepError(
                    f"--set {s!r}: the points' arguments give {varied} different values "
                    f"({', '.join(sorted(values)[:4])}); --set would override what the sweep "
                    "varies.")


def sweep_points(
    experiment: str, limit: int = 0, sets: Sequence[str] = ()
) -> tuple[str, list[Point]]:
    """(experiment file, checked points) of ``FILE.py[:BASE]``; the first ``limit`` if > 0.

    ``sets`` (``KEY=VALUE``, given to every point) are checked with each point's flags."""
    path, _, base = experiment.partition(":")
    module = load_experiment(path)
    if not callable(getattr(module, "sweep", None)):
        raise SweepError(f"{path} defines no sweep() function.")
    texts = list(module.sweep())
    if limit > 0:
        texts = texts[:limit]
    if not texts:
        raise SweepError(f"{path}: sweep() returned no points.")
    points = [parse_point(t, base) for t in texts]
    names = [p.name for p in points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{path}: sweep points with the same workdir name: {dupes}.")
    for s in sets:
        if "=" not in s or not s.split("=", 1)[0]:
            raise SweepError(f"--set {s!r}: expected KEY=VALUE, e.g. --set train.log_every=50.")
    _check_sets_leave_the_sweep_alone(module, points, sets)
    for p in points:
        check_point(module, dataclasses.replace(p, flags=(*p.flags, *(f"--config.{s}"
                                                                       for s in sets))))
    return path, points


def command(
    python: str,
    experiment_path: str,
    point: Point,
    workdir: str,
    sets: Sequence[str] = (),
    all_devices: bool = False,
) -> list[str]:
    """The ``dpjax.main`` command line of a point (run from the repository root).

    ``all_devices`` adds ``--config.train.num_devices=0`` (data parallel over every device
    the process sees) unless the point sets the key itself.
    """
    config = f"--config={experiment_path}" + (f":{point.config_arg}" if point.config_arg else "")
    cmd = [python, "-m", "dpjax.main", config, f"--workdir={workdir}", *point.flags]
    cmd += [f"--config.{s}" for s in sets]
    if all_devices and not any(f.startswith(f"--config.{NUM_DEVICES_KEY}=") for f in cmd):
        cmd.append(f"--config.{NUM_DEVICES_KEY}=0")
    return cmd


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="experiments/FILE.py[:BASE_ARG] defining sweep()")
    p.add_argument("--root", required=True, help="one workdir per point under this directory")
    p.add_argument("--mode", choices=("local", "slurm", "tpu"), default="local")
    p.add_argument("--dry-run", action="store_true", help="write and print, run nothing")
    p.add_argument("--limit", type=int, default=0, help="only the first N points")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every point, e.g. --set train.log_every=50",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where sweep.json and scripts go (default: ROOT; tpu: workdirs/sweeps/<ROOT's name>)",
    )
    p.add_argument(
        "--python", default=None, help="interpreter of the runs (default: this one; tpu: python3)"
    )
    g = p.add_argument_group("local")
    g.add_argument("--gpus", default="auto", help="'auto', 'none' or ids '0,1,2'")
    g.add_argument("--gpus-per-point", type=int, default=1)
    g.add_argument("--parallel", type=int, default=1, help="concurrent points without GPUs")
    g = p.add_argument_group("slurm")
    g.add_argument("--partition", default="")
    g.add_argument("--account", default="")
    g.add_argument("--time", default="24:00:00")
    g.add_argument("--cpus-per-task", type=int, default=8)
    g.add_argument("--mem", default="")
    g.add_argument("--nodes-per-point", type=int, default=1)
    g.add_argument("--max-parallel", type=int, default=0, help="array throttle %%N")
    g.add_argument("--signal-seconds", type=int, default=300)
    g = p.add_argument_group("tpu")
    g.add_argument("--tpu-name", default="")
    g.add_argument("--zone", default="")
    g.add_argument("--project", default="")
    g.add_argument("--repo-dir", default="~/dpjax", help="the checkout on the TPU workers")
    return p


def _rel(path: str) -> str:
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO) if full.startswith(REPO + os.sep) else full


def _experiment_key(experiment: str) -> str:
    """``FILE.py[:BASE]`` with FILE resolved, so that two spellings of one file compare equal."""
    path, sep, base = experiment.partition(":")
    return os.path.realpath(path) + sep + base


def _check_previous_sweep(manifest_path: str, root: str, experiment: str) -> str | None:
    """Why this sweep must not reuse the folder of ``manifest_path`` (None: it may).

    A point's workdir is named from the point's text alone, so a second sweep of another
    experiment (or another ``FILE.py:BASE``) into the same ROOT would send every point to
    a workdir holding a run of a different config: each would then fail at its start
    (dpjax refuses to resume a changed config). This says so once, before anything runs.
    ``--set`` changes are left to dpjax, which lets a resume change its free fields."""
    if not os.path.exists(manifest_path):
        return None
    try:
        with open(manifest_path) as f:
            previous = json.load(f)
        other_root, other_experiment = previous["root"], previous["experiment"]
        # A manifest written before the key was recorded: its experiment as given (a
        # path relative to the repository root, where sweeps run from).
        other_key = previous.get("experiment_key") or _experiment_key(other_experiment)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return (f"{manifest_path} is unreadable ({e}); it records the sweep in ROOT. "
                "Restore or delete it, or give another --out.")
    if other_root != root:  # E.g. two TPU ROOTs with one basename: one default --out.
        return (f"{os.path.dirname(manifest_path)} holds the sweep of ROOT {other_root}, "
                f"not {root}; give another --out.")
    if other_key != _experiment_key(experiment):
        return (f"ROOT {root} holds the sweep of {other_experiment}, not {experiment}: its "
                "points' workdirs would hold runs of other configs. Give another --root.")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (non-zero if a point failed)."""
    a = _parser().parse_args(argv)
    try:
        path, points = sweep_points(a.experiment, a.limit, a.set)
    except SweepError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    remote = a.mode == "tpu"
    if remote and not (a.tpu_name and a.zone):  # Before anything is written.
        print("sweep error: --mode=tpu needs --tpu-name and --zone.", file=sys.stderr)
        return 2
    if remote and not os.path.abspath(path).startswith(REPO + os.sep):
        print(f"sweep error: --mode=tpu runs {path} on the workers from --repo-dir, so it "
              "must be a file of this repository (experiments/...).", file=sys.stderr)
        return 2
    # '--root=~/x' reaches us unexpanded (the shell expands only a leading '~'). Locally
    # it is this user's home; on TPU workers the path stays as given and dpjax.main
    # expands it there (each worker's own home: shared storage needs an explicit path).
    root = a.root if remote else os.path.abspath(os.path.expanduser(a.root))
    python = a.python or ("python3" if remote else sys.executable)
    devices = a.gpus_per_point if a.mode == "local" else a.gpus_per_point * a.nodes_per_point
    all_devices = remote or devices > 1
    exp = _rel(path)
    jobs = [
        local.Job(
            p.name,
            command(python, exp, p, f"{root}/{p.name}", a.set, all_devices),
            f"{root}/{p.name}",
        )
        for p in points
    ]
    # Local files (manifest, scripts): ROOT itself, except for a TPU sweep whose ROOT is
    # a path on the workers.
    default_out = os.path.join(REPO, "workdirs", "sweeps", os.path.basename(root.rstrip("/")))
    meta_dir = os.path.abspath(a.out or (default_out if remote else root))
    # The manifest goes to --out, and a local ROOT keeps its own copy too: the check that
    # ROOT holds this experiment's sweep must not depend on which --out was given.
    manifest_dirs = [meta_dir] + ([root] if not remote and root != meta_dir else [])
    for d in manifest_dirs:
        error = _check_previous_sweep(os.path.join(d, "sweep.json"), root, a.experiment)
        if error:
            print(f"sweep error: {error}", file=sys.stderr)
            return 2
    os.makedirs(meta_dir, exist_ok=True)
    manifest = {
        "experiment": a.experiment,
        "experiment_key": _experiment_key(a.experiment),
        "root": root,
        "mode": a.mode,
        "points": [
            {
                "name": p.name,
                "config_arg": p.config_arg,
                "flags": list(p.flags),
                "workdir": j.workdir,
                "command": shlex.join(j.cmd),
            }
            for p, j in zip(points, jobs)
        ],
    }
    for d in manifest_dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "sweep.json"), "w") as f:
            json.dump(manifest, f, indent=2)
    names, cmds = [j.name for j in jobs], [j.cmd for j in jobs]
    if a.mode == "slurm":
        opts = slurm.SlurmOptions(
            job_name="dpjax-" + os.path.splitext(os.path.basename(path))[0],
            time=a.time,
            partition=a.partition,
            account=a.account,
            gpus_per_point=a.gpus_per_point,
            nodes_per_point=a.nodes_per_point,
            cpus_per_task=a.cpus_per_task,
            mem=a.mem,
            max_parallel=a.max_parallel,
            signal_seconds=a.signal_seconds,
            log_dir=os.path.join(root, "slurm"),
        )
        os.makedirs(opts.log_dir, exist_ok=True)
        script = os.path.join(meta_dir, "sweep.sbatch")
        with open(script, "w") as f:
            f.write(slurm.sbatch_script(names, cmds, REPO, opts))
        for i, j in enumerate(jobs):
            print(f"[sweep] task {i}: {shlex.join(j.cmd)}")
        if a.dry_run:
            print(f"[sweep] dry run: wrote {script}; submit with: sbatch {shlex.quote(script)}")
            return 0
        return subprocess.run(["sbatch", script], check=False).returncode
    if a.mode == "tpu":
        opts = tpu.TpuOptions(a.tpu_name, a.zone, a.project, a.repo_dir)
        script = os.path.join(meta_dir, "sweep_tpu.sh")
        with open(script, "w") as f:
            f.write(tpu.tpu_script(names, cmds, opts))
        os.chmod(script, 0o755)
        for j in jobs:
            print(f"[sweep] all workers: {tpu.remote_command(j.cmd, a.repo_dir)}")
        if a.dry_run:
            print(f"[sweep] dry run: wrote {script}; run it with: bash {shlex.quote(script)}")
            return 0
        return subprocess.run(["bash", script], check=False).returncode
    try:
        slots = local.make_slots(local.detect_gpus(a.gpus), a.gpus_per_point, a.parallel)
    except local.SlotError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        for i, j in enumerate(jobs):
            slot = slots[i] if i < len(slots) else "queued"
            where = "CPU" if slot is None else slot
            env = "" if slot in (None, "queued") else f"CUDA_VISIBLE_DEVICES={slot} "
            print(f"[sweep] {j.name} [{where}]: {env}{shlex.join(j.cmd)}")
        print(f"[sweep] dry run: {len(jobs)} points on {len(slots)} slot(s); nothing ran.")
        return 0
    results = local.run_local(jobs, slots, cwd=REPO)
    failed = sorted(n for n, rc in results.items() if rc != 0)
    print(
        f"[sweep] {len(results) - len(failed)}/{len(results)} points succeeded"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
