"""Time and memory of a PLD epsilon at small sigma: dp_accounting's fine grid against
dpjax's coarsened one (``accounting.pld_discretization``), with RDP's epsilon beside.

Each case runs in a fresh subprocess, so that its peak RSS is its own::

    PYTHONPATH=. .venv/bin/python benchmarks/cpu/pld_grid_cost.py \\
        --out=benchmarks/cpu_pld_grid_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

# (sigma, q, steps, grid): 'fine' is dp_accounting's 1e-4 at every sigma (dpjax before),
# 'dpjax' is pld_discretization's interval. The fine grid is not run below 0.06 (at
# sigma 0.034 it took 138 s, at 1e-4 it asked for 3.65 TiB: the extension review).
CASES = [
    (1.0, 0.07, 4400, "dpjax"),
    (0.1, 0.1, 10, "dpjax"),
    (0.06, 0.1, 10, "fine"),
    (0.06, 0.1, 10, "dpjax"),
    (0.034, 0.1, 10, "dpjax"),
    (0.01, 0.1, 10, "dpjax"),
    (0.01, 0.01, 1000, "dpjax"),
    (1e-3, 0.1, 10, "dpjax"),
]

_CHILD = """
import json, resource, sys, time
from dpjax.privacy import accounting as a
sigma, q, steps, grid = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
event = a.dpsgd_event(sigma, q, steps)
interval = a.PLD_INTERVAL if grid == "fine" else a.pld_discretization(event)
t = time.time()
acc = a.make_accountant("pld", pld_interval=interval)
acc.compose(event)
eps = acc.get_epsilon(1e-5)
seconds = time.time() - t
print(json.dumps({"sigma": sigma, "q": q, "steps": steps, "grid": grid, "interval": interval,
                  "pld_epsilon": eps, "rdp_epsilon": a.epsilon([event], 1e-5, "rdp"),
                  "seconds": round(seconds, 2),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for sigma, q, steps, grid in CASES:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(sigma), str(q), str(steps), grid],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(),
                   "delta": 1e-5, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
