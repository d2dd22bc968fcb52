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
from deis_fast.cli.bench import digits_problem, evaluate, report
from deis_fast.zoo.digits import digits_kind, load_digits_data, load_digits_model
from deis_fast.tuning.plans import learn_plan, load_plan, save_plan
from deis_fast.sampler import Sampler


def held_out(sets, sample):
    """The quality benchmark's metric for ``sample(noise)``: per set the median per-sample relative error
    (``.errors[0]``), and their mean (``.mean(0)``)."""
    return evaluate("", "deis_fast", lambda z, _: sample(z), sets, [0])


def base_plan(sched, nfe: int, t_start: float):
    """What the fit starts from: tab3 + corrector on time_quadratic."""
    return build_plan(sched, "tab3", nfe, "time_quadratic", t_start=min(t_start, sched.t_max), corrector=True)


def mover(sched, t_skip: float):
    """Noise at t = t_max -> the plan's input at t_skip (the analytic Gaussian start below t_max)."""
    if t_skip >= sched.t_max:
        return lambda x: x
    start = GaussianStart.from_samples(load_digits_data())
    return lambda x: start(x, sched, sched.t_max, t_skip)


def check_plan(path: str) -> int:
    """A saved plan on noises that neither the fit nor the choice of its settings saw."""
    sched = digits_kind("digits").schedule()
    net = load_digits_model(dtype=torch.float64)
    plan = load_plan(path)
    move = mover(sched, plan.times[0])
    sets = []
    for seed in range(31, 39):
        z = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        sets.append((z, Sampler(net, sched, "rho_rk4", 200, "logsnr", check_finite=False)(z)))
    for name, p in (("learned", plan), ("tab3 + corrector", base_plan(sched, plan.nfe, plan.times[0]))):
        r = held_out(sets, lambda z: Sampler(net, sched, plan=p, check_finite=False)(move(z)))
        print(f"{name}: mean of the median errors {r.mean(0):.4g} (per seed {min(r.errors[0]):.4g} - "
              f"{max(r.errors[0]):.4g})")
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
    net = load_digits_model(dtype=torch.float64)   # autograd runs through it (prob.model wraps it in no_grad)
    z = torch.randn(args.calibration, 1, 8, 8, generator=torch.Generator().manual_seed(200), dtype=torch.float64)
    ref = Sampler(net, sched, "rho_rk4", 400, "logsnr", check_finite=False)(z)
    n_val = round(args.calibration / 4)   # learn_plan's default validation_fraction
    log(f"setup {time.time() - t_begin:.0f} s")

    rows = []
    for n in args.nfe:
        for t_skip in args.t_skip:
            move, plan = mover(sched, t_skip), base_plan(sched, n, t_skip)
            def solve(p, move=move):
                return lambda x: Sampler(prob.model, sched, plan=p, check_finite=False)(move(x))
            before = held_out(prob.sets, solve(plan)).mean(0)
            log(f"NFE {n}, t_skip {t_skip:g}: tab3 + corrector held-out {before:.4g}")
            lp = learn_plan(net, sched, plan, move(z), ref, iters=args.iters, batch=args.batch, lr=args.lr, log=log)
            after = held_out(prob.sets, solve(lp.plan)).mean(0)
            t = [op.model_t for op in lp.plan.evals]
            log(f"NFE {n}, t_skip {t_skip:g}: learned held-out {after:.4g} (validation {lp.validation_error:.4g} at "
                f"step {lp.iteration}, {lp.seconds:.0f} s); times {[round(v, 1) for v in t]}")
            rows.append((n, t_skip, before, after, t))
            if args.save_dir:
                save_plan(lp.plan, f"{args.save_dir}/digits_tab3c_nfe{n}_tskip{t_skip:g}.json")
    lines = ["| NFE | start | tab3 + corrector (time_quadratic) | learned coefficients + times | gain | "
             "learned Eval times |",
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
