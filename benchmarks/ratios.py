"""Ratio tables from a pytest-benchmark JSON (``--benchmark-json`` / ``--benchmark-autosave``): per
group, each row's median and best time, and its ratio to the group's baseline (the row whose
``extra_info["role"]`` is "baseline": the diffusers peer, or the copy in the bandwidth group) in the
same run.

    python benchmarks/ratios.py run.json [--strip small.json] > tables.md
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["summarize", "markdown", "strip_rounds"]


def _row(b: dict[str, Any]) -> dict[str, Any]:
    info, st = b.get("extra_info", {}), b["stats"]
    row = {"label": info.get("label", b["name"]), "median_s": st["median"], "min_s": st["min"],
           "iqr_s": st["iqr"], "rounds": st["rounds"], "role": info.get("role")}
    for key in ("dispatched_ops_per_nfe", "cuda_kernels_per_nfe", "scheduler_share"):
        if info.get(key) is not None:
            row[key] = info[key]
    if info.get("bytes"):
        row["bytes"] = info["bytes"]
        row["gbps_median"] = info["bytes"] / st["median"] / 1e9
        row["gbps_best"] = info["bytes"] / st["min"] / 1e9
    return row


def summarize(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """group -> rows (in run order) with times in seconds and, where the group has them, the ratios
    ``speedup_vs_baseline`` (baseline median / row median), ``x_network`` (row median / network median) and,
    for rows that move other bytes than the baseline, ``bandwidth_vs_baseline`` (GB/s over the baseline's)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or "(no group)", []).append(_row(b))
    for rows in groups.values():
        refs = {r["role"]: r["median_s"] for r in rows if r["role"]}
        base = next((r for r in rows if r["role"] == "baseline"), None)
        for r in rows:
            if "baseline" in refs:
                r["speedup_vs_baseline"] = refs["baseline"] / r["median_s"]
            if base and "gbps_median" in r and "gbps_median" in base and r["bytes"] != base["bytes"]:
                r["bandwidth_vs_baseline"] = r["gbps_median"] / base["gbps_median"]
            if "network" in refs:
                r["x_network"] = r["median_s"] / refs["network"]
    return groups


def _time(s: float) -> str:
    return f"{s * 1e6:.3g} us" if s < 1e-3 else f"{s * 1e3:.3g} ms"


COLUMNS = [("median", lambda r: _time(r["median_s"])), ("best", lambda r: _time(r["min_s"])),
           ("IQR", lambda r: _time(r["iqr_s"])),
           ("vs baseline", lambda r: f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else ""),
           ("x network", lambda r: f"{r['x_network']:.2f}" if "x_network" in r else ""),
           ("ops/NFE", lambda r: f"{r['dispatched_ops_per_nfe']:.3g}" if "dispatched_ops_per_nfe" in r else ""),
           ("kernels/NFE", lambda r: f"{r['cuda_kernels_per_nfe']:.3g}" if "cuda_kernels_per_nfe" in r else ""),
           ("GB/s (median)", lambda r: f"{r['gbps_median']:.1f}" if "gbps_median" in r else ""),
           ("GB/s vs baseline", lambda r: f"{r['bandwidth_vs_baseline']:.2f}" if "bandwidth_vs_baseline" in r else ""),
           ("scheduler share", lambda r: f"{100 * r['scheduler_share']:.0f}%" if "scheduler_share" in r else "")]


def markdown(groups: dict[str, list[dict[str, Any]]]) -> str:
    """One markdown table per group; columns that are empty for the whole group are left out."""
    out = []
    for group, rows in groups.items():
        cols = [(name, f) for name, f in COLUMNS if any(f(r) for r in rows)]
        out += [f"**{group}**", "", "| | " + " | ".join(n for n, _ in cols) + " |",
                "|---|" + "---|" * len(cols)]
        out += ["| " + r["label"] + (" (baseline)" if r["role"] == "baseline" else "") + " | "
                + " | ".join(f(r) for _, f in cols) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def strip_rounds(data: dict[str, Any]) -> dict[str, Any]:
    """The run without ``stats["data"]`` (the time of every round)."""
    return {**data, "benchmarks": [{**b, "stats": {k: v for k, v in b["stats"].items() if k != "data"}}
                                   for b in data.get("benchmarks", [])]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a pytest-benchmark JSON file")
    ap.add_argument("--strip", metavar="OUT", help="also write the run without its per-round timings to OUT "
                                                   "(--benchmark-json keeps every round: megabytes)")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    if args.strip:
        with open(args.strip, "w") as f:
            json.dump(strip_rounds(data), f, indent=1)
    if not data.get("benchmarks"):
        print(f"{args.json}: no timed benchmarks (was it run with --benchmark-disable?)", file=sys.stderr)
        return 1
    print(markdown(summarize(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
