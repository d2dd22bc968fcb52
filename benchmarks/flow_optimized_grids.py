"""optimize_grid on the flow yardstick at NFE 5: calibration on 32 separate noises (seed 100), evaluated on the
yardstick's 400 noises (4 x 100, median per chunk, mean over chunks) against the method's default fixed grid.

    python benchmarks/flow_optimized_grids.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flow_yardstick as fy  # noqa: E402

import deis_fast  # noqa: E402
from deis_fast.schedules import FlowSchedule  # noqa: E402
from deis_fast.testing import GaussianMixture, reference_solution, relative_errors  # noqa: E402
torch.set_num_threads(1)
_, model, problems = fy.mixture_problem()
mix = GaussianMixture.random(8, 64, 0.3, 1234)
cal = torch.randn(32, 64, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
cref = reference_solution(mix, FlowSchedule(), cal, 1.0, 0.0)
cases = [("ddim", {"pfdiff": (1, 1)}), ("rhoab3", {}), ("tab2", {}), ("ipndm4", {}), ("dpmpp3", {})]
for shift in (1.0, 3.0):
    sched = FlowSchedule(shift=shift)
    for m, kw in cases:
        t0 = time.time()
        g = deis_fast.optimize_grid(model, sched, m, 5, cal, reference=cref, prediction="flow", time_budget=60,
                                    **kw)
        def held(grid, g=g):
            errs = []
            for z, ref in problems:
                x = deis_fast.sample(model, z, schedule=sched, method=g.method, nfe=5, grid=grid, prediction="flow",
                                     pfdiff=g.pfdiff)
                errs.append(float(relative_errors(x, ref).median()))
            return sum(errs) / len(errs)
        fixed = held(None)
        opt = held(g)
        print(f"shift {shift:g} {m}{kw.get('pfdiff', '')}: fixed default grid {fixed:.4g}, optimized {opt:.4g} "
              f"(start {g.start_grid}, cal {g.start_error:.3g}->{g.calibration_error:.3g}, "
              f"val {g.start_validation_error:.3g}->{g.validation_error:.3g}, {time.time()-t0:.0f}s)", flush=True)
