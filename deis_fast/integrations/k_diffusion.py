"""deis_fast samplers with k-diffusion's sampler signature (k-diffusion itself is not needed).

    from deis_fast.integrations.k_diffusion import sample_deis
    sigmas = K.sampling.get_sigmas_karras(10, 0.002, 80.0)     # decreasing, ends with 0
    x = sample_deis(denoiser, torch.randn(shape) * sigmas[0], sigmas, extra_args={"cond": c})

Conventions (k-diffusion's): ``model(x, sigma * s_in, **extra_args)`` is a denoiser returning x0; ``x``
starts at ``sigmas[0]`` scale (VE); ``sigmas`` is decreasing and may end with 0. The sigmas *are* the
solver grid (t = sigma in a ``VESchedule``), so a single-stage method makes ``len(sigmas) - 1``
denoiser calls. A final sigma = 0 is a first-order step to the denoised output (for log-rho and
data-form methods inside the plan; for Runge-Kutta methods one extra denoiser call, as in k-diffusion's
``sample_heun``). ``model_type="const"`` takes ComfyUI's CONST convention for flow models instead (sigma in [0, 1],
x = sigma noise + (1 - sigma) x0, sigmas from 1 to 0): the sigmas are then times of a ``FlowSchedule``.
``callback`` receives ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` after each state
update: ``i`` counts network evaluations (0-based), ``sigma`` is where the last one was made and
``denoised`` its output.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..grids import ays_sigmas, kl_optimal_sigmas, linear_quadratic_fractions
from ..plan import Eval
from ..sampler import Sampler
from ..schedules import FlowSchedule, Schedule, VESchedule
from ..solvers import PlanOptions, nfe_for_intervals, resolve

__all__ = ["sample_deis_fast", "sample_deis", "sample_deis_logrho", "sample_ipndm", "sample_ipndm_v",
           "sample_dpmpp_deis", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_unipc",
           "sample_rho_rk", "sample_pfdiff", "get_sigmas_karras", "get_sigmas_ays", "get_sigmas_kl_optimal",
           "get_sigmas_linear_quadratic"]


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: Any = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """k-diffusion's Karras et al. (2022) noise levels: ``n`` sigmas from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = (a + ramp * (b - a)) ** rho
    return torch.cat([sig, sig.new_zeros([1])]).to(device=device, dtype=dtype)


def _to_tensor(sig: np.ndarray, device: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(sig, dtype=np.float64)).to(device=device, dtype=dtype)


def get_sigmas_ays(n: int, model: str = "sd15", device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Align Your Steps noise levels for ``n`` steps (``model``: 'sd15', 'sdxl' or 'svd'), the last one
    replaced by 0 (as ComfyUI's AlignYourStepsScheduler); other n than 10 are log-linearly interpolated."""
    tables = {"sd15": "ays", "sdxl": "ays_sdxl", "svd": "ays_svd"}
    if model not in tables:
        raise ValueError(f"model must be one of {', '.join(tables)}, got {model!r}")
    sig = ays_sigmas(_check_steps(n, 1), tables[model])
    sig[-1] = 0.0
    return _to_tensor(sig, device, dtype)


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float, device: Any = "cpu",
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` noise levels uniform in arctan(sigma) from sigma_max to sigma_min, then 0 (ComfyUI's kl_optimal)."""
    sig = kl_optimal_sigmas(_check_steps(n, 2) - 1, sigma_min, sigma_max)
    return _to_tensor(np.append(sig, 0.0), device, dtype)


def get_sigmas_linear_quadratic(n: int, sigma_max: float, threshold_noise: float = 0.025,
                                linear_steps: int | None = None, device: Any = "cpu",
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` steps of ComfyUI's linear_quadratic schedule (Mochi's): ``n + 1`` sigmas from sigma_max to 0."""
    sig = linear_quadratic_fractions(_check_steps(n, 1), threshold_noise, linear_steps) * sigma_max
    return _to_tensor(sig, device, dtype)


def _check_steps(n: Any, least: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < least:
        raise ValueError(f"n must be an int >= {least}, got {n!r}")
    return int(n)


def _sigmas_to_numpy(sigmas: Any) -> np.ndarray:
    s = (sigmas.detach().to("cpu", torch.float64).numpy() if isinstance(sigmas, torch.Tensor)
         else np.asarray(sigmas, dtype=np.float64)).reshape(-1)
    if s.size < 2:
        raise ValueError(f"sigmas needs at least 2 values (one step), got {s.size}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("sigmas must be finite and >= 0")
    if np.any(np.diff(s) >= 0):
        raise ValueError("sigmas must be strictly decreasing (noise to data)")
    return s


def sample_deis_fast(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any,
                     extra_args: Mapping[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                     disable: bool | None = None, method: str = "tab3", model_type: str = "eps",
                     **options: Any) -> torch.Tensor:
    """Any deis_fast method on a k-diffusion denoiser over the given ``sigmas``.

    ``model_type``: "eps" (k-diffusion's VE convention, x = x0 + sigma noise) or "const" (ComfyUI's CONST model
    sampling of flow models: sigma in [0, 1], x = sigma noise + (1 - sigma) x0; sigmas may start at 1).
    ``options`` go to :class:`deis_fast.Sampler` (``pfdiff=(k, h)``, ``eta``, ``s_noise``, ``variant``,
    ``corrector``, ``lower_order_final``). Stochastic methods draw their noise from ``generator=`` (one, or
    one per sample), torch's global generator by default, or, as in k-diffusion, from
    ``noise_sampler(sigma, sigma_next)`` called once per noisy step in order. ``tuned``: a tuned file
    (``deis_fast.tuning``) made for this denoiser's schedule (``VESchedule(sigma_min, sigma_max)`` of these sigmas,
    ``prediction="x0"``; CONST: ``FlowSchedule(time_scale=1)``): its grid or plan replaces the sigmas between their
    ends; another sigma range, method or NFE is refused.
    """
    generator = options.pop("generator", None)
    tuned = options.pop("tuned", None)
    noise_sampler = options.pop("noise_sampler", None)
    s = _sigmas_to_numpy(sigmas)
    extra_args = dict(extra_args or {})
    to_zero = s[-1] == 0.0
    positive = s[s > 0]
    sched, key = _schedule_for(model_type, s, positive)
    spec, plan_opts = resolve(method, PlanOptions(pfdiff=options.get("pfdiff")))
    # Runge-Kutta stages cannot be evaluated at sigma = 0: integrate to the last positive sigma, then
    # take k-diffusion's final Euler step (x <- denoised) with one more call
    split_final = to_zero and spec.family == "rk"
    grid = s[:-1] if split_final else s
    last: dict[str, torch.Tensor] = {}

    def denoiser(xx: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        out = model(xx, sigma, **kw)
        last["denoised"] = out
        return out

    nfe = _nfe_for_sigmas(len(grid) - 1, method, plan_opts)
    # k-diffusion sigmas end where the caller wants to stop (ComfyUI splits a run across samplers), so a CONST
    # grid that ends above sigma = 0 is meant: say so with t_end (deis_fast refuses a flow grid that stops short)
    t_end = float(grid[-1]) if model_type == "const" else None
    if tuned is not None:  # deis_fast.tuning: the tuned plan replaces the sigmas between their ends
        from ..tuning import k_diffusion_plan
        sched, options["plan"] = k_diffusion_plan(tuned, sched, method, nfe or (len(grid) - 1) * spec.stages)
        grid, split_final = np.asarray(options["plan"].times), False
    sampler = Sampler(denoiser, sched, method, nfe, {key: [float(v) for v in grid]}, prediction="x0",
                      t_end=t_end, progress=disable is not True, **options)
    evals = sampler.plan.evals

    steps = [0]

    def cb(info: dict) -> None:
        # once per step (the executor reports each step once, Runge-Kutta stages included): k-diffusion's i is the
        # step index and sigma that step's sigmas[i]; a PFDiff step spans k+1 sigmas, so it reports its call's sigma
        i = steps[0]
        steps[0] += 1
        sig = float(grid[i]) if plan_opts.pfdiff is None else float(evals[max(info["i"] - 1, 0)].model_t)
        callback({"x": info["x"], "i": i, "sigma": sig, "sigma_hat": sig, "denoised": last.get("denoised")})
    step_noise = None
    if noise_sampler is not None and sampler.plan.num_noise:
        if plan_opts.pfdiff is not None:
            raise ValueError("noise_sampler is not supported with PFDiff; pass generator= instead")
        step_noise = torch.stack(_draw_from_noise_sampler(sampler.plan, noise_sampler)).to(x.device, x.dtype)
    out = sampler(x, generator=generator, step_noise=step_noise, callback=cb if callback is not None else None,
                  **extra_args)
    if split_final:
        sig = float(s[-2])
        out = model(out, out.new_full((out.shape[0],), sig), **extra_args)
        if callback is not None:
            callback({"x": out, "i": len(grid) - 1, "sigma": sig, "sigma_hat": sig, "denoised": out})
    return out


def _schedule_for(model_type: str, s: np.ndarray, positive: np.ndarray) -> tuple[Schedule, str]:
    """The schedule whose time is k-diffusion's sigma, and the grid key that reads the sigmas as such times."""
    if model_type == "eps":
        return VESchedule(float(positive[-1]), float(s[0])), "sigma"
    if model_type == "const":
        if s[0] > 1.0:
            raise ValueError(f"CONST (flow) sigmas lie in [0, 1], got sigmas[0] = {s[0]}; for VE denoisers pass "
                             "model_type='eps'")
        return FlowSchedule(time_scale=1.0), "t"
    raise ValueError(f"model_type must be 'eps' (VE, x = x0 + sigma noise) or 'const' (flow: x = sigma noise + "
                     f"(1 - sigma) x0), got {model_type!r}")


def _draw_from_noise_sampler(plan, noise_sampler: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
    """One ``noise_sampler(sigma_i, sigma_{i+1})`` draw per noisy Combine of a one-stage plan, in plan order."""
    draws, step = [], -1
    for op in plan.ops:
        if isinstance(op, Eval):
            step += 1
        elif op.noise_index >= 0:
            lo, hi = (torch.tensor(plan.times[step + j], dtype=torch.float64) for j in (0, 1))
            draws.append(noise_sampler(lo, hi))
    return draws


def _nfe_for_sigmas(intervals: int, method: str, options: PlanOptions) -> int | None:
    """The NFE a plan on these sigmas has (None: taken from the grid), with k-diffusion's terms in the error."""
    try:
        return nfe_for_intervals(method, intervals, options)
    except ValueError as e:
        raise ValueError(f"{e} (len(sigmas) - 1 steps; get_sigmas_karras(n) gives n steps when it ends in 0)") from None


def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, method: str = "tab3", **options):
    """DEIS (tAB, cubic in t = sigma by default; ``method`` picks another deis_fast method)."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method=method, **options)


def sample_deis_logrho(model, x, sigmas, extra_args=None, callback=None, disable=None, order: int = 3, **options):
    """log-rho AB DEIS (diffusers' DEISMultistepScheduler flavour), ``order`` 1-3."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method=f"logrho{int(order)}", **options)


def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, order: int = 4, **options):
    """iPNDM: fixed Adams-Bashforth weights in sigma, ``order`` 1-4."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method=f"ipndm{int(order)}", **options)


def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """Variable-step iPNDM (exact 4-point AB in sigma on any grid)."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method="ipndm_v", **options)


def sample_dpmpp_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, order: int = 2, **options):
    """Data-form lambda-AB multistep (DPM-Solver++ ``order``M-style), ``order`` 1-3."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method=f"dpmpp{int(order)}", **options)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """DPM-Solver++(2M) as k-diffusion's ``sample_dpmpp_2m`` (midpoint weights), as one fused plan."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method="dpmpp_2m", **options)


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler=None, solver_type: str = "midpoint", **options):
    """DPM-Solver++(2M) SDE as k-diffusion's ``sample_dpmpp_2m_sde`` (``solver_type`` midpoint|heun). The noise
    comes from ``noise_sampler(sigma, sigma_next)`` if given, else from ``generator=`` (k-diffusion's default
    is a Brownian tree; pass ``noise_sampler=BrownianTreeNoiseSampler(...)`` to reproduce it)."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method="dpmpp_2m_sde", eta=eta,
                            s_noise=s_noise, noise_sampler=noise_sampler, variant=solver_type, **options)


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler=None, **options):
    """DPM-Solver++(3M) SDE as k-diffusion's ``sample_dpmpp_3m_sde`` (noise as in :func:`sample_dpmpp_2m_sde`)."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method="dpmpp_3m_sde", eta=eta,
                            s_noise=s_noise, noise_sampler=noise_sampler, **options)


def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order: int = 3,
                 variant: str = "bh2", **options):
    """UniPC-``order`` (UniP predictor + UniC corrector, ``variant`` bh1|bh2); ``corrector=False``: UniP alone."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method=f"unipc{int(order)}",
                            variant=variant, **options)


def sample_rho_rk(model, x, sigmas, extra_args=None, callback=None, disable=None, method: str = "rho_heun",
                  **options):
    """rhoRK-DEIS (Runge-Kutta in sigma): ``rho_heun`` (= k-diffusion's sample_heun), ``rho_rk4``, ..."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method=method, **options)


def sample_pfdiff(model, x, sigmas, extra_args=None, callback=None, disable=None, k: int = 2, h: int = 1,
                  base: str = "ddim", **options):
    """PFDiff-k_h timestep skipping on a first-order ``base`` ('ddim', 'dpmpp1', 'ddim_eta').
    ``sigmas`` is the base grid: it needs N(k+1) - k steps for N network calls (28 steps for 10 NFE
    with k=2)."""
    return sample_deis_fast(model, x, sigmas, extra_args, callback, disable, method=base, pfdiff=(k, h), **options)
