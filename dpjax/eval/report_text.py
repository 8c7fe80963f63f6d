"""``eval_report.md``: the markdown rendering of ``report.evaluate_workdir``'s result.

Rendering only (it reads the result dict and computes nothing): the report opens with
why it must not be published, then states the model's guarantee, or why it has none,
before any number.
"""

from __future__ import annotations

from typing import Any

from dpjax.privacy.report import format_epsilon, private_line

# The first lines of eval_report.md: what the evaluation shows is not covered by DP.
EVAL_NOT_PUBLISHABLE = (
    "**Not differentially private: do not publish.** This report and `eval.json` are "
    "computed on the real data (FID against private-train statistics, distances to "
    "private training images), and the closest-pairs images SHOW private training "
    "images. Only `--mode=export` output is covered by the model's guarantee."
)


def _as_float(x: Any) -> Any:
    """``x`` as a float where it is a number or a number's string ('nan', 'inf')."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return x


def report_markdown(result: dict[str, Any]) -> str:
    """A short human-readable report of ``evaluate_workdir``'s result."""
    lines = [
        f"# Evaluation (step {result['step']}, {result['num_samples']} samples)",
        "",
        EVAL_NOT_PUBLISHABLE,
        "",
    ]
    privacy = result.get("privacy")
    if privacy:
        eps = privacy["epsilon"]
        # Rounded up as every report rounds an epsilon; a non-finite one is stored as the
        # string 'nan' or 'inf' (RDP under replace-one, a run without DP), shown as is.
        shown_eps = " / ".join(
            f"{'n/a' if eps.get(k) is None else format_epsilon(_as_float(eps[k]))} "
            f"({k.upper()})"
            for k in ("rdp", "pld")
        )
        accounted = (f"epsilon {shown_eps} at delta {privacy['delta']:g}, sigma "
                     f"{privacy['noise_multiplier']:.4g}, {privacy['steps_done']} steps")
        status = private_line(privacy) if "private" in privacy else "yes"
        if status == "yes":
            lines += [f"The model's guarantee (not this report's): {accounted}.", ""]
        else:  # An epsilon is then no guarantee: the status says why, first.
            lines += [f"Private: {status}.", "",
                      f"The model has no guarantee; the accountant gives {accounted} for "
                      "its noise, sampling and steps.", ""]
    lines += [f"- skipped: {s}" for s in result.get("skipped", [])]
    if result.get("skipped"):
        lines.append("")
    real = result.get("real_images", {})
    if "fid" in result:
        lines += ["| FID vs | real images | value |", "|---|---|---|"]
        lines += [f"| {k} | {real.get(k, '?')} | {v:.2f} |" for k, v in result["fid"].items()]
        lines.append("")
    # An eval.json from before the data section had the limit among the splits.
    limit = result.get("data", {}).get("limit") or real.get("data.limit")
    if limit:
        lines += [f"The real splits are limited to their first {limit} images "
                  "(the run's data.limit): FID and test accuracy are not comparable with "
                  "numbers on the full splits.", ""]
    if "downstream" in result:
        lines += [
            "| classifier | test accuracy | selected epoch (synthetic val) |",
            "|---|---|---|",
        ]
        for k, v in result["downstream"].items():
            lines.append(f"| {k} | {100 * v['test_accuracy']:.1f}% | {v['selected_epoch']} |")
        lines.append("")
    if "bits_per_dim" in result:
        b = result["bits_per_dim"]
        line = f"- bits per dimension, real test split: {b['test']:.4f}"
        if "stderr" in b:
            line += f" +- {b['stderr']:.4f} (standard error over {b['images']} images)"
        if "ess_mean" in b:
            line += (f"; log p(x) by importance sampling, {b['importance_samples']} samples "
                     f"per image, mean effective sample size {b['ess_mean']:.1f}")  # fmt: skip
        lines.append(line)
        if "codelength_test" in b:
            lines.append(f"- training codelength (not a likelihood), bits per dimension: "
                         f"{b['codelength_test']:.4f}")  # fmt: skip
    if "memorization" in result:
        for space, summary in result["memorization"].items():
            shown = ", ".join(
                f"{k}={v:.6g}" for k, v in summary.items() if isinstance(v, (int, float))
            )
            lines.append(f"- memorization ({space}): {shown}")
        lines += ["", "![closest pairs](eval_closest_pixel.png)", ""]
    if "samples_grid" in result:
        lines.append(f"![samples]({result['samples_grid']})")
    return "\n".join(lines) + "\n"
