"""``DEISFastScheduler``: every deis_fast method as a diffusers scheduler.

    from deis_fast.integrations.diffusers import DEISFastScheduler
    pipe.scheduler = DEISFastScheduler.from_config(pipe.scheduler.config, method="tab3")
    images = pipe(num_inference_steps=10).images          # 10 network evaluations

How it works. ``set_timesteps(n)`` compiles a deis_fast :class:`~deis_fast.Plan` with ``n`` network
evaluations (Evals) and sets ``timesteps`` to the model times of those Evals, in order. The pipeline
then calls the network once per timestep and hands the output to ``step()``; ``step()`` receives the
output of Eval k, runs the plan's Combines up to the next Eval (one fused ``deis_fast.ops.combine``
each, python-float coefficients, no host sync) and returns the state Eval k+1 is called on — the
solver state, or for PFDiff the springboard, or for Runge-Kutta methods a stage — and after the last
Eval the final sample. The model-output history lives in the scheduler's slots. So every plan works,
multistage and PFDiff included, with NFE = ``num_inference_steps`` (a multiple of the stage count for
Runge-Kutta methods).

Grids: ``grid="auto"`` follows diffusers' ``timestep_spacing`` (plus a final step to t = 0) for the
``logrho*`` methods — ``method="logrho3"`` then reproduces ``DEISMultistepScheduler(solver_order=3)`` —
and uses deis_fast's recommended grid for every other method. ``grid="diffusers"`` forces the
diffusers spacing; ``"time_quadratic"``, ``"logsnr"``, ``"karras"``, ``"time_uniform"`` or a list of
model times pick a deis_fast grid. ``timestep_type``: ``"int"`` rounds a named grid to the training
timesteps, ``"float"`` keeps exact float times (UNets accept float timesteps), ``"auto"`` rounds when
rounding keeps every step distinct and falls back to float times otherwise.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Sequence

import numpy as np
import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError("deis_fast.integrations.diffusers needs diffusers: pip install diffusers") from e

from .. import ops
from ..grids import GRIDS
from ..models import _to_eps, _to_x0, normalize_prediction
from ..plan import Combine, Eval, Plan
from ..sampler import build_plan, default_grid
from ..schedules import schedule_from_diffusers_config
from ..solvers import get_method

__all__ = ["DEISFastScheduler"]

_TIMESTEP_TYPES = ("auto", "int", "float")
_SPACINGS = ("linspace", "leading", "trailing")


class DEISFastScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any deis_fast method (tAB/ρAB/log-ρ DEIS, iPNDM, DPM-Solver++-style,
    ρRK, stochastic DDIM, PFDiff) on a discrete VP (DDPM-beta) model.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training noise
            schedule, as in every diffusers scheduler (taken over by ``from_config``).
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        method: a deis_fast method name (``deis_fast.METHODS``), e.g. ``"tab3"``, ``"logrho3"``,
            ``"dpmpp3"``, ``"ipndm4"``, ``"pfdiff"``, ``"rho_heun"``.
        grid: ``"auto"``, ``"diffusers"``, a deis_fast grid name or a list of model times (see module doc).
        timestep_type: ``"auto"``, ``"int"`` or ``"float"`` (see module doc).
        lower_order_final: use lower orders on the last steps when there are fewer than 15 (diffusers'
            rule); ``None`` = on for the diffusers grid, off for deis_fast grids.
        pfdiff: ``(k, h)`` for PFDiff (``method="pfdiff"`` defaults to (2, 1) on DDIM; with another
            first-order method it wraps that method).
        eta: noise level of ``method="ddim_eta"`` (1 = ancestral DDPM).
        timestep_spacing, steps_offset: diffusers' spacing of the ``grid="diffusers"`` timesteps.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 prediction_type: str = "epsilon", method: str = "tab3", grid: str | Sequence[float] = "auto",
                 timestep_type: str = "auto", lower_order_final: bool | None = None,
                 pfdiff: Sequence[int] | None = None, eta: float = 1.0, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, **kwargs: Any):
        if kwargs:
            _refuse_schedule_changing_keys(kwargs)
            _warn_ignored(kwargs, stacklevel=4)
        if isinstance(trained_betas, np.ndarray):
            self.register_to_config(trained_betas=trained_betas.tolist())
        self.schedule = schedule_from_diffusers_config(dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas))
        self.prediction = normalize_prediction(prediction_type)
        if self.prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon', 'sample' or "
                             "'v_prediction'")
        if method != "pfdiff":
            get_method(method)  # validates the name with a helpful message
        if timestep_type not in _TIMESTEP_TYPES:
            raise ValueError(f"timestep_type must be one of {_TIMESTEP_TYPES}, got {timestep_type!r}")
        if timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {timestep_spacing!r}")
        if isinstance(grid, str) and grid not in ("auto", "diffusers") + GRIDS:
            raise ValueError(f"grid must be 'auto', 'diffusers', one of {GRIDS} or a list of model times, got {grid!r}")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.plan: Plan | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._segments: list[tuple[Eval, tuple[Combine, ...]]] = []
        self._slots: list[torch.Tensor | None] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # --- config carried over from other schedulers ----------------------------------
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from any diffusers scheduler config; keys this scheduler does not use (e.g. DEIS'
        ``solver_order``) are dropped with one warning."""
        if config is not None and hasattr(config, "config") and not isinstance(config, dict):
            config = config.config  # a scheduler instance
        cfg = dict(config or {})
        source_class = cfg.get("_class_name")
        _refuse_ve_config(cfg)  # judged on the whole config: its sigma range may be all defaults
        # as diffusers' own from_config: keys the source scheduler only had at their defaults are not carried
        # over (a default DDPMScheduler's timestep_spacing="leading" must not replace ours)
        for k in cfg.pop("_use_default_values", None) or ():
            cfg.pop(k, None)
        _refuse_schedule_changing_keys(cfg)
        ours = cfg.get("_class_name") == cls.__name__ or "method" in cfg  # in-memory configs carry no _class_name
        if not ours and "lower_order_final" not in kwargs:
            # other schedulers default it to True; for deis_fast grids it costs accuracy (tab3 at NFE 10 on the
            # yardstick: 0.0117 -> 0.0179), so keep our default (on only for the diffusers grid)
            cfg.pop("lower_order_final", None)
        clashing = {}
        if not ours and cfg.get("timestep_type") not in (None,) + _TIMESTEP_TYPES:
            clashing["timestep_type"] = cfg.pop("timestep_type")  # EulerDiscrete's key, another meaning
        if cfg.get("use_karras_sigmas") and "grid" not in kwargs:
            kwargs["grid"] = "karras"  # keep the user's spacing choice; the key itself is then consumed
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        ignored = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in known and k not in kwargs}
        ignored.update(clashing)
        cfg = {k: v for k, v in cfg.items() if k in known}
        ignored = _set_by_user(ignored, source_class, dict(config or {}))
        if ignored:
            _warn_ignored(ignored, stacklevel=3, config=dict(config or {}))
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # --- diffusers scheduler interface -----------------------------------------------
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[float] | None = None, **kwargs: Any) -> None:
        """Compile the plan for ``num_inference_steps`` network evaluations and set ``timesteps``
        (the model times of the plan's Evals). ``timesteps`` may instead give the model times of the
        solver grid explicitly (then NFE = len(timesteps) x stages, with a final step to t = 0)."""
        if timesteps is not None:
            grid: Any = [float(t) for t in timesteps] + [0.0]
            n = None
        else:
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            n = int(num_inference_steps)
            grid = None
        self.plan = self._build(n, grid)
        evals = self.plan.evals
        if not self.plan.ops or not isinstance(self.plan.ops[0], Eval):
            raise RuntimeError("internal: a plan must start with an Eval")  # never happens for deis_fast plans
        segs: list[tuple[Eval, tuple[Combine, ...]]] = []
        for op in self.plan.ops:
            if isinstance(op, Eval):
                segs.append((op, ()))
            else:
                segs[-1] = (segs[-1][0], segs[-1][1] + (op,))
        self._segments = segs
        mt = np.array([e.model_t for e in evals], dtype=np.float64)
        if np.all(np.abs(mt - np.round(mt)) < 1e-6):
            ts = torch.from_numpy(np.round(mt).astype(np.int64))
        else:
            # float64 keeps the exact model times the coefficients assume (UNets cast their time input);
            # mps has no float64
            mps = device is not None and torch.device(device).type == "mps"
            ts = torch.from_numpy(mt.astype(np.float32 if mps else np.float64))
        self.timesteps = ts.to(device) if device is not None else ts
        self.num_inference_steps = len(evals)
        self._slots = [None] * self.plan.num_slots
        self._step_index = None
        self._begin_index = None

    def _build(self, n: int | None, grid: Any) -> Plan:
        cfg = self.config
        method = cfg.method
        spec_name = "ddim" if method == "pfdiff" else get_method(method).name
        spec = get_method(spec_name)
        pf = tuple(cfg.pfdiff) if cfg.pfdiff is not None else None
        if pf is not None and method != "pfdiff" and not spec.first_order:
            raise ValueError(f"pfdiff={pf} wraps a first-order method; {method!r} is not one")
        is_pf = method == "pfdiff" or pf is not None
        if grid is None:
            grid = cfg.grid
            if grid == "auto":
                grid = "diffusers" if spec_name.startswith("logrho") and not is_pf else default_grid(self.schedule, spec_name)
            if grid == "diffusers":
                if is_pf:
                    raise ValueError("grid='diffusers' is not available with PFDiff (it needs its own grid of "
                                     "nfe*(k+1)-k intervals); use a named grid")
                if n % spec.stages:
                    raise ValueError(f"method {method!r} uses {spec.stages} NFE per step; num_inference_steps={n} "
                                     f"is not a multiple of {spec.stages}")
                grid = [float(t) for t in self._diffusers_timesteps(n // spec.stages)] + [0.0]
                n = None
            elif not isinstance(grid, str):
                grid = [float(t) for t in grid]
                n = None
        diffusers_like = isinstance(grid, list)
        lof = cfg.lower_order_final
        if lof is None:
            lof = diffusers_like
        steps = (len(grid) - 1) if isinstance(grid, list) else (n // spec.stages if n else 0)
        lof = bool(lof) and steps < 15 and spec.multistep_options and not is_pf
        stochastic = spec.family == "stochastic"  # eta is the noise level of ddim_eta (also as a PFDiff base)
        kw = dict(eta=float(cfg.eta) if stochastic else None, lower_order_final=lof, pfdiff=pf)
        want_int = cfg.timestep_type != "float" and isinstance(grid, str) and self.schedule.discrete
        if want_int:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # duplicates after rounding: the grid would lose steps
                    plan = build_plan(self.schedule, method, n, grid, integer_timesteps=True, **kw)
                return plan
            except (ValueError, UserWarning) as e:
                if cfg.timestep_type == "int":
                    raise ValueError(f"timestep_type='int': rounding the {grid!r} grid of {n} NFE to integer "
                                     f"timesteps fails ({e}); use timestep_type='float' or 'auto'") from None
        return build_plan(self.schedule, method, n, grid, **kw)

    def _diffusers_timesteps(self, n: int) -> np.ndarray:
        """diffusers' integer timesteps for ``n`` steps under ``timestep_spacing`` (as DEIS/DPM-Solver do)."""
        cfg = self.config
        N = cfg.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, N - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = N // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        else:
            ts = np.arange(N, 0, -N / n).round().astype(np.int64) - 1
        if len(np.unique(ts)) != len(ts) or ts[-1] <= 0:
            raise ValueError(f"{n} steps with timestep_spacing={cfg.timestep_spacing!r} give repeated or zero "
                             f"timesteps; use fewer steps or a deis_fast grid")
        return ts

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: int | float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True, generator: torch.Generator | list[torch.Generator] | None = None,
             **kwargs: Any) -> SchedulerOutput | tuple:
        """Consume the network output of Eval k (called on ``sample`` at ``timestep``) and return the
        input of Eval k+1 (or, after the last Eval, the final sample) as ``prev_sample``.

        ``timestep`` is not inspected (the scheduler keeps its own counter; no host sync). Extra keyword
        arguments that pipelines pass to other schedulers (``eta``, ``use_clipped_model_output``) are ignored;
        ``generator`` feeds the noise of stochastic methods.
        """
        if self.plan is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            self._step_index = self._begin_index or 0
            if self._step_index:
                raise NotImplementedError("DEISFastScheduler starts at the first timestep (multistep history); "
                                          "set_begin_index > 0 (img2img strength) is not supported")
        k = self._step_index
        if k >= len(self._segments):
            raise IndexError(f"step() called {k + 1} times but the plan has {len(self._segments)} network "
                             "evaluations; call set_timesteps again to start a new run")
        ev, combines = self._segments[k]
        slots = self._slots
        if model_output.dtype != sample.dtype or model_output.device != sample.device:
            model_output = model_output.to(device=sample.device, dtype=sample.dtype)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}, the sample {tuple(sample.shape)}")
        slots[ev.src] = sample
        convert = _to_eps if ev.target == "eps" else _to_x0
        a, b = convert(self.prediction, ev.alpha, ev.sigma, True)
        if a == 0.0 and b == 1.0:
            slots[ev.dst] = model_output
        elif a == 0.0:
            slots[ev.dst] = ops.combine([model_output], [b])
        else:
            slots[ev.dst] = ops.combine([sample, model_output], [a, b])
        for c in combines:
            srcs = [slots[s] for s in c.srcs]
            if c.noise_index >= 0:
                z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
                slots[c.dst] = ops.combine(srcs, c.coefs, noise=z, noise_coef=c.noise_coef)
            else:
                slots[c.dst] = ops.combine(srcs, c.coefs)
        k += 1
        self._step_index = k
        if k < len(self._segments):
            prev = slots[self._segments[k][0].src]
        else:
            prev = slots[0]
            self._slots = [None] * len(slots)  # release the history
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t * x0 + sigma_t * noise`` at (possibly fractional) model timesteps."""
        t = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1).numpy()
        alpha = torch.as_tensor(self.schedule.alpha(t), dtype=original_samples.dtype, device=original_samples.device)
        sigma = torch.as_tensor(self.schedule.sigma(t), dtype=original_samples.dtype, device=original_samples.device)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return alpha.reshape(shape) * original_samples + sigma.reshape(shape) * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# keys that, when set, change the noise schedule or the sigma family: ignoring them would sample the wrong
# process silently, so they are refused instead
_SCHEDULE_CHANGING = ("rescale_betas_zero_snr", "use_flow_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                      "use_dynamic_shifting", "thresholding")


def _refuse_schedule_changing_keys(cfg: dict) -> None:
    bad = sorted(k for k in _SCHEDULE_CHANGING if cfg.get(k))
    if bad:
        raise ValueError(f"DEISFastScheduler does not support {', '.join(f'{k}=True' for k in bad)}: it would change "
                         "the noise schedule or the sampling process. Set them to False (or use the original scheduler)")


def _refuse_ve_config(cfg: dict) -> None:
    """A sigma range without betas is a VE / EDM scheduler (ScoreSdeVe, EDMEuler, ...): not a discrete VP one."""
    if cfg.get("sigma_max") is not None and "beta_start" not in cfg and cfg.get("trained_betas") is None:
        name = cfg.get("_class_name", "this scheduler")
        raise ValueError(f"{name}'s config describes a VE / EDM noise schedule (sigma_min={cfg.get('sigma_min')}, "
                         f"sigma_max={cfg['sigma_max']}, no betas); DEISFastScheduler supports discrete VP (DDPM-style "
                         "betas) schedules only. For VE models use deis_fast.sample(..., schedule="
                         "deis_fast.VESchedule(sigma_min, sigma_max)) or deis_fast.integrations.k_diffusion")


def equivalent_method(config: dict) -> str | None:
    """The deis_fast method running the same update as the DEIS / DPM-Solver++ multistep scheduler that
    ``config`` describes (recognized by its ``algorithm_type``), else None."""
    algo, k = config.get("algorithm_type"), config.get("solver_order")
    if algo == "deis" and k in (1, 2, 3):
        return f"logrho{k}"
    if algo == "dpmsolver++" and k in (1, 2, 3):
        return {1: "dpmpp1", 2: "dpmpp2" if config.get("solver_type") == "heun" else "dpmpp_2m", 3: "dpmpp_3m"}[k]
    return None


def _source_defaults(class_name: Any, config: dict) -> list[dict]:
    """Default values of the scheduler class that wrote ``config``: the named class, or (in-memory configs carry
    no ``_class_name``) every diffusers scheduler whose ``__init__`` takes all of the config's keys."""
    try:
        import diffusers
    except ImportError:
        return []

    def defaults(cls: Any) -> dict | None:
        try:
            params = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            return None
        return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}

    if class_name and hasattr(diffusers, str(class_name)):
        d = defaults(getattr(diffusers, str(class_name)))
        return [d] if d is not None else []
    keys = {k for k in config if not k.startswith("_")}
    found = []
    for name in dir(diffusers):
        if name.endswith("Scheduler") and name != "DEISFastScheduler":
            d = defaults(getattr(diffusers, name, None))
            if d is not None and keys <= set(d):
                found.append(d)
    return found


def _set_by_user(keys: dict, class_name: Any, config: dict) -> dict:
    """The keys whose values differ from the source scheduler's defaults (deliberate choices that would change
    what that scheduler does); all of them when the source class cannot be told."""
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    sources = _source_defaults(class_name, config)
    return {k: v for k, v in keys.items()
            if not any(k in d and norm(d[k]) == norm(v) for d in sources)}


def _warn_ignored(keys: dict, stacklevel: int, config: dict | None = None) -> None:
    names = ", ".join(f"{k}={keys[k]!r}" for k in sorted(keys))
    same = equivalent_method(config or {})
    hint = f"; method={same!r} runs the same update as that scheduler" if same else ""
    warnings.warn(f"DEISFastScheduler ignores the config keys {names}: deis_fast picks its solver with the method= "
                  f"argument{hint}.", UserWarning, stacklevel=stacklevel)
