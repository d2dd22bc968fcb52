"""How far a *learned* plan gets on the digits U-Net (issue 15's NFE-to-1 % target): every Combine coefficient and
every Eval network time of tab3 + corrector (time_quadratic) fitted end to end through the network with
:func:`deis_fast.learn_plan` (S4S-style: Frankel et al. 2025, "S4S: Solving for a diffusion model solver"), from
the noise and from the analytic Gaussian start.

The fit uses its own calibration noises (seed 200, reference rho_rk4 @ 400 NFE; learn_plan holds the last quarter
out to pick the iterate); the table reports the held-out sets of benchmarks/quality.py (seeds 1-4, reference
rho_rk4 @ 800 NFE; mean over the sets of the median per-sample relative error), the same numbers as the RESULTS.md
digits table.

    python benchmarks/learned_solver.py --nfe 7 --out-md benchmarks/learned_solver.md --save-dir benchmarks/plans
"""
import argparse
import sys
import time

import torch

from deis_fast import GaussianStart, build_plan
from deis_fast.benchmarking import digits_problem, report
from deis_fast.digits import load_digits_data, load_digits_model
from deis_fast.learned import learn_plan, load_plan, save_plan
from deis_fast.sampler import Sampler
from deis_fast.testing import relative_errors


def held_out(sets, fn) -> float:
    """Mean over the sets of the median per-sample relative error (the quality benchmark's metric)."""
    with torch.no_grad():
        return sum(float(relative_errors(fn(z), ref).median()) for z, ref in sets) / len(sets)


def check_plan(path: str) -> int:
    """A saved plan on noises that neither the fit nor the choice of its settings saw."""
    prob_sched = digits_problem(seeds=0).schedule
    net = load_digits_model(dtype=torch.float64)
    plan = load_plan(path)
    t0 = plan.times[0]
    base = build_plan(prob_sched, "tab3", plan.nfe, "time_quadratic", t_start=t0, corrector=True)
    start = GaussianStart.from_samples(load_digits_data())
    errs = {"learned": [], "tab3 + corrector": []}
    for seed in range(31, 39):
        z = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ref = Sampler(net, prob_sched, "rho_rk4", 200, "logsnr", check_finite=False)(z)
        x = z if t0 >= prob_sched.t_max else start(z, prob_sched, prob_sched.t_max, t0)
        for name, p in (("learned", plan), ("tab3 + corrector", base)):
            errs[name].append(float(relative_errors(Sampler(net, prob_sched, plan=p, check_finite=False)(x), ref).median()))
    for name, e in errs.items():
        print(f"{name}: mean of the median errors {sum(e) / len(e):.4g} (per seed {min(e):.4g} - {max(e):.4g})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nfe", type=int, nargs="+", default=[7])
    ap.add_argument("--t-skip", type=float, nargs="+", default=[999.0, 800.0],
                    help="999: plain; below: the analytic Gaussian start (training-image statistics) to t_skip first")
    ap.add_argument("--calibration", type=int, default=768, help="fitting noises (a quarter is kept for validation)")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--save-dir", default=None, help="write each learned plan there as JSON (deis_fast.load_plan)")
    ap.add_argument("--check-plan", default=None, metavar="JSON",
                    help="only evaluate a saved plan (starting at its first time; Gaussian start below t = 999) on 8 "
                         "further noise seeds 31-38, 64 noises each, reference rho_rk4 @ 200 NFE, next to tab3 + "
                         "corrector")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.check_plan:
        return check_plan(args.check_plan)

    def log(s):
        print(s, flush=True)
    t_begin = time.time()
    prob = digits_problem()
    sched = prob.schedule
    net = load_digits_model(dtype=torch.float64).requires_grad_(False)   # differentiable (prob.model is no_grad)
    z = torch.randn(args.calibration, 1, 8, 8, generator=torch.Generator().manual_seed(200), dtype=torch.float64)
    ref = Sampler(net, sched, "rho_rk4", 400, "logsnr", check_finite=False)(z)
    n_val = round(args.calibration / 4)   # learn_plan's default validation_fraction
    start = GaussianStart.from_samples(load_digits_data())
    log(f"setup {time.time() - t_begin:.0f} s")

    rows = []
    for n in args.nfe:
        for t_skip in args.t_skip:
            def move(x, t_skip=t_skip):
                return x if t_skip >= sched.t_max else start(x, sched, sched.t_max, t_skip)
            plan = build_plan(sched, "tab3", n, "time_quadratic", t_start=min(t_skip, sched.t_max), corrector=True)
            before = held_out(prob.sets, lambda x: Sampler(prob.model, sched, plan=plan, check_finite=False)(move(x)))
            log(f"NFE {n}, t_skip {t_skip:g}: tab3 + corrector held-out {before:.4g}")
            lp = learn_plan(net, sched, plan, move(z), ref, iters=args.iters, batch=args.batch, lr=args.lr, log=log)
            after = held_out(prob.sets, lambda x: Sampler(prob.model, sched, plan=lp.plan, check_finite=False)(move(x)))
            t = [op.model_t for op in lp.plan.evals]
            log(f"NFE {n}, t_skip {t_skip:g}: learned held-out {after:.4g} (validation {lp.validation_error:.4g} at "
                f"step {lp.iteration}, {lp.seconds:.0f} s); times {[round(v, 1) for v in t]}")
            rows.append((n, t_skip, before, after, t))
            if args.save_dir:
                save_plan(lp.plan, f"{args.save_dir}/digits_tab3c_nfe{n}_tskip{t_skip:g}.json")
    lines = ["| NFE | start | tab3 + corrector (time_quadratic) | learned coefficients + times | gain | learned Eval times |",
             "|---|---|---|---|---|---|"]
    for n, t_skip, before, after, t in rows:
        where = "noise (t = 999)" if t_skip >= sched.t_max else f"Gaussian start to t = {t_skip:g}"
        lines.append(f"| {n} | {where} | {before:.4g} | {after:.4g} | {before / after:.2f}x | "
                     f"{', '.join(f'{float(v):.0f}' for v in t)} |")
    lines.append(f"\n{args.calibration} calibration noises ({n_val} for validation), {args.iters} Adam steps of "
                 f"{args.batch}, lr {args.lr}; {time.time() - t_begin:.0f} s in all.")
    return report(lines, args.out_md)


if __name__ == "__main__":
    sys.exit(main())
