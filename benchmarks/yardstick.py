"""Public yardstick (DESIGN §7): 8-component mixture in 64-d (std 0.3, mixture seed 1234), discrete
linear betas, t 999 -> 0, 400 noises from seed 0; median per-sample relative error to the exact ODE
endpoint. deis_fast methods x grids against diffusers' schedulers (default spacing and Karras sigmas).

    python benchmarks/yardstick.py [--nfe 5 6 8 10 15 20] [--out benchmarks/yardstick.md]
    python benchmarks/yardstick.py --nfe 4 5 6 8 10 --methods ddim tab3 logrho3 --grids time_quadratic logsnr \
        --no-diffusers --extra ddim:time_quadratic:1,1 ddim:time_quadratic:2,1 ...   # PFDiff table
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from deis_fast import benchmarking as B
from deis_fast.testing import yardstick_problem

METHODS = ["ddim", "tab1", "tab2", "tab3", "rhoab3", "logrho3", "dpmpp2", "dpmpp3", "ipndm4", "ipndm_v"]
GRIDS = ["time_quadratic", "logsnr", "karras", "time_uniform"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10, 15, 20])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--grids", nargs="*", default=GRIDS)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="extra deis_fast rows as method:grid[:k,h for pfdiff]")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    mix, sched, noise, ref = yardstick_problem(args.samples)
    model = mix.model(sched)
    problems = [(noise, ref)]
    results = []
    for m in args.methods:
        for g in args.grids:
            results.append(B.evaluate(f"deis_fast {m} / {g}", "deis_fast", B.deis_runner(model, sched, m, g),
                                      problems, args.nfe))
    for spec in args.extra:
        m, g, *pf = spec.split(":")
        kw = {"pfdiff": tuple(int(v) for v in pf[0].split(","))} if pf else {}
        if len(pf) > 1 and pf[1] == "exp":
            kw["pfdiff_experimental"] = True
        label = f"deis_fast {m} / {g}" + (f" / PFDiff{kw['pfdiff']}" if pf else "") + (" exp." if len(pf) > 1 else "")
        results.append(B.evaluate(label, "deis_fast",
                                  B.deis_runner(model, sched, m, g, **kw), problems, args.nfe))
    for name in ([] if args.no_diffusers else B.DIFFUSERS_SCHEDULERS):
        for karras in (False, True):
            r = B.evaluate(f"diffusers {name}" + (" karras" if karras else ""), "diffusers",
                           lambda nz, n, name=name, karras=karras: B.run_diffusers(name, karras, model, nz, n),
                           problems, args.nfe)
            if r.errors:
                results.append(r)
    lines = ["Median per-sample relative error to the exact ODE endpoint (lower is better).", "",
             B.markdown_table(results, args.nfe), "", "Best of each family:", "",
             "| NFE | best deis_fast | best diffusers | ratio |", "|---|---|---|---|"]
    bd, bf = B.best_per_nfe(results, "deis_fast", args.nfe), B.best_per_nfe(results, "diffusers", args.nfe)
    for n in args.nfe:
        if n in bd and n in bf:
            lines.append(f"| {n} | {bd[n][0]} {bd[n][1]:.3g} | {bf[n][0]} {bf[n][1]:.3g} | {bf[n][1] / bd[n][1]:.1f}x |")
    lines.append("")
    lines.append(f"(wall time {time.time() - t0:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
