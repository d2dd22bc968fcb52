"""Issue 15: UniPC, the UniC-style corrector on the DEIS family, tabulated grids and the SDE multistep
solvers, next to the current best fixed-grid methods, on the public mixture and the digits U-Net (float64).

    python benchmarks/unipc_corrector.py --out-md benchmarks/unipc_corrector.md

ODE methods: median per-sample relative error to the reference endpoint (mixture: exact ODE; digits:
rho_rk4 @ 800 NFE), mean over 4 held-out noise seeds, as in benchmarks/quality.py. SDE methods do not
converge to the ODE endpoint sample by sample, so they get a distribution metric on the mixture instead:
||mean - data mean|| + ||cov - data cov||_F over 20000 samples in 2-d.
"""
import argparse
import sys
import time

import torch

import deis_fast
from deis_fast.cli.bench import (report, Result, deis_runner, digits_problem, evaluate, markdown_table, mixture_problem,
                                    nfe_to_reach)
from deis_fast.tuning.grids import optimize_grid
from deis_fast.testing import GaussianMixture

BASELINES = [("tab2", "time_quadratic"), ("tab3", "time_quadratic"), ("logrho3", "logsnr"),
             ("dpmpp_2m", "time_quadratic"), ("dpmpp3", "logsnr"), ("ipndm4", "time_quadratic")]
UNIPC = [(f"unipc{k}", g, v) for k in (1, 2, 3) for v in ("bh2", "bh1") for g in ("logsnr", "time_quadratic")]
CORRECTED = BASELINES
GRIDS = [(m, g) for m in ("tab3", "unipc2") for g in ("ays", "kl_optimal", "linear_quadratic")]
OPTIMIZED = [("tab2", {"corrector": True}), ("tab3", {"corrector": True}), ("ipndm4", {"corrector": True}),
             ("tab2", {})]


def optimized_results(prob, nfes, budget):
    """Grids optimized (on the calibration seed) for the method with its options, evaluated held-out."""
    cal_noise, cal_ref = prob.calibration
    out = []
    for m, kw in OPTIMIZED:
        res = Result(f"{m}{' + corrector' if kw else ''} / optimized", "deis_fast")
        for n in nfes:
            og = optimize_grid(prob.model, prob.schedule, m, n, cal_noise, reference=cal_ref, time_budget=budget,
                               plan_options=kw)
            r = evaluate(res.label, "deis_fast", deis_runner(prob.model, prob.schedule, m, og, **kw), prob.sets, [n])
            res.errors.update(r.errors)
        out.append(res)
        print(f"{res.label}: " + " ".join(f"{res.mean(n):.4g}" for n in nfes), flush=True)
    return out


def configs():
    out = [(f"{m} / {g}", m, g, {}) for m, g in BASELINES]
    out += [("pfdiff / time_quadratic", "pfdiff", "time_quadratic", {})]
    out += [(f"{m} {v} / {g}", m, g, {"variant": v}) for m, g, v in UNIPC]
    out += [(f"{m} + corrector / {g}", m, g, {"corrector": True}) for m, g in CORRECTED]
    out += [(f"{m} / {g}", m, g, {}) for m, g in GRIDS]
    return out


def sde_table(nfes, n=20000):
    mix = GaussianMixture.random(4, 2, 0.3, seed=11)
    sched = deis_fast.VPSchedule.discrete("linear")
    mu = mix.means.mean(0)
    cov = torch.eye(2, dtype=torch.float64) * 0.3 ** 2 + torch.cov(mix.means.T, correction=0)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = ["| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for label, m, kw in [("ddim_eta (eta=1)", "ddim_eta", {}), ("dpmpp_2m_sde midpoint", "dpmpp_2m_sde", {}),
                         ("dpmpp_2m_sde heun", "dpmpp_2m_sde", {"variant": "heun"}),
                         ("dpmpp_3m_sde", "dpmpp_3m_sde", {}), ("dpmpp_2m (ODE)", "dpmpp_2m", {}),
                         ("unipc3 (ODE)", "unipc3", {})]:
        cells = []
        for k in nfes:
            x = deis_fast.sample(mix.model(sched), noise, schedule=sched, method=m, nfe=k,
                                 generator=torch.Generator().manual_seed(k), **kw)
            err = (x.mean(0) - mu).norm() + (torch.cov(x.T, correction=0) - cov).norm()
            cells.append(f"{float(err):.3g}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    data = mix.sample_data(n, torch.Generator().manual_seed(1))
    floor = (data.mean(0) - mu).norm() + (torch.cov(data.T, correction=0) - cov).norm()
    rows.append(f"| {n} exact data samples (Monte-Carlo floor) | " + " | ".join(f"{float(floor):.3g}" for _ in nfes) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mixture", "digits"], choices=["mixture", "digits"])
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 7, 8, 10])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--opt-nfe", type=int, nargs="*", default=[5, 6, 7],
                    help="digits: NFE at which the OPTIMIZED configurations get an optimized grid")
    ap.add_argument("--opt-budget", type=float, default=60.0)
    ap.add_argument("--out-md", default="unipc_corrector.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    text = []
    for name in args.models:
        prob = mixture_problem(args.seeds) if name == "mixture" else digits_problem(args.seeds)
        results: list[Result] = []
        for label, m, g, kw in configs():
            results.append(evaluate(f"{label}", "deis_fast", deis_runner(prob.model, prob.schedule, m, g, **kw),
                                    prob.sets, args.nfe))
            print(f"[{name}] {label}: " + " ".join(f"{results[-1].mean(n):.4g}" for n in args.nfe), flush=True)
        if name == "digits" and args.opt_nfe:
            results += optimized_results(prob, args.opt_nfe, args.opt_budget)
        best = {n: min((r for r in results if n in r.errors), key=lambda r: r.mean(n)) for n in args.nfe}
        reach = min(((nfe_to_reach(r) or 10 ** 9), r.label) for r in results)
        text += [f"### {prob.name}", "", markdown_table(results, args.nfe, with_std=True), "",
                 "Best per NFE: " + "; ".join(f"NFE {n}: {best[n].mean(n):.3g} ({best[n].label})" for n in args.nfe)
                 + f". Fewest NFE to 1%: {reach[0] if reach[0] < 10 ** 9 else 'not reached'} ({reach[1]}).", ""]
    text += ["### SDE solvers: distribution error on a 2-d mixture (20000 samples)", "", sde_table([10, 20, 50, 100]), ""]
    text.append(f"(total wall time {time.time() - t0:.0f} s)")
    return report(text, args.out_md)


if __name__ == "__main__":
    sys.exit(main())
