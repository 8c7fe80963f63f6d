"""Runs sweep points as local processes: one per GPU (or GPU group), the rest queued.

Guarantees of ``run_local``: points start in order; a point runs with
CUDA_VISIBLE_DEVICES set to its slot's GPUs (set to '' on a CPU slot, with
JAX_PLATFORMS=cpu unless the caller set it, so that a CPU point never lands on a GPU);
no two running points share a slot; each point's output goes to
``<workdir>/launch.log``; every exit code is returned.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class SlotError(ValueError):
    """The GPUs cannot be split into the requested slots."""


def detect_gpus(spec: str, env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids for ``--gpus``: 'none', a list '0,1', or 'auto' (CUDA_VISIBLE_DEVICES if set,
    else the GPUs ``nvidia-smi -L`` lists, else none)."""
    env = os.environ if env is None else env
    if spec == "none":
        return []
    if spec != "auto":
        return [g.strip() for g in spec.split(",") if g.strip()]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return gpu_ids(out.stdout)


def gpu_ids(listing: str) -> list[str]:
    """The GPU indices of ``nvidia-smi -L`` output: each 'GPU N: ...' line's N. MIG
    devices are listed under their GPU ('  MIG 3g.40gb Device 0: ...'), so counting
    lines would number them as GPUs."""
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", listing, re.MULTILINE)]


def make_slots(gpus: Sequence[str], per_point: int, parallel: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES value of each concurrent slot; None (CPU) slots without GPUs."""
    if not gpus:
        return [None] * max(1, parallel)
    if per_point < 1 or per_point > len(gpus):
        raise SlotError(f"--gpus-per-point={per_point} with {len(gpus)} GPUs {list(gpus)}.")
    return [
        ",".join(gpus[i : i + per_point]) for i in range(0, len(gpus) - per_point + 1, per_point)
    ]


@dataclasses.dataclass(frozen=True)
class Job:
    """A point ready to run."""

    name: str
    cmd: list[str]
    workdir: str


def run_local(
    jobs: Sequence[Job],
    slots: Sequence[str | None],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] = print,
    poll_seconds: float = 0.2,
) -> dict[str, int]:
    """Runs ``jobs`` in order, one process per free slot, the rest queued.

    A slot is a CUDA_VISIBLE_DEVICES value (None: CPU, no GPU visible). Each
    job's output goes to ``<workdir>/launch.log``. Returns the exit code of every job.
    Guarantee: no two running jobs share a slot; on KeyboardInterrupt the running jobs
    are terminated (they resume from their workdirs when the sweep is run again).
    """
    base_env = dict(os.environ if env is None else env)
    pending = list(jobs)
    free = list(range(len(slots)))
    running: dict[int, tuple[Job, subprocess.Popen, Any]] = {}
    results: dict[str, int] = {}
    try:
        while pending or running:
            while pending and free:
                slot, job = free.pop(0), pending.pop(0)
                child_env = dict(base_env)
                if slots[slot] is None:
                    # Removing the variable would show every GPU (--gpus=none on a GPU
                    # machine, or CUDA_VISIBLE_DEVICES=-1): all points on GPU 0.
                    child_env["CUDA_VISIBLE_DEVICES"] = ""
                    child_env.setdefault("JAX_PLATFORMS", "cpu")
                else:
                    child_env["CUDA_VISIBLE_DEVICES"] = slots[slot]
                os.makedirs(job.workdir, exist_ok=True)
                log = open(os.path.join(job.workdir, "launch.log"), "a")  # noqa: SIM115
                proc = subprocess.Popen(
                    job.cmd, cwd=cwd, env=child_env, stdout=log, stderr=subprocess.STDOUT
                )
                running[slot] = (job, proc, log)
                where = "CPU" if slots[slot] is None else f"CUDA_VISIBLE_DEVICES={slots[slot]}"
                echo(f"[sweep] start {job.name} ({where}); log: {job.workdir}/launch.log")
            time.sleep(poll_seconds)
            for slot, (job, proc, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                results[job.name] = rc
                del running[slot]
                free.append(slot)
                echo(f"[sweep] {'done' if rc == 0 else f'FAILED (exit {rc})'} {job.name}")
    except KeyboardInterrupt:
        for _job, proc, log in running.values():
            proc.terminate()
            proc.wait()
            log.close()
        raise
    return results
