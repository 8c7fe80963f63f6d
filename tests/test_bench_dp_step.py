"""The DP-step benchmark (benchmarks/dp_step.py) runs end to end on CPU with a tiny UNet.

It checks the benchmark itself: its correctness gate (the fast layerwise and the ghost
steps equal the vmap reference step), that every requested entry is timed without error
and recorded incrementally in the --out file, and its case parsing. Timings are not
asserted.
"""

import gzip
import json

import pytest

from tests import bench_scripts


def _load():
    return bench_scripts.load("benchmarks/dp_step.py", "bench_dp_step")


bench = _load()


def test_parse_cases():
    cases = bench.parse_cases("256x1, 32x32,4096x32,8x2/2", microbatch=64, microbatch_above=1024)
    assert [(c.batch, c.k, c.microbatch, c.logical) for c in cases] == [
        (256, 1, 256, False),
        (32, 32, 32, False),
        (4096, 32, 64, True),
        (8, 2, 2, True),
    ]
    assert cases[2].name == "4096x32/64"
    for bad in ("8x2/3", "8by2", "0x1"):
        with pytest.raises(ValueError, match="Bad case"):
            bench.parse_cases(bad, 64, 1024)


def entries_params(written):
    (params,) = {e["params"] for e in written["entries"]}
    return params


def test_tiny_benchmark_with_check(tmp_path):
    out = tmp_path / "dp_step.json"
    argv = [
        "--tiny",
        "--check",
        "--check-case=6x1/3",  # Two micro-batches and a padding row, as the default's.
        # One batch, plain, fast and ghost (the check runs the reference too). Micro-batch
        # loops compile slowly on CPU; the logical cases are covered by test_parse_cases.
        "--cases=4x1",
        "--variants=plain,fast,ghost",
        "--steps=1",
        "--warmup=1",
        f"--out={out}",
    ]
    result = bench.main(argv)
    with open(out) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(result))

    check = written["check"]
    assert check["passed"], check
    assert (check["case"], check["num_real"]) == ("6x1/3", 5)
    assert check["update_rel_err"] <= 1e-4 and check["params_ok"]
    assert check["ghost"]["passed"] and check["ghost"]["update_rel_err"] <= 1e-4

    meta = written["meta"]
    assert meta["jax"] and meta["devices"] and meta["tiny"] is True
    assert meta["params"] == check["params"] == entries_params(written)
    assert "--check" in meta["command"]

    entries = written["entries"]
    got = [(e["case"], e["variant"]) for e in entries]
    assert got == [("4x1", "plain"), ("4x1", "fast"), ("4x1", "ghost")]
    for e in entries:
        assert "error" not in e and "skipped" not in e, e
        assert e["params"] > 0 and e["finite"]
        assert e["step_ms"] > 0 and e["examples_per_s"] > 0 and e["compile_s"] > 0
        assert e["examples_per_s"] == pytest.approx(e["B"] / (e["step_ms"] / 1e3))
        assert "peak_bytes" in e and "memory_analysis" in e
    plain, fast, ghost = entries
    assert plain["ratio_to_plain"] == pytest.approx(1.0) and plain["clipping_impl"] is None
    assert fast["clipping_impl"] == "layerwise" and ghost["clipping_impl"] == "ghost"
    assert 0.0 < ghost["ghosted_fraction"] < 1.0 and "ghosted_fraction" not in fast
    assert fast["ratio_to_plain"] == pytest.approx(fast["step_ms"] / plain["step_ms"])
    for e in entries:
        assert (e["B"], e["K"], e["microbatch"]) == (4, 1, 4)


def test_time_budget_skips_and_records(tmp_path):
    out = tmp_path / "dp_step.json"
    result = bench.main(
        ["--tiny", "--cases=2x2", "--variants=plain", "--time-budget=1e-9", f"--out={out}"]
    )
    (entry,) = result["entries"]
    assert "skipped" in entry and "step_ms" not in entry
    with open(out) as f:
        assert json.load(f)["entries"][0]["skipped"] == entry["skipped"]


def test_flops_only_counts_every_variant_without_running(tmp_path):
    out = tmp_path / "dp_step.json"
    all_variants = "plain,fast,ghost,reference"
    result = bench.main(
        [
            "--tiny",
            "--flops-only",
            "--cases=4x2,20x2/2",
            f"--variants={all_variants}",
            f"--logical-variants={all_variants}",
            f"--out={out}",
        ]
    )
    entries = {(e["case"], e["variant"]): e for e in result["entries"]}
    assert len(entries) == 8
    for (case, variant), e in entries.items():
        assert "error" not in e, e
        assert "step_ms" not in e and "compile_s" not in e  # Traced, never run.
        flops = e["flops"]
        assert flops["matmul_flops"] > 0 and flops["other_flops"] > 0
        # The per-example paths do the plain step's arithmetic, not a second backward
        # pass (that would be about 4/3 of it): only the norms and the clipped sum's
        # reweighting are added. The ghost path's Gram norms may cost a little more.
        limit = 1.05 if variant == "ghost" else 1.01
        assert 1.0 <= e["matmul_flops_ratio_to_plain"] <= limit, (case, variant, flops)
        # Ten micro-batches of 2 at 20x2/2: five times the 4x2 arithmetic. Ten is past
        # what the CPU unrolls, so the DP step's micro-batch loop is a while loop whose
        # trip count the benchmark supplies (B / m); the plain step's is static.
        if case == "20x2/2":
            single = entries[("4x2", variant)]["flops"]["matmul_flops"]
            assert flops["matmul_flops"] == pytest.approx(5 * single, rel=1e-6)
            assert flops["unknown_trip_loops"] == (0 if variant == "plain" else 1)


def test_profile_traces_one_step_per_entry_and_summarizes_it(tmp_path):
    out, prof = tmp_path / "dp_step.json", tmp_path / "prof"
    result = bench.main(["--tiny", "--cases=2x2", "--variants=plain,fast", "--steps=1",
                         f"--profile={prof}", f"--out={out}"])  # fmt: skip
    for entry in result["entries"]:
        assert "error" not in entry, entry
        profile = entry["profile"]
        assert profile["dir"] == str(prof / f"2x2_{entry['variant']}")
        assert list((prof / f"2x2_{entry['variant']}").rglob("*.trace.json.gz"))
        host = profile["/host:CPU"]  # The CPU's trace: the step's ops run on the host.
        assert host["events"] > 0 and host["total_us"] > 0
        top = host["top_by_name"]
        assert top and all(len(row) == 3 and row[2] >= 1 for row in top)
        assert [row[1] for row in top] == sorted((row[1] for row in top), reverse=True)


def test_trace_summary_groups_device_kernels_by_name_and_hlo_op(tmp_path):
    summary = bench_scripts.load("benchmarks/trace_summary.py", "bench_trace_summary")
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        *[{"ph": "X", "pid": 1, "tid": 7, "name": "gemm_kernel", "dur": 10.0,
           "args": {"hlo_op": "dot.3"}} for _ in range(3)],
        {"ph": "X", "pid": 1, "tid": 8, "name": "loop_fusion", "dur": 5.0,
         "args": {"hlo_op": "fusion.1"}},
        {"ph": "X", "pid": 1, "tid": 8, "name": "gemm_kernel", "dur": 1.0,
         "args": {"hlo_op": "dot.9"}},
        {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "dur": 50.0},
        {"ph": "i", "pid": 1, "name": "marker"},  # Not a complete event: ignored.
    ]  # fmt: skip
    run = tmp_path / "plugins" / "profile" / "r1"
    run.mkdir(parents=True)
    with gzip.open(run / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = summary.summarize(summary.latest_trace(str(tmp_path)), top=2)
    gpu = got["/device:GPU:0"]
    assert gpu["events"] == 5 and gpu["total_us"] == 36.0
    assert gpu["top_by_name"] == [["gemm_kernel", 31.0, 4], ["loop_fusion", 5.0, 1]]
    assert gpu["top_by_hlo_op"] == [["dot.3", 30.0, 3], ["fusion.1", 5.0, 1]]
    assert got["/host:CPU"] == {"events": 1, "total_us": 50.0,
                                "top_by_name": [["PjitFunction(step)", 50.0, 1]],
                                "top_by_hlo_op": []}  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
        summary.latest_trace(str(tmp_path / "empty"))
