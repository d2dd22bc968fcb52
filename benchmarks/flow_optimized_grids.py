"""optimize_grid on the flow yardstick at NFE 5: calibration on 32 separate noises (seed 100), evaluated held out
against the method's default fixed grid. ``--models mixture`` (default): the public mixture, the yardstick's 400
noises, exact endpoint. ``--models digits``: the embedded flow digits U-Net in float64 (4 x 32 noises, seeds 1-4,
reference rho_rk4 @ 800 NFE from t = 1; calibration: seed 100).

    python benchmarks/flow_optimized_grids.py [--models mixture digits]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flow_yardstick as fy  # noqa: E402

import deis_fast  # noqa: E402
from deis_fast.cli.bench import digits_problem  # noqa: E402
from deis_fast.core.schedules import FlowSchedule  # noqa: E402
from deis_fast.testing import GaussianMixture, reference_solution, relative_errors  # noqa: E402

CASES = {"mixture": [("ddim", {"pfdiff": (1, 1)}), ("rhoab3", {}), ("tab2", {}), ("ipndm4", {}), ("dpmpp3", {})],
         "digits": [("ddim", {"pfdiff": (1, 1)}), ("tab2", {}), ("ipndm4", {})]}


def problem(name):
    """(velocity model, held-out [(noise, reference)], (calibration noise, calibration reference))."""
    if name == "digits":
        prob = digits_problem(kind="flow")
        return prob.model, prob.sets, prob.calibration
    _, model, problems = fy.mixture_problem()
    mix = GaussianMixture.random(8, 64, 0.3, 1234)
    cal = torch.randn(32, 64, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    return model, problems, (cal, reference_solution(mix, FlowSchedule(), cal, 1.0, 0.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixture"], choices=tuple(CASES))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.models:
        model, problems, (cal, cref) = problem(name)
        for shift in (1.0, 3.0):
            sched = FlowSchedule(shift=shift)
            for m, kw in CASES[name]:
                t0 = time.time()
                g = deis_fast.optimize_grid(model, sched, m, 5, cal, reference=cref, prediction="flow",
                                            time_budget=60, **kw)

                def held(grid, g=g):
                    errs = []
                    for z, ref in problems:
                        x = deis_fast.sample(model, z, schedule=sched, method=g.method, nfe=5, grid=grid,
                                             prediction="flow", pfdiff=g.pfdiff)
                        errs.append(float(relative_errors(x, ref).median()))
                    return sum(errs) / len(errs)
                fixed, opt = held(None), held(g)
                print(f"{name} shift {shift:g} {m}{kw.get('pfdiff', '')}: fixed default grid {fixed:.4g}, optimized "
                      f"{opt:.4g} (start {g.start_grid}, cal {g.start_error:.3g}->{g.calibration_error:.3g}, "
                      f"val {g.start_validation_error:.3g}->{g.validation_error:.3g}, {time.time() - t0:.0f}s)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
