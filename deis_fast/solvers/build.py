"""From (schedule, method, nfe, grid, options) to a :class:`~deis_fast.core.plan.Plan`: the one place that resolves a
method name (PFDiff included), checks the NFE budget, makes the grid and applies the plan options."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..core.grids import BETA_AB, GridSpec, grid_rho, make_grid
from ..core.plan import Plan
from ..core.schedules import FlowSchedule, Schedule, schedule_fingerprint
from .registry import METHOD_SPECS, MethodSpec, get_method
from .pfdiff import DEFAULT_KH, check_kh, pfdiff_plan
from .restart import eval_at_time, tail_plan
from .unipc import check_variant

__all__ = ["PlanOptions", "build_plan", "default_grid", "default_method", "resolve", "grid_intervals", "nfe_for_intervals",
           "check_method", "describe_methods", "MAX_NFE", "DEFAULT_NFE"]

MAX_NFE = 100_000
DEFAULT_NFE = 10   # with a named grid and no nfe= (a list grid= sets the NFE itself)
PFDIFF = "pfdiff"  # the method name of PFDiff-(2,1) on DDIM


@dataclass(frozen=True)
class PlanOptions:
    """Every keyword that shapes a plan beyond (method, nfe, grid, t_start, t_end), carried as one value.

    eta / s_noise: noise scale of the stochastic methods (ddim_eta, the SDE methods) only (default 1).
    lower_order_final: multistep methods drop to lower orders on the last steps (diffusers' default); or the
    order caps of the last steps, the last entry for the last step (``(1,)``: diffusers' ``euler_at_final``).
    karras_rho: exponent of the karras grid. integer_timesteps: round a discrete grid to training steps.
    pfdiff=(k, h): PFDiff-k_h on a first-order base (pfdiff_experimental: on a multistep eps-form base).
    beta_ab: the beta grid's (a, b). corrector: UniC-style corrector (None = the method's default: on for
    unipc*); disable_corrector: step indices left uncorrected. variant: 'bh1'/'bh2' (unipc*),
    'midpoint'/'heun' (dpmpp_2m_sde). denoise_to_zero: a final step to rho = 0 uses the last model output alone
    (x <- the denoised output, as k-diffusion's and ComfyUI's samplers step into sigma = 0) also for the eps-form
    tAB / rhoAB / iPNDM methods (log-rho, data-form and SDE methods always do)."""

    eta: float | None = None
    lower_order_final: bool | tuple[int, ...] = False
    karras_rho: float = 7.0
    integer_timesteps: bool = False
    pfdiff: tuple[int, int] | None = None
    pfdiff_experimental: bool = False
    beta_ab: tuple[float, float] = BETA_AB
    corrector: bool | None = None
    variant: str | None = None
    s_noise: float = 1.0
    disable_corrector: tuple[int, ...] = ()
    denoise_to_zero: bool = False

    def __post_init__(self) -> None:
        if self.pfdiff is not None and not isinstance(self.pfdiff, tuple):
            try:
                object.__setattr__(self, "pfdiff", tuple(self.pfdiff))
            except TypeError:
                raise ValueError(f"pfdiff must be a pair (k, h) of ints, got {self.pfdiff!r}") from None
        if not isinstance(self.disable_corrector, tuple):
            object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))
        if not isinstance(self.lower_order_final, (bool, tuple)):
            v = self.lower_order_final
            object.__setattr__(self, "lower_order_final", bool(v) if isinstance(v, (int, np.bool_)) else tuple(v))
        if not isinstance(self.beta_ab, tuple):
            object.__setattr__(self, "beta_ab", tuple(self.beta_ab))

    @classmethod
    def of(cls, options: "PlanOptions | None" = None, **kw: Any) -> "PlanOptions":
        """``options`` (default: all defaults) with the keywords ``kw`` replaced; unknown keywords raise."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kw) - set(names))
        if unknown:
            raise TypeError(f"unknown plan option(s) {', '.join(unknown)}; the options are {', '.join(names)}")
        base = cls() if options is None else options
        return dataclasses.replace(base, **kw) if kw else base


def resolve(method: str, options: PlanOptions | None = None) -> tuple[MethodSpec, PlanOptions]:
    """(the base method's spec, the options) for a method name: ``"pfdiff"`` is PFDiff (``options.pfdiff``,
    default (2, 1)) on DDIM; any other name is a registered method (or an alias)."""
    o = PlanOptions() if options is None else options
    if method == PFDIFF:
        return get_method("ddim"), dataclasses.replace(o, pfdiff=o.pfdiff if o.pfdiff is not None else DEFAULT_KH)
    return get_method(method), o


def describe_methods() -> list[tuple[str, str]]:
    """(name, one line) for every method name a user can pass, PFDiff included."""
    rows = [(n, f"order {m.order}, {m.stages} NFE/step  {m.description}") for n, m in METHOD_SPECS.items()]
    k, h = DEFAULT_KH
    return rows + [(PFDIFF, f"PFDiff-({k},{h}) timestep skipping on ddim; pfdiff=(k, h) wraps any first-order method")]


def check_method(method: str) -> str:
    """``method`` if it names a registered method, an alias or ``"pfdiff"``; else a ValueError with a hint."""
    resolve(method)
    return method


def steps_per_nfe(spec: MethodSpec, options: PlanOptions) -> tuple[int, int]:
    """(stages, k): a step costs ``stages`` NFE; under PFDiff-k_h one NFE spans k+1 grid intervals (k = 0 else)."""
    return spec.stages, (check_kh(options.pfdiff)[0] if options.pfdiff is not None else 0)


def grid_intervals(method: str, nfe: int, options: PlanOptions | None = None) -> int:
    """Number of grid intervals a (method, nfe, options) plan uses."""
    spec, o = resolve(method, options)
    stages, k = steps_per_nfe(spec, o)
    return nfe * (k + 1) - k if o.pfdiff is not None else nfe // stages


def nfe_for_intervals(method: str, intervals: int, options: PlanOptions | None = None) -> int | None:
    """The NFE whose plan uses exactly ``intervals`` grid intervals (None when the method takes the NFE from the
    grid itself); a ValueError when no NFE fits (PFDiff-k_h needs N(k+1) - k intervals)."""
    spec, o = resolve(method, options)
    if o.pfdiff is None:
        return None
    k = check_kh(o.pfdiff)[0]
    if intervals < 1 or (intervals + k) % (k + 1):
        lo = max((intervals + k) // (k + 1), 1)
        raise ValueError(f"PFDiff-{o.pfdiff} needs N*{k + 1} - {k} grid intervals for N network calls; the grid has "
                         f"{intervals}: use {lo * (k + 1) - k} or {(lo + 1) * (k + 1) - k}")
    return (intervals + k) // (k + 1)


FLOW_DEFAULT_METHOD = "rhoabm2"


def default_method(schedule: Schedule | None) -> str:
    """The method used when none is given: rhoabm2 on flow schedules (tab3 there extrapolates a cubic in t over
    the long last steps of a shifted grid, worse than Euler at shift 3; rhoabm2 is never worse than Euler on the
    FlowMatch grid at shift 1-3.2 and NFE 4-20, benchmarks/RESULTS.md), tab3 elsewhere."""
    return FLOW_DEFAULT_METHOD if isinstance(schedule, FlowSchedule) else "tab3"


def default_grid(schedule: Schedule, method: str) -> str:
    """A good fixed grid per family: time_quadratic for tAB/rhoAB/iPNDM on VP, logsnr for log-rho and
    data-form methods (DPM-Solver's choice), karras for VE, diffusers' shifted uniform grid for flow."""
    if isinstance(schedule, FlowSchedule):
        return "time_uniform"  # diffusers' FlowMatch grid (shifted by the schedule)
    if not schedule.variance_preserving:
        return "karras"
    if method.startswith(("logrho", "dpmpp", "unipc")):
        return "logsnr"
    return "time_quadratic"


def check_nfe(nfe: Any, stages: int, method: str) -> int:
    """The number of steps for an NFE budget (a ValueError / TypeError that says how to fix a bad one)."""
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)):
        raise TypeError(f"nfe must be an int, got {nfe!r}")
    nfe = int(nfe)
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if nfe > MAX_NFE:
        raise ValueError(f"nfe={nfe} is absurdly large (limit {MAX_NFE}); few-step samplers are meant for 1-1000 NFE")
    if nfe < stages:
        raise ValueError(f"method {method!r} uses {stages} network evaluations per step, so nfe must be >= {stages} "
                         f"(got {nfe})")
    if nfe % stages:
        raise ValueError(f"method {method!r} uses {stages} NFE per step; nfe={nfe} is not a multiple of {stages}. "
                         f"Use nfe={nfe - nfe % stages} or {nfe - nfe % stages + stages}")
    return nfe // stages


def _grid_len(grid: Any) -> int:
    """The number of times in an explicit grid (a sequence, or a one-key mapping of them)."""
    values = next(iter(grid.values()), ()) if isinstance(grid, Mapping) else grid
    return int(np.size(np.asarray(values, dtype=object)))


def build_plan(schedule: Schedule, method: str = "tab3", nfe: int | None = None, grid: GridSpec | None = None,
               t_start: float | None = None, t_end: float | None = None, *, options: PlanOptions | None = None,
               start_eval: int | None = None, **option_kw: Any) -> Plan:
    """Compile (schedule, method, nfe, grid) to a :class:`Plan` (pure, float64, host side).

    Plan options come as ``options`` (a :class:`PlanOptions`) and/or as its field names (``eta=``,
    ``pfdiff=``, ``corrector=``, ...); an option that does not apply to the method is an error, never ignored.
    With an explicit grid (a list of times), ``t_start`` (one of the plan's Eval times) or ``start_eval``
    (an Eval index) starts the plan in the middle, as img2img does: the state at that Eval's time is
    integrated to the end with the Evals that remain and a cold history (``deis_fast.solvers.restart``).
    With a named grid, ``t_start`` is where the grid begins. ``nfe=None``: a list grid sets the NFE (its steps,
    or for PFDiff the N with N(k+1) - k intervals), a named grid gets ``DEFAULT_NFE`` (10); an ``nfe`` that
    disagrees with a list grid raises.
    """
    o = PlanOptions.of(options, **option_kw)
    if isinstance(grid, str) and grid == "optimized":
        raise ValueError("grid='optimized' needs the model and calibration noise: use "
                         "Sampler(model, ..., grid='optimized', calibration_noise=z) or deis_fast.optimize_grid(...)")
    explicit = grid is not None and not isinstance(grid, str)
    if start_eval is not None or (explicit and t_start is not None):
        if start_eval is not None and t_start is not None:
            raise ValueError("give t_start or start_eval, not both")
        plan = _build_tail(schedule, method, nfe, grid, t_start, start_eval, o)
    else:
        plan = _build(schedule, method, nfe, grid, t_start, t_end, o)
    plan = dataclasses.replace(plan, schedule_id=schedule_fingerprint(schedule))
    bad = [op for op in plan.combines if not all(math.isfinite(c) for c in op.coefs + (op.noise_coef,))]
    if bad:
        raise ValueError(f"the {plan.method!r} plan has non-finite coefficients (first: {bad[0]}); the schedule or "
                         "grid is degenerate (check the betas / sigma range and t_start, t_end)")
    return plan


def _build(schedule: Schedule, method: str, nfe: int | None, grid: GridSpec | None, t_start: float | None,
           t_end: float | None, o: PlanOptions) -> Plan:
    spec, o = resolve(method, o)
    grid = default_grid(schedule, spec.name) if grid is None else grid
    if nfe is None:
        nfe = DEFAULT_NFE if isinstance(grid, str) else nfe_for_intervals(method, _grid_len(grid) - 1, o)
    if o.pfdiff is not None:
        if o.corrector or o.variant is not None or o.s_noise != 1.0:
            raise ValueError("pfdiff wraps a plain first-order step: corrector, variant and s_noise do not apply")
        if o.eta is not None and spec.family != "stochastic":
            raise ValueError(f"eta applies to a stochastic PFDiff base (ddim_eta), not {spec.name!r}")
        return pfdiff_plan(spec, schedule, nfe, grid, t_start, t_end, o.pfdiff, eta=1.0 if o.eta is None else o.eta,
                           karras_rho=o.karras_rho, integer_timesteps=o.integer_timesteps,
                           experimental=o.pfdiff_experimental, beta_ab=o.beta_ab)
    if o.pfdiff_experimental:
        raise ValueError("pfdiff_experimental applies with pfdiff=(k, h)")
    if nfe is None:
        steps = None
    else:
        steps = check_nfe(nfe, spec.stages, spec.name)
    t = make_grid(schedule, grid, steps, t_start, t_end, karras_rho=o.karras_rho,
                  integer_timesteps=o.integer_timesteps, beta_ab=o.beta_ab)
    rho = grid_rho(schedule, t)
    opts = builder_options(spec, o)
    return spec.build(schedule, t, rho, **opts)


def _build_tail(schedule: Schedule, method: str, nfe: int | None, grid: GridSpec | None, t_start: float | None,
                start_eval: int | None, o: PlanOptions) -> Plan:
    """The plan that starts at an Eval of the full plan (by index or by time) with a cold history."""
    full = _build(schedule, method, nfe, grid, None, None, o)
    spec, o = resolve(method, o)
    pf = check_kh(o.pfdiff) if o.pfdiff is not None else None
    if start_eval is None:
        start_eval = eval_at_time(full, float(t_start), spec.stages)
    elif isinstance(start_eval, bool) or not isinstance(start_eval, (int, np.integer)):
        raise TypeError(f"start_eval must be an int, got {start_eval!r}")
    flat = dataclasses.replace(o, integer_timesteps=False)

    def build(g: list[float], n: int) -> Plan:
        return _build(schedule, method, n if pf is not None else None, g, None, None, flat)
    return tail_plan(schedule, full, int(start_eval), family=spec.family, stages=spec.stages, pfdiff=pf, build=build)


_KIND = {"rk": "a Runge-Kutta method (no past network output to correct with)", "sde": "an SDE method",
         "stochastic": "a stochastic one-step method"}


def builder_options(spec: MethodSpec, o: PlanOptions) -> dict:
    """The builder keywords for ``spec``'s own options; an option set on a method that lacks it raises."""
    out: dict = {}
    if o.corrector or o.disable_corrector:
        if "corrector" not in spec.options:
            raise ValueError(f"corrector=True / disable_corrector need a deterministic multistep method (tab*, rhoab*, "
                             f"logrho*, dpmpp*, ipndm*, unipc*); {spec.name!r} is {_KIND.get(spec.family, 'not one')}")
    if o.corrector is not None and "corrector" in spec.options:
        out["corrector"] = bool(o.corrector)
    if o.disable_corrector:
        out["disable_corrector"] = tuple(o.disable_corrector)
    if o.variant is not None:
        if not spec.variants:
            with_variants = ", ".join(f"{m.name} ({'|'.join(m.variants)})" for m in METHOD_SPECS.values() if m.variants)
            raise ValueError(f"method {spec.name!r} has no variants (got variant={o.variant!r}); methods with "
                             f"variants: {with_variants}")
        out["variant"] = check_variant(o.variant, spec.variants, spec.name)
    if "eta" in spec.options:
        out["eta"] = 1.0 if o.eta is None else o.eta
    elif o.eta is not None:
        raise ValueError(f"eta applies to stochastic methods (ddim_eta, dpmpp_2m_sde, dpmpp_3m_sde), not "
                         f"{spec.name!r}; drop eta or use one of those")
    if "s_noise" in spec.options:
        out["s_noise"] = o.s_noise
    elif o.s_noise != 1.0:
        raise ValueError(f"s_noise applies to the SDE methods (dpmpp_2m_sde, dpmpp_3m_sde), not {spec.name!r}")
    if spec.multistep_options:
        out["lower_order_final"] = o.lower_order_final
        if o.denoise_to_zero and spec.family in ("eps_ab", "ipndm"):
            out["denoise_to_zero"] = True
    elif o.lower_order_final:
        raise ValueError(f"lower_order_final applies to multistep methods, not {spec.name!r}")
    return out
