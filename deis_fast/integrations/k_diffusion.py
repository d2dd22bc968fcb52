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

from ..sampler import Sampler
from ..schedules import FlowSchedule, Schedule, VESchedule
from ..solvers import get_method

__all__ = ["sample_deis_fast", "sample_deis", "sample_deis_logrho", "sample_ipndm", "sample_ipndm_v",
           "sample_dpmpp_deis", "sample_dpmpp_2m", "sample_rho_rk", "sample_pfdiff",
           "get_sigmas_karras"]


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: Any = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """k-diffusion's Karras et al. (2022) noise levels: ``n`` sigmas from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = (a + ramp * (b - a)) ** rho
    return torch.cat([sig, sig.new_zeros([1])]).to(device=device, dtype=dtype)


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
    ``options`` go to :class:`deis_fast.Sampler` (``pfdiff=(k, h)``, ``eta``, ``lower_order_final``,
    ``generator`` is not one: stochastic methods draw from torch's global generator unless
    ``generator=`` is given here).
    """
    generator = options.pop("generator", None)
    s = _sigmas_to_numpy(sigmas)
    extra_args = dict(extra_args or {})
    to_zero = s[-1] == 0.0
    positive = s[s > 0]
    sched, key = _schedule_for(model_type, s, positive)
    name = "ddim" if method == "pfdiff" else method
    spec = get_method(name)
    # Runge-Kutta stages cannot be evaluated at sigma = 0: integrate to the last positive sigma, then
    # take k-diffusion's final Euler step (x <- denoised) with one more call
    split_final = to_zero and spec.family == "rk"
    grid = s[:-1] if split_final else s
    last: dict[str, torch.Tensor] = {}

    def denoiser(xx: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        out = model(xx, sigma, **kw)
        last["denoised"] = out
        return out

    is_pf = method == "pfdiff" or options.get("pfdiff") is not None
    nfe = _pfdiff_nfe(len(grid) - 1, options.get("pfdiff"), method) if is_pf else None
    sampler = Sampler(denoiser, sched, method, nfe, {key: [float(v) for v in grid]}, prediction="x0",
                      progress=disable is not True, **options)
    evals = sampler.plan.evals
    cb = None
    if callback is not None:
        def cb(info: dict) -> None:
            k = max(info["i"] - 1, 0)
            sig = float(evals[k].model_t)
            callback({"x": info["x"], "i": k, "sigma": sig, "sigma_hat": sig, "denoised": last.get("denoised")})
    out = sampler(x, generator=generator, callback=cb, **extra_args)
    if split_final:
        sig = float(s[-2])
        out = model(out, out.new_full((out.shape[0],), sig), **extra_args)
        if callback is not None:
            callback({"x": out, "i": len(evals), "sigma": sig, "sigma_hat": sig, "denoised": out})
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


def _pfdiff_nfe(intervals: int, kh: Any, method: str) -> int:
    k, _ = (2, 1) if kh is None else tuple(int(v) for v in kh)
    if (intervals + k) % (k + 1):
        lo = max((intervals + k) // (k + 1), 1)
        raise ValueError(f"PFDiff with k={k} needs len(sigmas) - 1 = N*{k + 1} - {k} steps for N network calls; "
                         f"got {intervals} steps. Use {lo * (k + 1) - k} or {(lo + 1) * (k + 1) - k} steps "
                         f"(get_sigmas_karras(n) gives n steps when it ends in 0)")
    return (intervals + k) // (k + 1)


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
