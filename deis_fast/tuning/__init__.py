"""Tuning: fit a grid (``grids``: optimize_grid) or a whole plan (``plans``: learn_plan) to one model, the analytic
Gaussian start (``gaussian_start``), the tuned-file format (``files``) and the search that writes one (``search``:
tune). Imports no front end; diffusers pipelines are tuned by ``deis_fast.integrations.diffusers.tune_pipeline``."""
from .files import (FORMAT, FORMAT_VERSION, KINDS, Tuned, TunedFileError, TunedMismatchError, check_latent_shape,
                    k_diffusion_plan, load_tuned, save_tuned, tuned_plan)
from .gaussian_start import GaussianStart
from .grids import OptimizedGrid, load_grid, optimize_grid, save_grid
from .plans import LearnedPlan, learn_plan, load_plan, save_plan
from .search import AUTO_METHODS, reference_solutions, tune

__all__ = ["FORMAT", "FORMAT_VERSION", "KINDS", "Tuned", "TunedFileError", "TunedMismatchError", "check_latent_shape",
           "k_diffusion_plan", "load_tuned", "save_tuned", "tuned_plan", "GaussianStart", "OptimizedGrid", "load_grid",
           "optimize_grid", "save_grid", "LearnedPlan", "learn_plan", "load_plan", "save_plan", "AUTO_METHODS",
           "reference_solutions", "tune"]
