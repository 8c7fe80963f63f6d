"""launch/: sweep points, the SLURM array file, the TPU VM script, the local queue."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from launch import local, sweep, tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_bin(tmp_path, name, body):
    """An executable shell script ``name`` in tmp_path/bin that appends its argv to $FAKE_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f'#!/bin/bash\necho "{name} $*" >> "$FAKE_LOG"\n{body}\n')
    path.chmod(0o755)
    return path


def _dry_main(monkeypatch, args):
    """``sweep.main(args)`` with subprocesses forbidden: a dry run runs or submits nothing."""

    def forbidden(*a, **k):
        raise AssertionError(f"dry run ran {a}")

    with monkeypatch.context() as m:
        m.setattr(subprocess, "run", forbidden)
        m.setattr(subprocess, "Popen", forbidden)
        return sweep.main(args)


def test_sweeps_of_the_experiments():
    path, points = sweep.sweep_points("experiments/dpdm_fmnist.py")
    assert [p.config_arg for p in points] == [f"eps={e}" for e in (10, 10, 1, 1, 0.2, 0.2)]
    assert [p.flags for p in points][:2] == [("--config.seed=0",), ("--config.seed=1",)]
    assert len({p.name for p in points}) == 6 and points[0].name == "eps=10_seed=0"
    _, toy = sweep.sweep_points("experiments/toy_fake.py:smoke", limit=2)
    assert [p.config_arg for p in toy] == ["smoke,sigma=0.5", "smoke,sigma=0.5"]
    assert toy[1].name == "sigma=0.5_learning_rate=0.001"
    cmd = sweep.command("py", "experiments/toy_fake.py", toy[0], "/w/x", ["train.log_every=5"])
    assert cmd == [
        "py", "-m", "dpjax.main", "--config=experiments/toy_fake.py:smoke,sigma=0.5",
        "--workdir=/w/x", "--config.optim.learning_rate=0.0003", "--config.train.log_every=5",
    ]  # fmt: skip
    assert sweep.command("py", "e.py", toy[0], "/w", all_devices=True)[-1] == (
        "--config.train.num_devices=0"
    )


def test_bad_points_fail_before_anything_runs(tmp_path):
    with pytest.raises(sweep.SweepError, match="not a --config"):
        sweep.parse_point("eps=1 --workdir=/x")
    with pytest.raises(sweep.SweepError, match="one experiment argument"):
        sweep.parse_point("eps=1 eps=2")
    exp = tmp_path / "exp.py"

    def write(points):
        exp.write_text(
            "from experiments import toy_fake\nget_config = toy_fake.get_config\n"
            f"def sweep():\n    return {points!r}\n"
        )

    write(["sigma=1 --config.optim.learning_rat=0.1"])
    with pytest.raises(sweep.SweepError, match="no key 'optim.learning_rat'"):
        sweep.sweep_points(str(exp))
    write(["sigma=1 --config.seed=1", "sigma=1 --config.seed=1"])
    with pytest.raises(sweep.SweepError, match="same workdir name"):
        sweep.sweep_points(str(exp))
    write(["sigmaa=2"])
    with pytest.raises(sweep.SweepError, match="sigmaa"):
        sweep.sweep_points(str(exp))
    write(["sigma=1", "sigma=2"])  # --set applies to every point: checked with each.
    with pytest.raises(sweep.SweepError, match="no key 'train.log_evry'"):
        sweep.sweep_points(str(exp), sets=["train.log_evry=5"])
    with pytest.raises(sweep.SweepError, match="expected KEY=VALUE"):
        sweep.sweep_points(str(exp), sets=["bogus"])
    assert len(sweep.sweep_points(str(exp), sets=["train.log_every=5"])[1]) == 2
    # A --set of what the sweep varies would win over every point (appended last) and
    # run one value under many labels: refused, whether a flag or the argument varies it.
    with pytest.raises(sweep.SweepError, match="set optim.learning_rate themselves"):
        sweep.sweep_points("experiments/toy_fake.py", sets=["optim.learning_rate=0.01"])
    with pytest.raises(sweep.SweepError, match="give dp.noise_multiplier different values"):
        sweep.sweep_points(str(exp), sets=["dp.noise_multiplier=3.0"])
    # A given sigma makes the target epsilon unused: over an epsilon sweep, refused too.
    with pytest.raises(sweep.SweepError, match="give dp.epsilon different values"):
        sweep.sweep_points("experiments/dpdm_fmnist.py", sets=["dp.noise_multiplier=1.0"])
    assert sweep.main(["experiments/common.py", "--root", str(tmp_path / "r"), "--dry-run"]) == 2


def test_slurm_array_file_dry_run_and_requeue(tmp_path, capsys, monkeypatch):
    fake_py = _fake_bin(tmp_path, "fakepy", "sleep 2\nexit 3")
    _fake_bin(tmp_path, "scontrol", "")
    root = tmp_path / "runs"
    args = ["experiments/dpdm_fmnist.py", "--root", str(root), "--mode=slurm", "--dry-run",
            "--partition=gpu", "--time=12:00:00", "--max-parallel=4",
            f"--python={fake_py}"]  # fmt: skip
    assert _dry_main(monkeypatch, args) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and f"sbatch {root}/sweep.sbatch" in out
    text = (root / "sweep.sbatch").read_text()
    for line in ("#SBATCH --array=0-5%4", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00",
                 f'#SBATCH --output="{root}/slurm/%A_%a.out"', f"cd {ROOT}",
                 'scontrol requeue "$TASK"', "trap requeue USR1"):  # fmt: skip
        assert line in text, line
    manifest = json.loads((root / "sweep.json").read_text())
    assert len(manifest["points"]) == 6
    for i, p in enumerate(manifest["points"]):
        assert f"  {i}) POINT={shlex.quote(p['name'])}; CMD=({p['command']}) ;;" in text
        assert p["workdir"] == f"{root}/{p['name']}"
        assert f"--workdir={p['workdir']}" in p["command"]
    assert (root / "slurm").is_dir()
    subprocess.run(["bash", "-n", str(root / "sweep.sbatch")], check=True)
    # Execute task 2 as SLURM would, with fake python/scontrol, and send the time-limit
    # signal: the task requeues itself, keeps waiting for its run, returns its exit code.
    log = tmp_path / "fake.log"
    env = dict(os.environ, FAKE_LOG=str(log), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
               SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="2")  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(root / "sweep.sbatch")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 20
    while not (log.exists() and "fakepy" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, output
    calls = log.read_text().splitlines()
    assert calls[0] == f"fakepy {manifest['points'][2]['command'].split(' ', 1)[1]}"
    assert "scontrol requeue 77_2" in calls
    assert "requeueing 77_2" in output


def test_multi_node_points_run_one_process_per_gpu():
    """JAX gives each srun task the GPU of its SLURM_LOCALID: one task per node would
    train on GPU 0 of each node only."""
    from launch import slurm

    text = slurm.sbatch_script(["a"], [["python", "-m", "dpjax.main"]], "/repo",
                               slurm.SlurmOptions("j", gpus_per_point=4, nodes_per_point=2))
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4",
                 "CMD=(srun --kill-on-bad-exit=1 python -m dpjax.main)"):
        assert line in text, line
    single = slurm.sbatch_script(["a"], [["python"]], "/repo",
                                 slurm.SlurmOptions("j", gpus_per_point=4))
    assert "ntasks-per-node" not in single and "srun" not in single


def test_tpu_script(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "local"
    args = ["experiments/dpdm_fmnist.py", "--root=/mnt/shared/fm", "--mode=tpu", "--dry-run",
            "--tpu-name=v4-pod", "--zone=us-central2-b", "--project=proj",
            "--repo-dir=~/src/dpjax", f"--out={out_dir}"]  # fmt: skip
    assert _dry_main(monkeypatch, args) == 0
    script = out_dir / "sweep_tpu.sh"
    text = script.read_text()
    assert "TPU=v4-pod" in text and "ZONE=us-central2-b" in text
    assert (
        'gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --project=proj --worker=all '
        '--command="$2"' in text
    )
    assert text.count("run_point eps=") == 6
    subprocess.run(["bash", "-n", str(script)], check=True)
    # Run it with a fake gcloud: one call per point, same command on all workers.
    _fake_bin(tmp_path, "gcloud", "")
    log = tmp_path / "fake.log"
    env = dict(os.environ, FAKE_LOG=str(log), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    assert len(calls) == 6
    first = (
        "gcloud compute tpus tpu-vm ssh v4-pod --zone=us-central2-b --project=proj --worker=all "
        "--command=cd ~/src/dpjax && DPJAX_DISTRIBUTED=1 python3 -m dpjax.main "
        "--config=experiments/dpdm_fmnist.py:eps=10 --workdir=/mnt/shared/fm/eps=10_seed=0 "
        "--config.seed=0 --config.train.num_devices=0"
    )
    assert calls[0] == first
    # A failing point does not stop the later ones; the failures are listed, exit 1.
    _fake_bin(tmp_path, "gcloud", '[[ "$*" == *eps=10_seed=0* ]] && exit 7; exit 0')
    log.unlink()
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and len(log.read_text().splitlines()) == 6
    assert "1 of 6 points failed: eps=10_seed=0" in done.stderr, done.stderr
    assert _dry_main(monkeypatch, args[:4] + [f"--out={out_dir}"]) == 2  # No --tpu-name/--zone.
    assert tpu.remote_command(["a"], "~/my repo") == "cd ~/'my repo' && DPJAX_DISTRIBUTED=1 a"
    # Another ROOT with the same --out (e.g. the same basename) does not overwrite it.
    assert _dry_main(monkeypatch, [args[0], "--root=/mnt/other/fm", *args[2:]]) == 2
    assert json.loads((out_dir / "sweep.json").read_text())["root"] == "/mnt/shared/fm"
    outside = tmp_path / "exp.py"  # Not in the repository: the workers cannot run it.
    outside.write_text("from experiments.dpdm_fmnist import get_config, sweep\n")
    assert _dry_main(monkeypatch, [str(outside), *args[1:]]) == 2


def test_local_dry_run_assigns_gpus_and_queues(tmp_path, capsys, monkeypatch):
    args = ["experiments/toy_fake.py", "--root", str(tmp_path), "--dry-run", "--gpus=0,1,2,3",
            "--gpus-per-point=2"]  # fmt: skip
    assert _dry_main(monkeypatch, args) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "dpjax.main" in x]
    assert len(lines) == 6
    assert "[0,1]: CUDA_VISIBLE_DEVICES=0,1 " in lines[0]
    assert "[2,3]: CUDA_VISIBLE_DEVICES=2,3 " in lines[1]
    assert all("[queued]" in x for x in lines[2:])
    assert all(x.endswith("--config.train.num_devices=0") for x in lines)
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # No workdir was made.
    assert local.make_slots([], 1, 2) == [None, None]
    assert local.detect_gpus("auto", {"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    mig = ("GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-a)\n"
           "  MIG 3g.40gb     Device  0: (UUID: MIG-a0)\n"
           "  MIG 3g.40gb     Device  1: (UUID: MIG-a1)\n"
           "GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-b)\n")
    assert local.gpu_ids(mig) == ["0", "1"]  # Not line numbers ('0', '3').
    with pytest.raises(local.SlotError):
        local.make_slots(["0"], 2, 1)


def test_a_root_keeps_its_experiment(tmp_path, capsys, monkeypatch):
    """A second sweep of another experiment (or another base argument) into one ROOT is
    refused before anything runs: its points' workdirs hold runs of other configs. The
    same sweep again (another spelling of the file, another --set) is a resume."""
    root = str(tmp_path / "runs")
    args = ["--root", root, "--dry-run", "--gpus=none"]
    assert _dry_main(monkeypatch, ["experiments/toy_fake.py:smoke", *args]) == 0
    same = os.path.join(ROOT, "experiments", "..", "experiments", "toy_fake.py:smoke")
    assert _dry_main(monkeypatch, [same, *args, "--set", "train.log_every=5"]) == 0
    capsys.readouterr()
    assert _dry_main(monkeypatch, ["experiments/toy_fake.py", *args]) == 2
    assert "toy_fake.py:smoke, not experiments/toy_fake.py: its points'" in capsys.readouterr().err
    manifest = tmp_path / "runs" / "sweep.json"  # Still the first sweep's.
    assert json.loads(manifest.read_text())["experiment_key"].endswith("/toy_fake.py:smoke")
    old = json.loads(manifest.read_text())
    del old["experiment_key"]  # A manifest from before the key: its experiment counts.
    manifest.write_text(json.dumps(old))
    assert _dry_main(monkeypatch, ["experiments/toy_fake.py", *args]) == 2
    capsys.readouterr()
    manifest.write_text("{")  # Corrupt: one readable line, not a traceback.
    assert _dry_main(monkeypatch, ["experiments/toy_fake.py:smoke", *args]) == 2
    assert "sweep.json is unreadable" in capsys.readouterr().err
    # With --out elsewhere, ROOT still keeps (and is checked against) its own manifest.
    other = str(tmp_path / "other_root")
    out = ["--root", other, "--dry-run", "--gpus=none", "--out", str(tmp_path / "o1")]
    assert _dry_main(monkeypatch, ["experiments/toy_fake.py:smoke", *out]) == 0
    assert os.path.isfile(os.path.join(other, "sweep.json"))
    out[-1] = str(tmp_path / "o2")
    assert _dry_main(monkeypatch, ["experiments/toy_fake.py", *out]) == 2
    assert f"ROOT {other} holds the sweep of" in capsys.readouterr().err
    # '~' in --root is this user's home, not a folder named '~'.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = ["--root", "~/sw", "--dry-run", "--gpus=none"]
    assert _dry_main(monkeypatch, ["experiments/toy_fake.py:smoke", *home]) == 0
    assert os.path.isfile(tmp_path / "home" / "sw" / "sweep.json")


def test_run_local_queue_never_shares_a_gpu(tmp_path):
    code = (
        "import os, sys, time; t = time.time(); time.sleep(0.3);"
        "open(sys.argv[1], 'w').write(f\"{os.environ.get('CUDA_VISIBLE_DEVICES')} {t} "
        '{time.time()}")'
    )
    jobs = [
        local.Job(
            f"p{i}",
            [sys.executable, "-c", code, str(tmp_path / f"p{i}.txt")],
            str(tmp_path / f"p{i}"),
        )  # fmt: skip
        for i in range(5)
    ]
    results = local.run_local(jobs, ["0", "1"], echo=lambda *_: None, poll_seconds=0.02)
    assert results == {f"p{i}": 0 for i in range(5)}
    spans = {}
    for i in range(5):
        gpu, start, end = (tmp_path / f"p{i}.txt").read_text().split()
        spans.setdefault(gpu, []).append((float(start), float(end)))
        assert (tmp_path / f"p{i}" / "launch.log").exists()
    assert set(spans) == {"0", "1"}
    for s in spans.values():
        s.sort()
        assert all(a[1] <= b[0] for a, b in zip(s, s[1:])), "two points shared a GPU"


def test_a_cpu_slot_sees_no_gpu_even_when_the_parent_does(tmp_path):
    code = ("import os, sys; open(sys.argv[1], 'w').write("
            "repr((os.environ['CUDA_VISIBLE_DEVICES'], os.environ['JAX_PLATFORMS'])))")
    job = local.Job("p", [sys.executable, "-c", code, str(tmp_path / "env.txt")],
                    str(tmp_path / "p"))
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
           "CUDA_VISIBLE_DEVICES": "0,1"}
    assert local.run_local([job], [None], env=env, echo=lambda *_: None) == {"p": 0}
    assert (tmp_path / "env.txt").read_text() == repr(("", "cpu"))


def test_local_sweep_runs_two_smoke_points(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "launch.sweep", "experiments/toy_fake.py:smoke",
           f"--root={tmp_path}", "--limit=2", "--parallel=2", "--gpus=none"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2/2 points succeeded" in out.stdout
    for name in ("sigma=0.5_learning_rate=0.0003", "sigma=0.5_learning_rate=0.001"):
        wd = tmp_path / name
        assert json.loads((wd / "dp_plan.json").read_text())["steps_done"] == 2
        assert (wd / "privacy_report.md").exists()
        cfg = json.loads((wd / "config.json").read_text())
        assert cfg["optim"]["learning_rate"] == float(name.split("=")[-1])
