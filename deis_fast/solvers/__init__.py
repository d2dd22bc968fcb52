"""Solvers: the method registry (``registry``) and the pure plan builders it names; ``build_plan`` turns
(schedule, method, nfe, grid, options) into a :class:`~deis_fast.core.plan.Plan`."""
from __future__ import annotations

from .registry import ALIASES, METHOD_SPECS, METHODS, MethodSpec, get_method, suggest_method
from .build import (DEFAULT_NFE, MAX_NFE, PlanOptions, build_plan, check_method, default_grid, default_method,
                    describe_methods, grid_intervals, nfe_for_intervals, resolve)

__all__ = ["MethodSpec", "METHOD_SPECS", "METHODS", "ALIASES", "get_method", "suggest_method", "PlanOptions",
           "build_plan", "check_method", "default_grid", "default_method", "describe_methods", "grid_intervals", "nfe_for_intervals",
           "resolve", "MAX_NFE", "DEFAULT_NFE"]
