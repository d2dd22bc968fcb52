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

import warnings
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..core.grids import ays_sigmas, kl_optimal_sigmas, linear_quadratic_fractions
from ..core.plan import Eval
from ..sampler import Sampler
from ..core.schedules import FlowSchedule, Schedule, VESchedule, VPSchedule
from ..solvers import PlanOptions, default_method, nfe_for_intervals, resolve
from ..solvers.pfdiff import check_kh

__all__ = ["sample_deis_fast", "sample_deis", "sample_deis_logrho", "sample_ipndm", "sample_ipndm_v",
           "sample_dpmpp_deis", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_unipc",
           "sample_rho_rk", "sample_pfdiff", "BrownianTreeNoiseSampler", "vp_schedule_from_sigmas", "get_sigmas_karras", "get_sigmas_ays", "get_sigmas_kl_optimal",
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
    s = _to_numpy(sigmas)
    if s.size == 0:
        raise ValueError("sigmas is empty; it needs at least 2 values (one step)")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("sigmas must be finite and >= 0")
    if np.any(np.diff(s) >= 0):
        raise ValueError("sigmas must be strictly decreasing (noise to data)")
    return s


def sample_deis_fast(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any,
                     extra_args: Mapping[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                     disable: bool | None = None, method: str | None = None, model_type: str = "eps",
                     schedule: Schedule | None = None, pfdiff_grid: str = "given", **options: Any) -> torch.Tensor:
    """Any deis_fast method on a k-diffusion denoiser over the given ``sigmas``.

    ``model_type``: "eps" (k-diffusion's VE convention, x = x0 + sigma noise) or "const" (ComfyUI's CONST model
    sampling of flow models: sigma in [0, 1], x = sigma noise + (1 - sigma) x0; sigmas may start at 1).
    ``schedule``: the model's own VP schedule (a :class:`~deis_fast.VPSchedule` whose rho = sigma / alpha is the
    model's sigma, e.g. :func:`vp_schedule_from_sigmas` of a DDPM-trained model's sigma table): the solver then
    runs in that schedule's time, so tAB is a polynomial in the model's own t (x stays at k-diffusion's scale in
    and out). Default: solve in sigma (a VE schedule with t = sigma).
    ``options`` go to :class:`deis_fast.Sampler` (``pfdiff=(k, h)``, ``eta``, ``s_noise``, ``variant``,
    ``corrector``, ``lower_order_final``). ``lower_order_final`` defaults to "auto": on for the log-rho / lambda
    methods with 3 history points (logrho3, dpmpp3, dpmpp_3m, unipc3) when the sigmas end in 0 after a small
    last positive sigma (<= 5% of the first), as ComfyUI's uni_pc does; off otherwise.

    Noise of stochastic methods: ``noise_sampler(sigma, sigma_next)`` if given (called once per noisy step in
    order, as in k-diffusion), else ``generator=`` (one, or one per sample), else ``extra_args["seed"]``
    (ComfyUI passes it): a Brownian tree over [sigma_min, sigma_max] for the SDE methods (as ComfyUI's
    dpmpp_2m_sde / dpmpp_3m_sde build it, so the same seed gives the same noise), a ``torch.Generator`` seeded
    with it for ddim_eta; torch's global generator when none of these is given.

    ``callback`` follows k-diffusion's (and ComfyUI's) convention: once per step, right after that step's first
    network call, with ``x`` the state *before* the step, ``denoised`` the call's output, ``i`` the step index and
    ``sigma`` the step's start. PFDiff reports once per network call (with ``pfdiff_grid="given"``, ``i`` is the last
    base-grid step the call's step covers, so that a progress bar over len(sigmas) - 1 steps ends full). ``pfdiff_grid``: "given" (the sigmas are
    PFDiff's base grid: N(k+1) - k steps for N calls) or "resample" (len(sigmas) - 1 is the number of calls N, as
    a KSampler's steps; the base grid is interpolated from the sigmas).
    A final sigma = 0 is reached as k-diffusion's samplers reach it, by a first-order step (x <- the last denoised
    output; ``denoise_to_zero=False`` keeps the full order for tAB / rhoAB / iPNDM, whose polynomial then
    extrapolates over the whole last interval). A one-step list ``[sigma, 0]`` is one first-order step to the
    denoised output; a list of one sigma returns
    ``x`` unchanged (as k-diffusion's samplers do).
    ``tuned``: a tuned file (:mod:`deis_fast.tuning`) for this model's schedule as solved here (the VE view of these
    sigmas, ``schedule=`` a VP model's own schedule, CONST's flow time): its grid or plan replaces the sigmas between
    their ends, and ``method`` defaults to the file's; another schedule, method or NFE is refused.
    ``method`` defaults to "tab3" ("rhoabm2" for model_type="const", flow models).
    """
    generator = options.pop("generator", None)
    tuned = options.pop("tuned", None)
    if method is None:  # tab3, or a tuned file's own method and options (its corrector, PFDiff's k and h)
        method, options = _default_method(tuned, options, model_type)
    noise_sampler = options.pop("noise_sampler", None)
    extra_args = dict(extra_args or {})
    s = _sigmas_to_numpy(sigmas)
    if s.size < 2:
        return x
    n_steps = s.size - 1   # the caller's steps: what the console bar counts (k-diffusion's trange over the sigmas)
    spec, plan_opts = resolve(method, PlanOptions(pfdiff=options.get("pfdiff")))
    if plan_opts.pfdiff is not None:
        s = _pfdiff_sigmas(s, plan_opts, pfdiff_grid, model_type)
    kind = _Kind(model_type, s, schedule)
    options = _auto_lower_order_final(options, spec, plan_opts, s)
    if s[-1] == 0.0 and plan_opts.pfdiff is None and spec.multistep_options:
        # k-diffusion's last step into sigma = 0: x <- denoised; rhoABM keeps its full order there (its
        # polynomial in rho is exact at rho = 0; on flow models 1.2-1.6x lower error at 8-20 steps, RESULTS.md)
        options.setdefault("denoise_to_zero", not spec.name.startswith("rhoabm"))
    # Runge-Kutta stages cannot be evaluated at sigma = 0: integrate to the last positive sigma, then
    # take k-diffusion's final Euler step (x <- denoised) with one more call
    split_final = s[-1] == 0.0 and spec.family == "rk"
    grid = s[:-1] if split_final else s
    prediction = "x0"   # a k-diffusion denoiser returns x0
    if tuned is not None:  # deis_fast.tuning: the tuned plan replaces the sigmas between their ends
        grid, options = _tuned_grid(tuned, kind, method, plan_opts, grid, options)
        prediction = _tuned_prediction(tuned, options["plan"], kind)
        split_final = False
    seed = extra_args.get("seed")
    if "seed" in extra_args and not _takes_seed(model):
        del extra_args["seed"]   # the noise's seed, not the network's: only a denoiser that names it gets it (ComfyUI's)
    if generator is None and noise_sampler is None and seed is not None and spec.family in ("sde", "stochastic"):
        if spec.family == "sde" and plan_opts.pfdiff is None:
            noise_sampler = BrownianTreeNoiseSampler(x, float(s[s > 0].min()), float(s.max()), seed=seed)
        else:
            generator = torch.Generator(device=x.device).manual_seed(int(seed))
    x_in = kind.to_state(x, float(s[0]))
    bar = _step_bar(method, plan_opts, options, n_steps, disable)
    if grid.size < 2:  # only the final Euler step of a Runge-Kutta method is left
        out = x_in
    else:
        sampler, steps = _sampler_for(model, kind, method, grid, plan_opts, disable, options, callback, x_in,
                                      resampled=pfdiff_grid == "resample", bar=bar, prediction=prediction)
        step_noise = None
        if noise_sampler is not None and sampler.plan.num_noise:
            if plan_opts.pfdiff is not None:
                raise ValueError("noise_sampler is not supported with PFDiff; pass generator= instead")
            step_noise = torch.stack(_draw_from_noise_sampler(sampler.plan, grid, noise_sampler)).to(x.device,
                                                                                                     x.dtype)
        out = sampler(x_in, generator=generator, step_noise=step_noise,
                      callback=steps.track if callback is not None else None, **extra_args)
    out = kind.from_state(out, float(grid[-1]))
    if split_final:
        sig = float(s[-2])
        denoised = model(out, out.new_full((out.shape[0],), sig), **extra_args)
        if callback is not None:
            callback({"x": out, "i": len(grid) - 1, "sigma": sig, "sigma_hat": sig, "denoised": denoised})
        out = denoised
    bar.update(bar.total - bar.n)
    bar.close()
    return out


def _step_bar(method: str, plan_opts: PlanOptions, options: Mapping[str, Any], steps: int, disable: bool | None):
    """The console bar of one k-diffusion call: the method as configured (``tab3+corrector``, ``pfdiff21:ddim``) over
    the caller's steps (a 10-step rho_heun counts 10, not its 19 network calls); ``disable=True`` hides it."""
    from tqdm.auto import tqdm

    from ..sampler import plan_label
    label = plan_label(method, plan_opts) + ("+corrector" if options.get("corrector") else "")
    return tqdm(total=steps, desc=f"deis_fast {label}", unit="step", disable=disable is True, leave=False)


def _takes_seed(model: Callable[..., Any]) -> bool:
    """Whether ``model`` names a ``seed`` parameter (ComfyUI's denoiser does); a plain k-diffusion denoiser, which
    forwards its ``**kwargs`` to the network, does not get ComfyUI's ``extra_args["seed"]``."""
    import inspect
    try:
        p = inspect.signature(model).parameters.get("seed")
    except (TypeError, ValueError):
        return False
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def vp_schedule_from_sigmas(sigmas: Any, name: str = "sigmas") -> VPSchedule:
    """The discrete VP schedule of a DDPM-trained model from its table of sigmas (sigma_i = sqrt((1 - abar_i) /
    abar_i) at training step i, increasing: ComfyUI's ``ModelSamplingDiscrete.sigmas``, k-diffusion's
    ``DiscreteSchedule.sigmas``); its time is the training step and its rho the model's sigma."""
    sig = _to_numpy(sigmas)
    return VPSchedule.from_alphas_cumprod(1.0 / (1.0 + sig * sig), name=name)


def _to_numpy(v: Any) -> np.ndarray:
    return (v.detach().to("cpu", torch.float64).numpy() if isinstance(v, torch.Tensor)
            else np.asarray(v, dtype=np.float64)).reshape(-1)


class _Kind:
    """How k-diffusion's (x, sigma) map to the solver's schedule, time and state (x_solver = alpha * x for VP)."""

    def __init__(self, model_type: str, s: np.ndarray, schedule: Schedule | None):
        positive = s[s > 0]
        self.vp: VPSchedule | None = None
        self.given: FlowSchedule | None = None
        self.const = model_type == "const"
        if model_type == "const":
            if s[0] > 1.0:
                raise ValueError(f"CONST (flow) sigmas lie in [0, 1], got sigmas[0] = {s[0]}; for VE denoisers pass "
                                 "model_type='eps'")
            if schedule is not None and not isinstance(schedule, FlowSchedule):
                raise ValueError(f"model_type='const' is a flow model: schedule must be None or a FlowSchedule, got "
                                 f"{schedule!r}")
            # a FlowSchedule's shift only moves named grids: the sigmas here are the grid itself (a tuned file is
            # still checked against the model's own shift: ``given``)
            self.schedule, self.key = FlowSchedule(time_scale=1.0), "t"
            self.given = None if schedule is None else schedule.with_time_scale(1.0)
        elif model_type != "eps":
            raise ValueError(f"model_type must be 'eps' (VE, x = x0 + sigma noise) or 'const' (flow: x = sigma "
                             f"noise + (1 - sigma) x0), got {model_type!r}")
        elif schedule is None or (isinstance(schedule, VESchedule) and not schedule.geometric):
            # t = sigma; a one-step [sigma, 0] list still needs sigma_min < sigma_max: any value below sigma works
            lo = float(positive[-1]) if positive.size > 1 else float(positive[0]) / 2
            self.schedule, self.key = VESchedule(lo, float(s[0])), "sigma"
        elif isinstance(schedule, VPSchedule):
            self.schedule, self.key, self.vp = schedule, "rho", schedule
            if s[0] > schedule.rho_max * (1 + 1e-5):
                raise ValueError(f"sigmas[0] = {s[0]:.6g} lies above the schedule's largest sigma "
                                 f"{schedule.rho_max:.6g}")
        else:
            raise ValueError(f"schedule must be None (solve in sigma) or the model's VPSchedule, got {schedule!r}")

    def alpha(self, sigma: float) -> float:
        return 1.0 if self.vp is None else float(1.0 / np.sqrt(1.0 + sigma * sigma))

    def sigma_of_t(self, t: float) -> float:
        return t if self.vp is None else float(self.vp.rho(t))

    def to_state(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x if self.vp is None else x * self.alpha(sigma)

    def from_state(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x if self.vp is None else x / self.alpha(sigma)


class _Steps:
    """k-diffusion's callback from inside the denoiser: at each step's first network call, the state before the
    step (tracked through the executor's per-step callback, which reports the state after each step) and the
    call's output."""

    def __init__(self, callback, kind: _Kind, x_in: torch.Tensor, starts: dict[int, tuple[int, float]], bar=None):
        self.callback, self.kind, self.starts, self.bar = callback, kind, starts, bar
        self.state = x_in
        self.calls = 0

    def track(self, info: dict) -> None:
        self.state = info["x"]

    def report(self, denoised: torch.Tensor) -> None:
        k = self.calls
        self.calls += 1
        if k in self.starts and self.bar is not None and self.starts[k][0] > self.bar.n:
            self.bar.update(self.starts[k][0] - self.bar.n)   # the steps before this one are done
        if self.callback is None or k not in self.starts:
            return
        i, sig = self.starts[k]
        # a copy: the solver overwrites its state slots in place, k-diffusion hands out fresh tensors
        x = self.state.clone() if self.kind.vp is None else self.state / self.kind.alpha(sig)
        self.callback({"x": x, "i": i, "sigma": sig, "sigma_hat": sig, "denoised": denoised})


def _sampler_for(model, kind: _Kind, method: str, grid: np.ndarray, plan_opts: PlanOptions, disable, options,
                 callback, x_in, resampled: bool = False, bar=None, prediction: str = "x0") -> tuple[Sampler, _Steps]:
    """The deis_fast Sampler of a k-diffusion call and the callback helper that reports its steps; ``prediction``:
    what the solver is handed, the denoiser's x0 converted at the sigma the network ran at (:func:`_from_denoised`)."""
    box: list[_Steps] = []
    vp = kind.vp
    # the caller's own sigma values at the grid's times (not rho(t_from_rho(sigma)), one rounding away): a model
    # that rounds sigma to a training step (ComfyUI's discrete models) sees exactly the sigmas it was given
    # (a float32 sigma_max a hair above the schedule's largest rho is solved at t_max: grid_s is clipped to it)
    grid_s = grid if vp is None else np.minimum(grid, vp.rho_max)
    exact = {} if vp is None else dict(zip(vp.model_time(vp.t_from_rho(grid_s)).tolist(), grid.tolist()))

    def denoiser(xx: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        if vp is None:
            sig = t
            out = model(xx, t, **kw)
        else:  # the solver's VP state and time -> k-diffusion's x = x_vp / alpha and sigma = rho(t)
            mt = float(t.reshape(-1)[0])
            sig = exact.get(mt)
            sig = float(vp.rho(vp.t_from_model_time(mt))) if sig is None else sig
            out = model(xx * (1.0 / kind.alpha(sig)), torch.full(t.shape, sig, dtype=xx.dtype, device=xx.device),
                        **kw)
        box[0].report(out)
        return out if prediction == "x0" else _from_denoised(prediction, kind, xx, out, sig)

    nfe = _nfe_for_sigmas(len(grid) - 1, method, plan_opts)
    # k-diffusion sigmas end where the caller wants to stop (ComfyUI splits a run across samplers), so a CONST
    # grid that ends above sigma = 0 is meant: say so with t_end (deis_fast refuses a flow grid that stops short)
    t_end = float(grid[-1]) if kind.const else None
    sampler = Sampler(denoiser, kind.schedule, method, nfe, {kind.key: [float(v) for v in grid_s]}, prediction=prediction,
                      t_end=t_end, progress=False,   # the caller's bar counts steps (_step_bar)
                      time_dtype=torch.float64 if vp is not None else None, **options)
    evals = sampler.plan.evals
    if plan_opts.pfdiff is None:
        stages = resolve(method, plan_opts)[0].stages
        starts = {k * stages: (k, float(grid[k])) for k in range(len(evals) // stages)}
    elif resampled:  # one report per call (the caller's sigmas have one step per call), at the call's sigma
        starts = {k: (k, kind.sigma_of_t(float(op.t))) for k, op in enumerate(evals)}
    else:  # one report per call, i = the last base-grid step it covers: a bar over len(sigmas) - 1 reaches its end
        kk = check_kh(plan_opts.pfdiff)[0]
        starts = {k: (k * (kk + 1), kind.sigma_of_t(float(op.t))) for k, op in enumerate(evals)}
    box.append(_Steps(callback, kind, x_in, starts, bar))
    return sampler, box[0]


def _default_method(tuned: Any, options: dict, model_type: str = "eps") -> tuple[str, dict]:
    if tuned is None:
        return default_method(FlowSchedule() if model_type == "const" else None), options
    from ..tuning.files import load_tuned
    t = load_tuned(tuned)
    return t.method, {**t.plan_options, **options}


def _tuned_grid(tuned: Any, kind: _Kind, method: str, plan_opts: PlanOptions, grid: np.ndarray,
                options: dict) -> tuple[np.ndarray, dict]:
    """The sigmas of a tuned file's plan (checked against this call's schedule, method and NFE) and the options
    that run it: the plan alone, with the noise options the caller gave."""
    from ..tuning.files import TunedMismatchError, k_diffusion_plan
    stages = resolve(method, plan_opts)[0].stages
    nfe = _nfe_for_sigmas(len(grid) - 1, method, plan_opts) or (len(grid) - 1) * stages
    sched = kind.given if kind.const and kind.given is not None else kind.schedule
    kind.schedule, plan = k_diffusion_plan(tuned, sched, method, nfe)
    kept = {k: v for k, v in options.items() if k in ("eta", "s_noise")}
    sig = np.asarray([kind.sigma_of_t(float(t)) for t in plan.times])
    # the tuned plan runs its whole grid: sigmas that start below it (img2img, denoise < 1) or stop above its end
    # (a split run) would be solved from the wrong noise level
    if not np.isclose(grid[0], sig[0], rtol=1e-5, atol=0) or not (
            grid[-1] == 0.0 or np.isclose(grid[-1], sig[-1], rtol=1e-5, atol=0)):
        raise TunedMismatchError(
            f"the tuned plan runs from sigma {sig[0]:.6g} to {sig[-1]:.6g}; these sigmas run from {grid[0]:.6g} to "
            f"{grid[-1]:.6g}: a tuned file samples the whole grid (no img2img start, denoise < 1 or split run)")
    return sig, {**kept, "plan": plan}


def _tuned_prediction(tuned: Any, plan: Any, kind: _Kind) -> str:
    """The prediction a tuned plan runs on: "x0" (the denoiser's own), unless a learned plan moved its network times
    off its solver times; then the file's prediction (the network's output was converted to the solver's target at
    the solver's time when it was tuned, so it is here too)."""
    from ..tuning.files import load_tuned
    sched = kind.schedule
    if all(np.isclose(op.model_t, float(sched.model_time(op.t)), rtol=1e-9, atol=1e-12) for op in plan.evals):
        return "x0"
    from ..core.adapters import normalize_prediction
    pred = normalize_prediction(load_tuned(tuned).prediction)
    if pred not in ("eps", "x0", "flow", "v"):
        raise ValueError(f"a learned plan tuned on a {pred!r} prediction cannot run on a k-diffusion denoiser; tune "
                         "it on the model's eps, x0, v or flow output")
    return pred


def _from_denoised(prediction: str, kind: _Kind, x: torch.Tensor, d: torch.Tensor, sig: Any) -> torch.Tensor:
    """The network's ``prediction`` ("eps", "flow", "v") at the sigma it ran at, from the denoiser's x0 ``d`` and
    the solver's state ``x`` (CONST: x = (1 - sigma) x0 + sigma eps; VP: x = alpha (x0 + sigma eps); VE: x = x0 +
    sigma eps)."""
    if isinstance(sig, torch.Tensor):
        sig = sig.to(torch.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    if kind.const:
        a, s = 1.0 - sig, sig
    elif kind.vp is not None:
        a = 1.0 / (1.0 + sig * sig) ** 0.5
        a, s = a, sig * a
    else:
        a, s = 1.0, sig
    xd, dd = x.to(torch.float64), d.to(torch.float64)
    eps = (xd - a * dd) / s
    out = {"eps": eps, "flow": eps - dd, "v": a * eps - s * dd}[prediction]
    return out.to(x.dtype)


def _auto_lower_order_final(options: dict, spec, plan_opts: PlanOptions, s: np.ndarray) -> dict:
    """``lower_order_final="auto"`` (the default here) resolved to True / False: see :func:`sample_deis_fast`."""
    lof = options.get("lower_order_final", "auto")
    if isinstance(lof, str):
        if lof != "auto":
            raise ValueError(f"lower_order_final must be True, False or 'auto', got {lof!r}")
        positive = s[s > 0]
        lof = bool(plan_opts.pfdiff is None and spec.multistep_options and spec.family != "sde"
                   and spec.points >= 3 and spec.variable in ("lambda", "logrho") and s[-1] == 0.0
                   and positive.size >= 2 and positive[-1] <= 0.05 * s[0])
    out = {k: v for k, v in options.items() if k != "lower_order_final"}
    return {**out, "lower_order_final": True} if lof else out


def _pfdiff_sigmas(s: np.ndarray, o: PlanOptions, pfdiff_grid: str, model_type: str) -> np.ndarray:
    """PFDiff's base grid: the sigmas as given, or interpolated to N(k+1) - k steps for N = len(sigmas) - 1
    calls ("resample": linear in the step index, in t for CONST sigmas, in sigma^(1/7) otherwise; a final 0 stays
    one step after the last positive sigma)."""
    if pfdiff_grid == "given":
        return s
    if pfdiff_grid != "resample":
        raise ValueError(f"pfdiff_grid must be 'given' or 'resample', got {pfdiff_grid!r}")
    k = check_kh(o.pfdiff)[0]
    m = (s.size - 1) * (k + 1) - k
    # a final 0 stays one step from the last positive sigma (below it a VP model has no time)
    zero = s[-1] == 0.0 and s.size > 2
    pos = s[:-1] if zero else s
    p = 1.0 if model_type == "const" else 1.0 / 7.0
    out = np.interp(np.linspace(0.0, 1.0, m + 1 - zero), np.linspace(0.0, 1.0, pos.size), pos ** p) ** (1.0 / p)
    out[0], out[-1] = pos[0], pos[-1]
    return np.append(out, 0.0) if zero else out


class BrownianTreeNoiseSampler:
    """k-diffusion's Brownian-tree noise sampler (``torchsde.BrownianTree`` over [sigma_min, sigma_max], entropy =
    the seed, kept on the CPU): ``ns(sigma, sigma_next)`` is the tree's increment over that interval divided by
    sqrt|sigma_next - sigma|. A list of seeds makes one tree per sample. Needs torchsde."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: Any = None):
        try:
            import torchsde
        except ImportError as e:
            raise ImportError("the Brownian-tree noise of dpmpp_*_sde from a seed needs torchsde (pip install "
                              "torchsde), or pass generator= / noise_sampler=") from e
        t0, t1 = torch.as_tensor(float(sigma_min)), torch.as_tensor(float(sigma_max))
        self.batched = isinstance(seed, (list, tuple))
        if seed is None:
            seeds = [int(torch.randint(0, 2 ** 63 - 1, ()).item())]
        elif self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"one seed per sample: batch {x.shape[0]}, got {len(seed)} seeds")
            seeds = [int(v) for v in seed]
        else:
            seeds = [int(seed)]
        w0 = torch.zeros_like(x[0] if self.batched else x).detach().cpu()
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=v) for v in seeds]
        self.device, self.dtype = x.device, x.dtype

    def __call__(self, sigma: Any, sigma_next: Any) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        t0, t1 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
        with warnings.catch_warnings():  # float32 round-off at the tree's ends ("Should have ta>=t0"): harmless
            warnings.filterwarnings("ignore", "Should have", UserWarning)
            w = torch.stack([tree(t0, t1) for tree in self.trees]) * sign
        w = w if self.batched else w[0]
        return w.to(self.device, self.dtype) / abs(b - a) ** 0.5


def _draw_from_noise_sampler(plan, sigmas: np.ndarray, noise_sampler: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
    """One ``noise_sampler(sigma_i, sigma_{i+1})`` draw per noisy Combine of a one-stage plan, in plan order."""
    draws, step = [], -1
    for op in plan.ops:
        if isinstance(op, Eval):
            step += 1
        elif op.noise_index >= 0:
            lo, hi = (torch.tensor(float(sigmas[step + j]), dtype=torch.float64) for j in (0, 1))
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
