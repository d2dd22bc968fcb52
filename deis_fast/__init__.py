"""deis_fast: few-step diffusion sampling (DEIS, iPNDM, DPM-Solver++-style, PFDiff) with fused updates.

    import deis_fast
    sched = deis_fast.VPSchedule.discrete("linear")
    x = deis_fast.sample(model, noise, schedule=sched, method="tab3", nfe=10)

    m = deis_fast.load_model("digits")      # the embedded 8x8 models ("digits": eps, "flow") or a diffusers folder
    x = deis_fast.sample(m.model, torch.randn(16, *m.shape), m.schedule, prediction=m.prediction)
"""
from __future__ import annotations

from ._version import __version__
from .core import ops
from .core.adapters import PREDICTIONS, ModelAdapter, denoiser_to_model
from .core.grids import GRIDS, make_grid
from .core.plan import Combine, Eval, Plan
from .core.schedules import (FlowSchedule, Schedule, VESchedule, VPSchedule, schedule_fingerprint,
                             schedule_from_diffusers_config)
from .sampler import NonFiniteError, Sampler, build_plan, randn_per_sample, sample
from .solvers import METHOD_SPECS, METHODS
from .tuning import (GaussianStart, LearnedPlan, OptimizedGrid, learn_plan, load_grid, load_plan, optimize_grid,
                     save_grid, save_plan)
from .zoo import LoadedModel, load_model

ops._dispatch.warn_if_no_ext()  # once, at import: the C++ kernel is missing (why, and how to get it)

__all__ = ["GRIDS", "METHODS", "METHOD_SPECS", "PREDICTIONS", "Combine", "Eval", "FlowSchedule", "GaussianStart", "LearnedPlan", "LoadedModel",
           "ModelAdapter", "NonFiniteError",
           "OptimizedGrid", "Plan", "Sampler", "learn_plan", "load_grid", "load_model", "load_plan", "__version__", "optimize_grid", "save_grid",
           "save_plan", "Schedule", "VESchedule", "VPSchedule", "build_plan", "schedule_fingerprint", "denoiser_to_model",
           "make_grid", "ops", "randn_per_sample", "sample", "schedule_from_diffusers_config"]
