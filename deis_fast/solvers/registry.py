"""The method registry: every public method name maps to a pure plan builder ``(schedule, t, rho, **opts) -> Plan``."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from ..core.plan import Plan
from ..core.coefficients import dpmsolver_rows
from .multistep import data_ab_plan, eps_ab_plan, eps_dpmsolver_plan, ipndm_plan, rhoabm_plan
from .runge_kutta import TABLEAUS, rk_plan
from .stochastic import ddim_eta_plan
from . import sde, unipc

__all__ = ["MethodSpec", "METHOD_SPECS", "METHODS", "ALIASES", "get_method", "suggest_method"]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: what it consumes, how it interpolates, which options apply, and its builder."""

    name: str
    order: int                    # convergence order of the global error
    stages: int                   # NFE per step
    family: str                   # 'eps_ab', 'data_ab', 'ipndm', 'rk', 'stochastic', 'sde'
    builder: Callable[..., Plan]  # (name, schedule, t, rho, **options) -> Plan, with points/variable bound
    first_order: bool             # a first-order (DDIM-like) step: usable as a PFDiff base
    description: str
    multistep_options: bool = True  # accepts lower_order_final
    options: tuple[str, ...] = ("corrector",)  # further keyword options of the builder (see build_plan)
    variants: tuple[str, ...] = ()  # accepted values of ``variant``, the default first
    target: str = "eps"           # what its Evals hand the solver: 'eps' or 'x0' (the data prediction)
    points: int = 1               # model outputs a step combines (history depth; RK: 1)
    variable: str = "rho"         # interpolation variable of the multistep polynomial: 't', 'rho', 'logrho', 'lambda'

    @property
    def pfdiff_base(self) -> bool:
        """Whether PFDiff can wrap it (a first-order step)."""
        return self.first_order

    def build(self, schedule, t: np.ndarray, rho: np.ndarray, **opts) -> Plan:
        return self.builder(self.name, schedule, t, rho, **opts)


def _ms(name: str, order: int, family: str, builder: Callable[..., Plan], description: str, *, points: int = 1,
        variable: str = "rho", target: str = "eps", stages: int = 1, first_order: bool = False,
        bind: tuple[str, ...] = ("points",), **kw) -> MethodSpec:
    """A MethodSpec whose builder gets the spec's own points / variable (those named in ``bind``) bound."""
    bound = {k: v for k, v in (("points", points), ("variable", variable)) if k in bind}
    spec_kw = {k: kw.pop(k) for k in ("multistep_options", "options", "variants") if k in kw}
    return MethodSpec(name, order, stages, family, partial(builder, **bound, **kw) if bound or kw else builder,
                      first_order, description, target=target, points=points, variable=variable, **spec_kw)


def _registry() -> dict[str, MethodSpec]:
    m: dict[str, MethodSpec] = {}

    def eps_ab(name: str, order: int, points: int, variable: str, description: str) -> MethodSpec:
        return _ms(name, order, "eps_ab", eps_ab_plan, description, points=points, variable=variable,
                   first_order=points == 1, bind=("points", "variable"))

    m["ddim"] = eps_ab("ddim", 1, 1, "rho", "DDIM: Euler in rho on d xhat/d rho = eps (= tAB-0 = rhoAB-0)")
    for r in range(4):
        m[f"tab{r}"] = eps_ab(f"tab{r}", r + 1, r + 1, "t", f"tAB-DEIS, polynomial of degree {r} in t")
        m[f"rhoab{r}"] = eps_ab(f"rhoab{r}", r + 1, r + 1, "rho", f"rhoAB-DEIS (k-diffusion LMS), degree {r} in rho")
    for r in range(1, 4):
        m[f"rhoabm{r}"] = _ms(f"rhoabm{r}", r + 2, "eps_ab", rhoabm_plan,
                              f"rhoAB-{r} predictor (degree {r} in rho) + rho-Adams-Moulton corrector through the new "
                              f"eps (no extra NFE; out of t = 1 the first step is corrected in data form)"
                              + ("; the default on flow schedules" if r == 2 else ""), points=r + 1)
    for k in range(1, 4):
        m[f"logrho{k}"] = eps_ab(f"logrho{k}", k, k, "logrho",
                                 f"diffusers' DEISMultistepScheduler, solver_order={k} (log-rho AB)")
        m[f"dpmpp{k}"] = _ms(f"dpmpp{k}", k, "data_ab", data_ab_plan,
                             f"lambda-AB in data form with {k} point(s), exact weights (dpmpp2 = DPM-Solver++(2M) "
                             f"with solver_type='heun')", points=k, variable="lambda", target="x0", first_order=k == 1)
    m["dpmpp_2m"] = _ms("dpmpp_2m", 2, "data_ab", data_ab_plan,
                        "DPM-Solver++(2M) as published (midpoint weights; diffusers' default, k-diffusion's "
                        "sample_dpmpp_2m)", points=2, variable="lambda", target="x0", rows=dpmsolver_rows)
    m["dpmpp_3m"] = _ms("dpmpp_3m", 2, "data_ab", data_ab_plan,
                        "DPM-Solver++(3M) as in diffusers' DPMSolverMultistepScheduler(solver_order=3); measured "
                        "global order ~2.3 (its D2 weight is half the exact one; dpmpp3 is exact)",
                        points=3, variable="lambda", target="x0", rows=dpmsolver_rows)
    for k in range(1, 5):
        m[f"ipndm{k}"] = _ms(f"ipndm{k}", k, "ipndm", ipndm_plan,
                             f"iPNDM, fixed Adams-Bashforth weights of order {k} on the rho grid", points=k,
                             first_order=k == 1)
    m["ipndm_v"] = eps_ab("ipndm_v", 4, 4, "rho",
                          "variable-step iPNDM: exact 4-point AB in rho (reduces to iPNDM-4 on uniform grids)")
    for name, (_, b, _, order) in TABLEAUS.items():
        m[name] = _ms(name, order, "rk", rk_plan, f"rhoRK-DEIS: {name[4:]} Runge-Kutta in rho, {len(b)} NFE per step",
                      stages=len(b), first_order=name == "rho_euler", bind=(), multistep_options=False, options=())
    m["ddim_eta"] = _ms("ddim_eta", 1, "stochastic", ddim_eta_plan,
                        "stochastic DDIM with eta (eta=1: ancestral DDPM); per-sample noise", first_order=True,
                        bind=(), multistep_options=False, options=("eta",))
    for k in range(1, 4):
        m[f"unipc{k}"] = _ms(f"unipc{k}", k + 1, "data_ab", unipc.unipc_plan,
                             f"UniPC-{k}: UniP-{k} predictor + UniC corrector (order {k + 1}; corrector=False: UniP "
                             f"alone, order {k}); diffusers' UniPCMultistepScheduler(solver_order={k})", points=k,
                             variable="lambda", target="x0", options=("corrector", "variant"), variants=unipc.VARIANTS)
    m["dpmpp_2m_sde"] = _ms("dpmpp_2m_sde", 1, "sde", sde.sde_dpmsolver_plan,
                            "DPM-Solver++(2M) SDE (k-diffusion's sample_dpmpp_2m_sde, diffusers' sde-dpmsolver++); "
                            "eta, s_noise; variant midpoint|heun; eta=0: dpmpp_2m|dpmpp2", points=2, variable="lambda",
                            target="x0", options=("eta", "s_noise", "variant"), variants=sde.VARIANTS)
    m["dpmpp_3m_sde"] = _ms("dpmpp_3m_sde", 1, "sde", sde.sde_dpmsolver_plan,
                            "DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde); eta, s_noise", points=3,
                            variable="lambda", target="x0", options=("eta", "s_noise"), variant="heun")
    m["dpmpp_1m_sde"] = _ms("dpmpp_1m_sde", 1, "sde", sde.sde_dpmsolver_plan,
                            "first-order SDE-DPM-Solver++ (diffusers' sde-dpmsolver++, solver_order=1); eta, s_noise",
                            points=1, variable="lambda", target="x0", first_order=False,
                            options=("eta", "s_noise"))
    for k in range(1, 4):
        m[f"dpmsolver{k}"] = _ms(f"dpmsolver{k}", k, "dpmsolver", eps_dpmsolver_plan,
                                 f"DPM-Solver multistep in the eps form (diffusers' algorithm_type='dpmsolver', "
                                 f"solver_order={k}); variant midpoint|heun" + ("; = ddim" if k == 1 else ""),
                                 points=k, variable="lambda", first_order=k == 1, options=("variant",),
                                 variants=sde.VARIANTS)
    for k in range(1, 3):
        m[f"sde_dpmsolver{k}"] = _ms(f"sde_dpmsolver{k}", 1, "sde", sde.sde_eps_dpmsolver_plan,
                                     f"SDE-DPM-Solver in the eps form (diffusers' algorithm_type='sde-dpmsolver', "
                                     f"solver_order={k}); s_noise; variant midpoint|heun", points=k,
                                     variable="lambda", options=("s_noise", "variant"), variants=sde.VARIANTS)
    return m


METHOD_SPECS: dict[str, MethodSpec] = _registry()
ALIASES = {"deis": "tab3", "euler": "ddim", "pndm": "ipndm4"}
METHODS: tuple[str, ...] = tuple(METHOD_SPECS) + tuple(ALIASES) + ("pfdiff",)


def suggest_method(name: str) -> str | None:
    """The registered name closest to ``name`` (case, '++' for 'pp', '-' for '_'), or None."""
    import difflib
    norm = str(name).strip().lower().replace("++", "pp").replace("-", "_").replace(" ", "_")
    if norm in METHODS:
        return norm
    close = difflib.get_close_matches(norm, METHODS, n=1, cutoff=0.6)
    if not close and "_" not in norm:  # 'dpmpp2m' -> 'dpmpp_2m'
        close = difflib.get_close_matches(norm, [m.replace("_", "") for m in METHODS], n=1, cutoff=0.8)
        close = [m for m in METHODS if m.replace("_", "") == close[0]][:1] if close else []
    return close[0] if close else None


def get_method(name: str) -> MethodSpec:
    key = ALIASES.get(name, name)
    if key not in METHOD_SPECS:
        guess = suggest_method(name)
        hint = f"did you mean {guess!r}? " if guess else ""
        raise ValueError(f"unknown method {name!r}; {hint}valid methods: {', '.join(METHODS)}")
    return METHOD_SPECS[key]
