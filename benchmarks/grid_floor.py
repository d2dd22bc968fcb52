"""Is optimize_grid's result the best grid there is? A global check on the mixture (issue 7).

For each method at one NFE: a Sobol scan of the optimizer's free parameters (softmax logits of the
lambda increments, in [-4, 4]) followed by Nelder-Mead from the best scan points, against
`optimize_grid` on the same 32 calibration noises; both scored on the 4 x 100 held-out noises of
the quality benchmark, next to the method's best fixed grid. If the global search cannot beat the
local optimizer, the gain over the fixed grids is what grid choice can give that method at that NFE.
Last column: on the optimize_grid grid, the error of the state before the last step (against the exact
ODE state there) next to the final error, on the first held-out seed - large gains come with error
that the last step cancels.

    python benchmarks/grid_floor.py [--methods tab1 tab3 rhoab3] [--nfe 5] [--scan 1024] [--polish 6]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.stats import qmc

from deis_fast.cli.bench import mixture_problem
from deis_fast.tuning.grids import grid_from_theta, grid_intervals, optimize_grid
from deis_fast.core.grids import make_grid
from deis_fast.sampler import Sampler, build_plan
from deis_fast.testing import reference_solution, relative_errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["tab1", "tab2", "tab3", "rhoab3", "ipndm4", "logrho3"])
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--scan", type=int, default=1024, help="Sobol points (a power of 2)")
    ap.add_argument("--polish", type=int, default=6, help="Nelder-Mead runs from the best scan points")
    args = ap.parse_args()
    torch.set_num_threads(1)
    prob = mixture_problem()
    mix = prob.mixture
    model, sched = prob.model, prob.schedule
    cal, cref = prob.calibration
    t0, t1 = float(sched.t_max), float(sched.t_min)

    def run(method: str, times, noise: torch.Tensor) -> torch.Tensor:
        return Sampler(model, sched, plan=build_plan(sched, method, None, list(times)), check_finite=False)(noise)

    def cal_error(method: str, theta: np.ndarray) -> float:   # optimize_grid's objective: geometric mean
        try:
            x = run(method, grid_from_theta(sched, t0, t1, theta), cal)
        except ValueError:
            return math.inf
        e = float(relative_errors(x, cref).clamp_min(1e-12).log().mean().exp())
        return e if math.isfinite(e) else math.inf

    def held_out(method: str, times) -> float:
        return float(np.mean([float(relative_errors(run(method, times, z), r).median()) for z, r in prob.sets]))

    print(f"mixture, NFE {args.nfe}; held-out: median relative error, mean over {len(prob.sets)} seeds")
    print(f"{'method':8s} {'best fixed':>24s} {'optimize_grid':>14s} {'global search':>14s} {'gain':>6s} "
          f"{'global gain':>11s}  scan+polish s  before last step -> final")
    for m in args.methods:
        fixed = {g: held_out(m, make_grid(sched, g, grid_intervals(m, args.nfe))) for g in ("logsnr", "time_quadratic", "karras")}
        fg = min(fixed, key=fixed.get)
        og = optimize_grid(model, sched, m, args.nfe, cal, reference=cref, time_budget=None)
        e_opt = held_out(m, og.times)
        ts = time.time()
        dim = grid_intervals(m, args.nfe) - 1
        pts = qmc.Sobol(dim, seed=0).random(args.scan) * 8 - 4
        vals = np.array([cal_error(m, p) for p in pts])
        best_x, best_f = None, math.inf
        for i in np.argsort(vals)[:args.polish]:
            r = minimize(lambda th: cal_error(m, th), pts[i], method="Nelder-Mead",
                         options={"maxfev": 100 * dim, "xatol": 1e-3, "fatol": 1e-8, "adaptive": True})
            if r.fun < best_f:
                best_x, best_f = r.x, float(r.fun)
        e_glob = held_out(m, grid_from_theta(sched, t0, t1, best_x))
        z, _ = prob.sets[0]
        t_last = og.times[-2]
        before = run(m, og.times[:-1], z)
        e_before = float(relative_errors(before, reference_solution(mix, sched, z, t0, t_last)).median())
        e_final = float(relative_errors(run(m, og.times, z), prob.sets[0][1]).median())
        print(f"{m:8s} {fixed[fg]:7.4g} ({fg:>14s}) {e_opt:14.4g} {e_glob:14.4g} {fixed[fg] / e_opt:5.2f}x "
              f"{fixed[fg] / e_glob:10.2f}x  {time.time() - ts:6.0f}         {e_before:.3g} -> {e_final:.3g}",
              flush=True)


if __name__ == "__main__":
    main()
