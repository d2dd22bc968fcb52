"""Plan building: ``build_plan`` at 10 and 50 NFE for one method of every family, against what a
diffusers pipeline pays for the same job (``set_timesteps``, called once per image): diffusers'
DEISMultistepScheduler (the baseline), DPMSolverMultistepScheduler, UniPCMultistepScheduler, and
DEISFastScheduler (whose ``set_timesteps`` builds a plan).
"""
from __future__ import annotations

import math
import warnings

import pytest

import deis_fast

import harness

# one method per family
METHODS = {"tab3": "eps-form AB in t", "logrho3": "eps-form AB in log rho", "dpmpp3": "data-form AB",
           "ipndm4": "iPNDM", "rho_heun": "Runge-Kutta", "ddim_eta": "stochastic", "pfdiff": "PFDiff"}
SCHEDULERS = ("DEISMultistepScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISFastScheduler")
NFES = (10, 50)


def _info(benchmark, cfg, nfe, **info):
    benchmark.group = f"plan building NFE {nfe}"
    harness.record(benchmark, cfg, nfe=nfe, **info)


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("method", METHODS)
def test_build_plan(benchmark, cfg, method, nfe):
    schedule = deis_fast.VPSchedule.discrete("linear")
    _info(benchmark, cfg, nfe, label=f"build_plan {method}", method=method, family=METHODS[method],
          dispatched_ops_per_nfe=harness.ops_per_call(lambda rec: deis_fast.build_plan(schedule, method, nfe)) / nfe)
    plan = benchmark(deis_fast.build_plan, schedule, method, nfe)
    assert plan.nfe == nfe
    assert all(math.isfinite(c) for op in plan.combines for c in op.coefs + (op.noise_coef,))
    times = [op.t for op in plan.evals]
    assert all(a >= b - 1e-6 for a, b in zip(times, times[1:])), f"evaluation times increase: {times}"
    assert times[0] == schedule.t_max and times[-1] >= schedule.t_min


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_set_timesteps(benchmark, cfg, name, nfe):
    kw = {"method": "tab3"} if name == "DEISFastScheduler" else {}
    sch = harness.diffusers_scheduler(name, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _info(benchmark, cfg, nfe, label=f"{name}.set_timesteps", scheduler=name,
              dispatched_ops_per_nfe=harness.ops_per_call(lambda rec: sch.set_timesteps(nfe)) / nfe,
              role="baseline" if name == "DEISMultistepScheduler" else None)
        benchmark(sch.set_timesteps, nfe)
    assert len(sch.timesteps) == nfe
