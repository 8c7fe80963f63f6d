"""Summarizes a ``jax.profiler`` trace: where one step's time goes, kernel by kernel.

``jax.profiler.trace(log_dir)`` writes ``plugins/profile/<run>/<host>.trace.json.gz`` (the
Chrome trace format: complete events with a name and a duration in microseconds, grouped
by process: ``/host:CPU``, and on a GPU ``/device:GPU:0`` with one thread per stream).
A device lease is too short to open the trace in a viewer, so ``summarize`` reduces it to
what decides the DP step's speed: per process, the number of events (kernels, on a
device), their total and the events that take the most time, by name and by the HLO op
that XLA attaches to a device kernel (``args.hlo_op``, where present).

Usage::

    python benchmarks/trace_summary.py /tmp/trace_dir [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
from typing import Any


def latest_trace(log_dir: str) -> str:
    """The newest ``*.trace.json.gz`` under ``log_dir`` (what the last trace wrote).

    Raises:
      FileNotFoundError: no trace there.
    """
    found = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}")
    return max(found, key=os.path.getmtime)


def _top(totals: collections.Counter, counts: collections.Counter, top: int) -> list[list]:
    return [[name, round(us, 3), counts[name]] for name, us in totals.most_common(top)]


def summarize(trace_path: str, top: int = 25) -> dict[str, Any]:
    """Per process of the trace (a device's streams together): ``events``, ``total_us``
    (the sum of their durations: events on concurrent streams count each, and on the
    host nested events, such as a Python frame around the step's execution, count
    both), and ``top_by_name`` / ``top_by_hlo_op``: ``[name, total_us, count]`` of the
    ``top`` most expensive, most first."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {
        e["pid"]: e.get("args", {}).get("name", str(e["pid"]))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    by_name: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    name_counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    op_counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") != "X":
            continue
        process = names.get(e.get("pid"), str(e.get("pid")))
        dur = float(e.get("dur", 0.0))
        by_name[process][e.get("name", "?")] += dur
        name_counts[process][e.get("name", "?")] += 1
        op = e.get("args", {}).get("hlo_op")
        if op:
            by_op[process][op] += dur
            op_counts[process][op] += 1
    out = {}
    for process in sorted(by_name):
        out[process] = {
            "events": sum(name_counts[process].values()),
            "total_us": round(sum(by_name[process].values()), 3),
            "top_by_name": _top(by_name[process], name_counts[process], top),
            "top_by_hlo_op": _top(by_op[process], op_counts[process], top),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dir", help="the directory given to jax.profiler.trace")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(json.dumps(summarize(latest_trace(args.log_dir), args.top), indent=1))


if __name__ == "__main__":
    main()
