"""``DEISFastScheduler``: every deis_fast method as a diffusers scheduler.

    from deis_fast.integrations.diffusers import DEISFastScheduler
    pipe.scheduler = DEISFastScheduler.from_config(pipe.scheduler.config, method="tab3")
    images = pipe(num_inference_steps=10).images          # 10 network evaluations

How it works. ``set_timesteps(n)`` compiles a deis_fast :class:`~deis_fast.Plan` with ``n`` network
evaluations (Evals) and sets ``timesteps`` to the model times of those Evals, in order. The pipeline
then calls the network once per timestep and hands the output to ``step()``; ``step()`` receives the
output of Eval k, runs the plan's Combines up to the next Eval (one fused ``deis_fast.core.ops.combine``
each, python-float coefficients, no host sync) and returns the state Eval k+1 is called on — the
solver state, or for PFDiff the springboard, or for Runge-Kutta methods a stage — and after the last
Eval the final sample. The model-output history lives in the scheduler's slots. So every plan works,
multistage and PFDiff included, with NFE = ``num_inference_steps`` (a multiple of the stage count for
Runge-Kutta methods).

img2img and inpainting. A run may start at any Eval k: ``set_begin_index(k)`` (what img2img pipelines call)
or, without it, the first ``step()``'s timestep picks k (a step's first Eval when several share the time).
The scheduler then re-plans on the remaining grid with a cold history and a lower-order warm start, the
way diffusers' multistep schedulers restart; for Runge-Kutta and PFDiff see ``deis_fast.solvers.restart``
(a start inside an RK step moves to the next step boundary with first-order moves, one per remaining
stage Eval; a PFDiff start makes a plain step to the next foresight boundary). The Evals, hence
``timesteps[k:]``, stay what the pipeline loops over. The history holds model outputs, never states,
so a pipeline may overwrite the state between steps (inpainting blends the known region into it).

Drop-in. A config of ``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``, ``DEISMultistepScheduler`` or
``FlowMatchEulerDiscreteScheduler`` records its class (``source_scheduler``); with ``grid="diffusers"`` the run
then takes that scheduler's own ``set_timesteps`` timesteps and sigmas (every spacing key with diffusers' meaning:
Karras, exponential, beta, lu, lambda_min_clipped, flow sigmas, the final sigma), its rule for the last steps'
order and its model-output conversion, so the equivalent method (``dpmpp_2m``, ``unipc2``, ``logrho3``, ``ddim``,
...) gives its images. How each source key is read is one table, :mod:`.config`.

Grids: ``grid="auto"`` follows diffusers' ``timestep_spacing`` (plus a final step to t = 0) for the
``logrho*`` methods — ``method="logrho3"`` then reproduces ``DEISMultistepScheduler(solver_order=3)`` —
and uses deis_fast's recommended grid for every other method. ``grid="diffusers"`` forces the
diffusers spacing; ``"time_quadratic"``, ``"logsnr"``, ``"karras"``, ``"time_uniform"`` or a list of
model times pick a deis_fast grid; ``use_karras_sigmas``, ``use_exponential_sigmas`` (= the ``logsnr``
grid) and ``use_beta_sigmas`` (the ``beta`` grid, Beta(``beta_alpha``, ``beta_beta``)) choose the spacing
when ``grid="auto"``. ``final_sigmas_type``: ``"sigma_min"`` ends at the first training step (t = 0, as
DEIS), ``"zero"`` at sigma = 0 (as DPM-Solver's default). ``timestep_type``: ``"int"`` rounds a named grid to the training
timesteps, ``"float"`` keeps exact float times (UNets accept float timesteps), ``"auto"`` rounds when
rounding keeps every step distinct and falls back to float times otherwise. Timesteps that round to the
same integer (dense step counts under ``"int"`` or the diffusers spacing) are removed with one warning.
``thresholding`` applies Imagen's dynamic thresholding to the x0 prediction where the model output is
converted (every method). ``rescale_betas_zero_snr=True`` (zero terminal SNR) starts every method at
alpha = 0; it needs a ``v_prediction`` or ``sample`` model.

Flow matching (SD3, FLUX, ...): a FlowMatchEuler/Heun config, or a DEIS / DPM-Solver++ / UniPC config with
``use_flow_sigmas=True`` and ``prediction_type="flow_prediction"``, gives x_t = (1 - t) x0 + t noise with a
velocity model called at float timesteps 1000 t; ``shift`` / ``flow_shift`` (SD3) or ``mu`` in
``set_timesteps`` (FLUX, ``use_dynamic_shifting``, ``time_shift_type``) and ``shift_terminal`` transform the
grid as FlowMatchEuler does. ``grid="auto"`` is FLUX's grid (t uniform from 1 to 1/n, shifted, then 0),
``grid="diffusers"`` FlowMatchEuler's own ``set_timesteps(n)`` spacing; ``set_timesteps(sigmas=...)`` (what
FLUX pipelines pass) uses those sigmas, shifted, with NFE = len(sigmas): a method that needs another number
of grid intervals (Runge-Kutta, PFDiff) gets the list resampled linearly in its index. A ``mu`` given to a
config without dynamic shifting is ignored with one warning (FluxPipeline passes one for every config, as
FlowMatchEuler ignores it). ``scale_noise`` is img2img's forward process; ``sigmas`` holds t (FlowMatch's
sigma) for flow configs.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
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

from ...core.grids import GRIDS, grid_rho, make_grid
from ...core.adapters import check_prediction, check_threshold, convert_output, normalize_prediction
from ...core.executor import NonFiniteError, run_plan, segments
from ...core.plan import Eval, Plan
from ...sampler import build_plan, default_grid
from ...core.schedules import (FlowSchedule, Schedule, VPSchedule, flow_schedule_from_diffusers_config,
                         schedule_from_diffusers_config)
from ...solvers import PlanOptions, check_method, default_method, resolve
from ...solvers.build import builder_options
from . import config as dc
from .config import equivalent_method

__all__ = ["DEISFastScheduler", "equivalent_method"]

_TIMESTEP_TYPES = ("auto", "int", "float")
_SPACINGS = ("linspace", "leading", "trailing")
_FINAL_SIGMAS = ("sigma_min", "zero")
# FlowMatch keys that, when set, change the sampling process in a way deis_fast does not model: ignoring them
# would sample the wrong process silently, so they are refused instead
_SCHEDULE_CHANGING = ("invert_sigmas", "stochastic_sampling")
_TIME_SHIFTS = ("exponential", "linear")
# the keys only FlowMatchEuler/Heun configs carry (they have no betas and no prediction_type)
_FLOWMATCH_KEYS = ("shift", "base_image_seq_len", "max_image_seq_len", "invert_sigmas", "stochastic_sampling")
# diffusers' grid-spacing switches (honored when grid="auto") and the deis_fast grid each one means
_SPACING_KEYS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "logsnr", "use_beta_sigmas": "beta",
                 "use_lu_lambdas": "logsnr"}
# diffusers' variance_type values: the learned ones are split off the model output, DDPM's fixed ones are no-ops here
_VARIANCE_TYPES = (None, "fixed_small") + dc.LEARNED_VARIANCE


class DEISFastScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any deis_fast method (tAB/ρAB/log-ρ DEIS, iPNDM, DPM-Solver++-style,
    ρRK, stochastic DDIM, PFDiff) on a discrete VP (DDPM-beta) model or a flow-matching model (SD3, FLUX).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training noise
            schedule, as in every diffusers scheduler (taken over by ``from_config``).
        prediction_type: ``"epsilon"``, ``"sample"``, ``"v_prediction"`` or ``"flow_prediction"`` (flow matching).
        method: a deis_fast method name (``deis_fast.METHODS``), e.g. ``"tab3"``, ``"logrho3"``,
            ``"dpmpp3"``, ``"ipndm4"``, ``"pfdiff"``, ``"rho_heun"``. Default: ``"tab3"``, or with ``tuned=`` the
            file's method (a method given that differs from the file's is refused).
        grid: ``"auto"``, ``"diffusers"``, a deis_fast grid name or a list of model times (see module doc).
        timestep_type: ``"auto"``, ``"int"`` or ``"float"`` (see module doc; flow models take float times).
        lower_order_final: use lower orders on the last steps when there are fewer than 15 (diffusers'
            rule); ``None`` = on for the diffusers grid, off for deis_fast grids.
        pfdiff: ``(k, h)`` for PFDiff (``method="pfdiff"`` defaults to (2, 1) on DDIM; with another
            first-order method it wraps that method).
        eta: noise level of ``method="ddim_eta"`` (1 = ancestral DDPM) and of the SDE methods.
        corrector: UniC corrector after every network call (``None``: the method's default, on for ``unipc*``);
            ``corrector=True`` works on every multistep method (tab*, rhoab*, logrho*, dpmpp*, ipndm*).
        disable_corrector: step indices left uncorrected (UniPCMultistepScheduler's key of the same name).
        variant: ``"bh1"`` / ``"bh2"`` for ``unipc*`` (UniPC's ``solver_type``), ``"midpoint"`` / ``"heun"`` for
            ``dpmpp_2m_sde``.
        s_noise: scale of the step noise of the SDE methods (k-diffusion's ``s_noise``).
        source_scheduler: the diffusers scheduler whose config this came from (set by ``from_config``); its
            ``set_timesteps`` gives the ``grid="diffusers"`` timesteps and sigmas.
        use_lu_lambdas, lambda_min_clipped, euler_at_final, variance_type: DPM-Solver's keys (uniform-lambda
            sigmas, the first timestep's cap, a first-order last step, a learned-variance output split in two).
        sigma_min, sigma_max: UniPC's Karras range of flow sigmas: with ``use_flow_sigmas`` and
            ``use_karras_sigmas`` (and ``grid`` "auto" or "diffusers") the run takes UniPC's sigmas, from
            sigma_max / (1 + sigma_max).
        timestep_spacing, steps_offset: diffusers' spacing of the ``grid="diffusers"`` timesteps.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, beta_alpha, beta_beta: diffusers'
            spacing switches, honored as the ``karras``, ``logsnr`` and ``beta`` grids when ``grid="auto"``.
        final_sigmas_type: ``"sigma_min"`` (end at t = 0) or ``"zero"`` (end at sigma = 0).
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of
            the x0 prediction (pixel-space models such as DeepFloyd IF), as in diffusers.
        rescale_betas_zero_snr: zero terminal SNR (alphas_cumprod[-1] = 0); needs a ``v_prediction`` or
            ``sample`` model, since an eps model says nothing about x0 at pure noise.
        use_flow_sigmas, flow_shift, shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
            max_image_seq_len, time_shift_type, shift_terminal: flow matching, x_t = (1 - t) x0 + t noise, as
            FlowMatchEulerDiscreteScheduler (``shift``) and the multistep schedulers (``use_flow_sigmas``,
            ``flow_shift``) describe it; ``set_timesteps(..., mu=)`` gives FLUX's dynamic shift.
        tuned: the path of a tuned file (``deis_fast.tuning``, ``deis-fast tune``): its grid or plan replaces the
            grid options; refused when it was tuned for another schedule, method, prediction type or (at
            ``set_timesteps``) NFE. A path, so it survives ``save_config``.
    """

    # VP schedulers whose configs (betas, prediction type, spacing) this one takes over, not the VE/EDM ones;
    # and the flow-matching ones
    _compatibles = [e.name for e in KarrasDiffusionSchedulers if not e.name.startswith("EDM")] + \
        ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    # FlowMatch keys other schedulers may pass: accepted by __init__ only to be refused with a message
    _deprecated_kwargs = list(_SCHEDULE_CHANGING)
    ignore_for_config = ["kwargs"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | np.ndarray | None = None,
                 prediction_type: str = "epsilon", method: str | None = None, grid: str | Sequence[float] = "auto",
                 timestep_type: str = "auto", lower_order_final: bool | None = None,
                 pfdiff: Sequence[int] | None = None, eta: float = 1.0, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, beta_alpha: float = 0.6, beta_beta: float = 0.6,
                 final_sigmas_type: str = "sigma_min", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 rescale_betas_zero_snr: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 time_shift_type: str = "exponential", shift_terminal: float | None = None,
                 corrector: bool | None = None, disable_corrector: Sequence[int] | None = None,
                 variant: str | None = None, s_noise: float = 1.0, source_scheduler: str | None = None,
                 use_lu_lambdas: bool = False, euler_at_final: bool = False,
                 lambda_min_clipped: float = -float("inf"), variance_type: str | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None, tuned: str | None = None,
                 **kwargs: Any):
        if kwargs:
            _refuse_schedule_changing_keys(kwargs)
            dc.warn_ignored(kwargs, stacklevel=4)
        if isinstance(trained_betas, np.ndarray):
            self.register_to_config(trained_betas=trained_betas.tolist())
        self.prediction = normalize_prediction(prediction_type)
        if self.prediction == "flow" and not use_flow_sigmas and source_scheduler != dc.FLOWMATCH:
            # one switch for flow, read by FLUX-style pipelines: they then leave the spacing to the scheduler. Not for
            # a FlowMatchEuler config, whose pipelines pass it their sigmas, as they would to FlowMatchEuler
            self.register_to_config(use_flow_sigmas=True)
        if use_flow_sigmas and source_scheduler is None and (sigma_min is not None or sigma_max is not None):
            # sigma_min / sigma_max are UniPC's Karras range of flow sigmas (no other scheduler reads them): built
            # directly, as from UniPC's config, they mean UniPC's sigmas (honoured with use_karras_sigmas)
            source_scheduler, final_sigmas_type = dc.UNIPC, "zero"   # a flow run ends at t = 0 (a clean sample)
            self.register_to_config(source_scheduler=source_scheduler, final_sigmas_type=final_sigmas_type)
        _check_process_keys(self.config)
        self.schedule = _noise_schedule(self.config)
        if rescale_betas_zero_snr and self.prediction == "eps" and not self.is_flow:
            warnings.warn("rescale_betas_zero_snr=True with an epsilon model: alphas_cumprod[-1] is clamped to 2**-24 "
                          "(as diffusers' DPM-Solver and UniPC do), since an eps prediction says nothing about x0 at "
                          "alpha = 0; use a v_prediction model for true zero terminal SNR", UserWarning, stacklevel=3)
        if method is None:  # the tuned file's method (and its options: the plan is the file's), else the default
            from ...tuning.files import load_tuned
            method = default_method(self.schedule) if tuned is None else load_tuned(tuned).method
            self.register_to_config(method=method)
        check_method(method)  # validates the name with a helpful message
        _check_solver_options(method, pfdiff, corrector, disable_corrector, variant, s_noise, eta)
        if tuned is not None:  # a file from deis_fast.tuning: refused now if corrupt or for another model / method
            from ...tuning.files import load_tuned
            load_tuned(tuned).check(schedule=None if use_dynamic_shifting else self.schedule, method=method,
                                    prediction=self.prediction, source=str(tuned))
        if timestep_type not in _TIMESTEP_TYPES:
            raise ValueError(f"timestep_type must be one of {_TIMESTEP_TYPES}, got {timestep_type!r}")
        if timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {timestep_spacing!r}")
        if isinstance(grid, str) and grid not in ("auto", "diffusers") + GRIDS:
            raise ValueError(f"grid must be 'auto', 'diffusers', one of {GRIDS} or a list of model times, got {grid!r}")
        flags = dict(use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                     use_beta_sigmas=use_beta_sigmas, use_lu_lambdas=use_lu_lambdas)
        spacing = [k for k, v in flags.items() if v]
        if len(spacing) > 1:
            raise ValueError(f"only one of {', '.join(_SPACING_KEYS)} can be set, got {', '.join(spacing)}")
        if final_sigmas_type not in _FINAL_SIGMAS:
            raise ValueError(f"final_sigmas_type must be one of {_FINAL_SIGMAS}, got {final_sigmas_type!r}")
        if source_scheduler is not None and source_scheduler not in dc.SOURCES:
            raise ValueError(f"source_scheduler must be one of {dc.SOURCES} or None, got {source_scheduler!r}")
        if source_scheduler == dc.DEIS and use_flow_sigmas and grid == "diffusers":
            raise ValueError("DEISMultistepScheduler's flow sigmas end at the last one, not at t = 0: its result is not "
                             "a clean sample, and grid='diffusers' would reproduce that; use grid='auto' (FLUX's grid, "
                             "ending at t = 0) or keep DEISMultistepScheduler")
        if variance_type not in _VARIANCE_TYPES:
            raise ValueError(f"variance_type={variance_type!r} is not supported: deis_fast solves the ODE, which uses "
                             f"the mean prediction only; one of {_VARIANCE_TYPES} ('learned'/'learned_range': the "
                             "first half of the output channels is the prediction)")
        self._threshold = check_threshold((dynamic_thresholding_ratio, sample_max_value)) if thresholding else None
        self.betas, self.alphas, self.alphas_cumprod = _training_arrays(self.schedule)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.plan: Plan | None = None
        self.timesteps, self.sigmas = _training_times(self.schedule, num_train_timesteps)
        self._build_kw: dict[str, Any] = {}
        self._run_plan: Plan | None = None   # the plan being run: self.plan, or its tail after a mid start
        self._segments: list[tuple[int, int]] = []  # op ranges of the plan being run, one per Eval
        self._slots: list[torch.Tensor | None] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._warned_mu = False
        self._mu: float | None = None
        # with the source scheduler's grid: (its timesteps, its sigmas, the solver times of those sigmas)
        self._source: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._noop = False  # the source's sigmas end with a zero-length step

    @property
    def is_flow(self) -> bool:
        """True for a flow-matching config (x_t = (1 - t) x0 + t noise, velocity model, float timesteps 1000 t)."""
        return isinstance(self.schedule, FlowSchedule)

    # --- config carried over from other schedulers ----------------------------------
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from any diffusers scheduler config; keys this scheduler does not use (e.g. DEIS'
        ``solver_order``) are dropped with one warning. A FlowMatchEuler/Heun config gives a flow-matching
        scheduler (``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``)."""
        instance = None
        if config is not None and hasattr(config, "config") and not isinstance(config, dict):
            instance, config = config, config.config  # a scheduler instance
        cfg = dict(config or {})
        source_class = cfg.get("_class_name")
        source = dc.source_of(cfg, instance)
        _refuse_ve_config(cfg)  # judged on the whole config: its sigma range may be all defaults
        flow_match = _is_flowmatch_config(cfg)  # judged before the keys at their defaults are dropped
        # as diffusers' own from_config: keys the source scheduler only had at their defaults are not carried
        # over (a default DDPMScheduler's timestep_spacing="leading" must not replace ours)
        for k in cfg.pop("_use_default_values", None) or ():
            cfg.pop(k, None)
        _refuse_schedule_changing_keys(cfg)
        refused = [k for k in dc.refused_keys(cfg) if k not in _SCHEDULE_CHANGING]
        if refused:
            raise ValueError(f"DEISFastScheduler cannot reproduce {', '.join(f'{k}={cfg[k]!r}' for k in refused)} of "
                             f"{source or 'this scheduler'} ({'; '.join(dc.KEYS[k].handling for k in refused)}); "
                             "remove it from the config or keep the original scheduler")
        if flow_match:  # FlowMatch configs have no prediction_type: their models predict the velocity
            cfg.update(prediction_type=cfg.get("prediction_type", "flow_prediction"))
        ours = cfg.get("_class_name") == cls.__name__ or "method" in cfg  # in-memory configs carry no _class_name
        if not ours and "lower_order_final" not in kwargs and cfg.get("lower_order_final", True) is True:
            # other schedulers default it to True; for deis_fast grids it costs accuracy (tab3 at NFE 10 on the
            # yardstick: 0.0117 -> 0.0179), so keep our default (on only for the diffusers grid, as there);
            # an explicit False is carried over
            cfg.pop("lower_order_final", None)
        if not ours and source is not None and "source_scheduler" not in kwargs:
            cfg["source_scheduler"] = source  # whose semantics grid="diffusers" reproduces
            if kwargs.get("grid", cfg.get("grid")) == "diffusers":
                # the source's own spacing, its defaults included (DPM-Solver and UniPC end at sigma = 0)
                for k, v in dc.spacing_defaults(source).items():
                    cfg.setdefault(k, v)
        clashing = {}
        if not ours and cfg.get("timestep_type") not in (None,) + _TIMESTEP_TYPES:
            clashing["timestep_type"] = cfg.pop("timestep_type")  # EulerDiscrete's key, another meaning
        for k in ("sigma_min", "sigma_max"):  # UniPC's flow Karras range; other schedulers' keys of another meaning
            if not ours and source != dc.UNIPC and cfg.get(k) is not None:
                clashing[k] = cfg.pop(k)
        if not ours and cfg.get("final_sigmas_type") not in (None,) + _FINAL_SIGMAS:
            clashing["final_sigmas_type"] = cfg.pop("final_sigmas_type")
        if not (isinstance(kwargs.get("grid", "auto"), str) and kwargs.get("grid", "auto") in ("auto", "diffusers")):
            for k in _SPACING_KEYS:  # the user's explicit deis_fast grid wins over a spacing switch of the source
                cfg.pop(k, None)
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        ignored = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in known and k not in kwargs}
        ignored.update(clashing)
        # the metadata goes through (diffusers' from_config renames _class_name): save_config / from_pretrained keep it
        cfg = {k: v for k, v in cfg.items() if k in known or k in ("_class_name", "_diffusers_version")}
        ignored = dc.set_by_user(ignored, source_class, dict(config or {}))
        ignored = {k: v for k, v in ignored.items() if k not in dc.SILENT_KEYS}
        if ignored:
            dc.warn_ignored(ignored, stacklevel=3, config=dict(config or {}))
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # --- diffusers scheduler interface -----------------------------------------------
    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step()`` (None before the first one)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index into ``timesteps`` of the first ``step()``, as set by :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``timesteps[begin_index]`` (img2img strength): the plan is re-built on the
        remaining grid with a cold history (see the module doc)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
        if self.plan is not None and begin_index >= self.plan.nfe:
            raise ValueError(f"begin_index={begin_index} is past the last of the {self.plan.nfe} timesteps")
        self._begin_index = int(begin_index)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: Sequence[float] | None = None, mu: float | None = None,
                      timesteps: Sequence[float] | None = None, **kwargs: Any) -> None:
        """Compile the plan for ``num_inference_steps`` network evaluations and set ``timesteps``
        (the model times of the plan's Evals). ``timesteps`` may instead give the model times of the
        solver grid explicitly (then NFE = len(timesteps) x stages, with a final step to the end).
        Flow configs: ``sigmas`` (FlowMatch's unshifted list, as FLUX pipelines pass it) gives
        NFE = len(sigmas) and the spacing of the grid; ``mu`` is FLUX's dynamic shift."""
        n = _inference_steps(num_inference_steps, sigmas, timesteps)
        self._mu = mu
        if self.is_flow:
            self.schedule = _noise_schedule(self.config, self._dynamic_mu(mu))
        elif sigmas is not None or mu is not None:
            raise ValueError("sigmas= and mu= are flow-matching options (FlowMatch / use_flow_sigmas=True configs); "
                             "this scheduler has a VP config: pass num_inference_steps or timesteps")
        self.plan = self._build(n, timesteps, sigmas)
        check_prediction(self.plan, self.prediction, self.schedule.variance_preserving)
        mt = np.array([e.model_t for e in self.plan.evals], dtype=np.float64)
        if not self.is_flow and np.all(np.abs(mt - np.round(mt)) < 1e-6):
            ts = torch.from_numpy(np.round(mt).astype(np.int64))
        else:
            # float64 keeps the exact model times the coefficients assume (networks cast their time input);
            # mps has no float64
            mps = device is not None and torch.device(device).type == "mps"
            ts = torch.from_numpy(mt.astype(np.float32 if mps else np.float64))
        self.timesteps = ts.to(device) if device is not None else ts
        self.sigmas = torch.from_numpy(_sigmas_attribute(self.schedule, self.plan) if self._source is None
                                       else self._source[1]).float()
        self.num_inference_steps = self.plan.nfe
        self._run_plan = None
        self._slots = []
        self._step_index = None
        self._begin_index = None

    def _dynamic_mu(self, mu: float | None) -> float | None:
        """The mu that applies: required with ``use_dynamic_shifting``; otherwise ignored (FLUX pipelines pass one
        for every config, FlowMatchEuler ignores it too), with one warning."""
        if self.config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("use_dynamic_shifting=True needs set_timesteps(..., mu=): FLUX-style pipelines pass "
                                 "it; deis_fast.core.schedules.flux_mu(image_seq_len) computes it")
            return float(mu)
        if mu is not None and not self._warned_mu:
            self._warned_mu = True
            warnings.warn(f"mu={mu} is ignored: this config has use_dynamic_shifting=False, so its static shift "
                          f"applies (FLUX pipelines pass mu for every config; set use_dynamic_shifting=True to use it)",
                          UserWarning, stacklevel=3)
        return None

    def _build(self, n: int | None, timesteps: Sequence[float] | None, sigmas: Sequence[float] | None = None) -> Plan:
        """The full plan; remembers the options that re-planning a mid start needs."""
        cfg = self.config
        if cfg.tuned is not None:
            if timesteps is not None:
                raise ValueError("this scheduler has tuned= (its grid is the tuned one): call set_timesteps("
                                 "num_inference_steps) without timesteps")
            from ...tuning.files import tuned_plan
            plan, self._build_kw = tuned_plan(cfg.tuned, self.schedule, cfg.method, n, prediction=self.prediction)
            return plan
        spec, o = resolve(cfg.method, PlanOptions(pfdiff=tuple(cfg.pfdiff) if cfg.pfdiff is not None else None))
        pf = o.pfdiff  # a base PFDiff cannot wrap is refused by build_plan
        is_pf = pf is not None
        self._source, self._noop = None, False
        times, kind = self._grid_times(n, timesteps, spec, pf, sigmas)
        lof = cfg.lower_order_final
        if lof is None:
            lof = kind != "named"
        if not spec.multistep_options or is_pf:
            lof = False
        elif self._source is not None:  # the source scheduler's own rule on its number of calls
            lof = dc.final_orders(cfg.source_scheduler, bool(lof), bool(cfg.euler_at_final), len(self._source[0]),
                                  self._noop)
        else:
            lof = dc.final_orders(None, bool(lof), bool(cfg.euler_at_final), len(times) - 1, False)
        stochastic = "eta" in spec.options  # the noise level of ddim_eta (also as a PFDiff base) and the SDE methods
        self._build_kw = dict(method=cfg.method, nfe=n if is_pf else None, eta=float(cfg.eta) if stochastic else None,
                              lower_order_final=lof, pfdiff=pf, **_solver_options(cfg))
        return self._finish(build_plan(self.schedule, grid=list(times), **self._build_kw))

    def _finish(self, plan: Plan) -> Plan:
        """With the source scheduler's grid: its model timesteps on the Evals at its sigmas (diffusers rounds
        them, the solver steps between the exact sigmas)."""
        if self._source is None:
            return plan
        times, model_times = self._source[2], self._source[0]

        def model_t(op: Eval) -> float:
            hit = np.flatnonzero(np.abs(times - op.t) <= 1e-12 * max(1.0, abs(op.t)))
            return float(model_times[hit[0]]) if hit.size else op.model_t
        ops = tuple(dataclasses.replace(op, model_t=model_t(op)) if isinstance(op, Eval) else op for op in plan.ops)
        return dataclasses.replace(plan, ops=ops)

    def _source_grid(self, steps: int, sigmas: Sequence[float] | None) -> np.ndarray | None:
        """The source scheduler's own sigmas for ``steps`` steps as solver times (VP: the time of each sigma; flow:
        the sigma), remembering its timesteps for the Evals; None when it cannot take the pipeline's ``sigmas``."""
        cfg, sched = self.config, self.schedule
        if sigmas is not None and len(sigmas) != steps:
            return None
        got = dc.source_times(cfg, steps, self.is_flow, self._mu, sigmas)
        if got is None:
            return None
        ts, sig = got
        if self.is_flow:
            t = sig.copy()
        else:
            t = np.empty_like(sig)
            zero = sig == 0.0
            with np.errstate(divide="ignore", invalid="ignore"):
                # float32 sigmas may sit a rounding step outside the training range
                t[~zero] = np.clip(sched.t_from_rho(sig[~zero]), sched.t_min, sched.t_max)
            t[zero] = sched.t_from_rho(0.0)
        if t.size >= 2 and sig[-1] == sig[-2]:
            # Karras-type sigmas ending at sigma_min: the source's last step has zero length (it only applies the
            # corrector of the step before, for UniPC); here a first-order step of 1e-9 time units, which changes
            # the result by ~1e-12
            t[-2] = t[-1] + 1e-9 * max(1.0, abs(float(t[-1])))
            self._noop = True
        if np.any(np.diff(t) >= 0):
            raise ValueError(f"{cfg.source_scheduler or 'diffusers'}' sigmas for {steps} steps repeat a value "
                             f"({sig.tolist()[:8]}...); use fewer steps or a deis_fast grid")
        self._source = (ts, sig, t[:ts.size])
        return t

    def _grid_times(self, n: int | None, timesteps: Sequence[float] | None, spec: Any,
                    pf: tuple[int, int] | None, sigmas: Sequence[float] | None = None) -> tuple[np.ndarray, str]:
        """The solver grid (schedule times, decreasing, ending at t_end) and its kind: 'diffusers', 'list', 'named'.
        The one place where config keys become a grid."""
        cfg, sched = self.config, self.schedule
        t_end = float(sched.t_from_rho(0.0)) if cfg.final_sigmas_type == "zero" else 0.0  # flow: 0 either way
        if timesteps is not None:
            return np.append(_schedule_times(sched, timesteps, "timesteps"), t_end), "list"
        grid = cfg.grid
        if not isinstance(grid, str):
            t = _schedule_times(sched, grid, "grid")
            if self.is_flow and t[-1] != 0.0:
                raise ValueError(f"a flow grid must end at model time 0 (t = 0) to return a clean sample; the given "
                                 f"grid ends at {float(grid[-1])}: append 0")
            return t, "list"
        if grid == "auto":
            spacing = [g for k, g in _SPACING_KEYS.items() if cfg[k]]
            if spacing:
                grid = spacing[0]
                if grid == "karras" and self.is_flow and (cfg.sigma_min is not None or cfg.sigma_max is not None):
                    grid = "diffusers"   # UniPC's flow Karras sigmas between sigma_min and sigma_max, as UniPC runs
            elif spec.name.startswith("logrho") and pf is None and not self.is_flow:
                grid = "diffusers"
            else:
                grid = default_grid(sched, spec.name)
        if n % spec.stages:
            raise ValueError(f"method {cfg.method!r} uses {spec.stages} NFE per step; num_inference_steps={n} "
                             f"is not a multiple of {spec.stages}")
        if grid == "diffusers" and pf is not None:
            raise ValueError("grid='diffusers' is not available with PFDiff (it needs its own grid of "
                             "nfe*(k+1)-k intervals); use a named grid")
        steps = n * (pf[0] + 1) - pf[0] if pf is not None else n // spec.stages
        if grid == "diffusers" and (cfg.source_scheduler is not None or any(cfg[k] for k in _SPACING_KEYS)
                                    or math.isfinite(float(cfg.lambda_min_clipped))):
            t = self._source_grid(steps, sigmas)
            if t is not None:
                return t, "diffusers"
        if self.is_flow:
            return self._flow_grid(grid, steps, sigmas), "diffusers" if grid == "diffusers" else "named"
        if grid == "diffusers":
            ts = _dedupe(self._diffusers_timesteps(n // spec.stages).astype(np.float64), t_end, n)
            return np.append(ts, t_end), "diffusers"
        # DPM-Solver's lambda_min_clipped caps the first time (squaredcos_cap_v2 configs); every grid starts there
        t_start = dc.lambda_clip_start(sched.alphas_cumprod, cfg.lambda_min_clipped)
        t = make_grid(sched, grid, steps, t_start, beta_ab=(cfg.beta_alpha, cfg.beta_beta))
        if cfg.timestep_type != "float":
            r = np.round(t)
            if np.all(np.diff(r) < 0):
                t = r
            elif cfg.timestep_type == "int":
                if pf is not None:
                    warnings.warn(f"timestep_type='int': PFDiff with {n} NFE needs {steps} distinct grid times, more "
                                  "than rounding keeps; using float timesteps", UserWarning, stacklevel=4)
                else:
                    t = np.append(_dedupe(r[:-1], r[-1], n), r[-1])
        t[-1] = t_end
        return t, "named"

    def _flow_grid(self, grid: str, steps: int, sigmas: Sequence[float] | None) -> np.ndarray:
        """A flow grid of ``steps`` intervals from t = 1 to 0: the pipeline's ``sigmas`` (resampled when the method
        needs another number of intervals), FlowMatchEuler's own spacing (``"diffusers"``) or a named grid; then
        the config's shift / mu and ``shift_terminal``, as FlowMatchEulerDiscreteScheduler applies them."""
        cfg, sched = self.config, self.schedule
        if sigmas is not None:
            t = sched.grid_transform(_resample(np.append(np.asarray(sigmas, dtype=np.float64), 0.0), steps))
        elif grid == "diffusers":
            # FlowMatchEuler: linspace(1, sigma_min, n), then shifted, where a static shift was already applied
            # to its training sigma_min = 1 / num_train_timesteps
            lo = 1.0 / cfg.num_train_timesteps
            lo = lo if cfg.use_dynamic_shifting else float(sched.grid_transform(lo))
            t = np.append(sched.grid_transform(np.linspace(1.0, lo, steps)), 0.0)
        else:
            t = make_grid(sched, grid, steps, beta_ab=(cfg.beta_alpha, cfg.beta_beta))
        if cfg.shift_terminal:
            t[:-1] = _stretch_to_terminal(t[:-1], float(cfg.shift_terminal))
        if abs(t[0] - 1.0) < 1e-12:
            t[0] = 1.0  # exactly pure noise (the shift maps 1 to 1 up to round-off)
        t[-1] = 0.0
        return t

    def _diffusers_timesteps(self, n: int) -> np.ndarray:
        """diffusers' integer timesteps for ``n`` steps under ``timestep_spacing`` (as DEIS/DPM-Solver do)."""
        cfg = self.config
        N = cfg.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, N - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if cfg.timestep_spacing == "leading":
            ratio = N // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        return np.arange(N, 0, -N / n).round().astype(np.int64) - 1

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The identity (VP models take the state as it is)."""
        return sample

    def index_for_timestep(self, timestep: int | float | torch.Tensor,
                           schedule_timesteps: torch.Tensor | None = None) -> int | torch.Tensor:
        """The index in ``schedule_timesteps`` (default ``timesteps``) of ``timestep``; when several share it, the
        first Eval of a step; a timestep that is not there gives the last index, as diffusers' multistep
        schedulers do (a pipeline may step at t = 0). A batch of timesteps gives a LongTensor, one index per entry."""
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:   # a tensor, as diffusers' vectorized lookups
            return torch.tensor([self.index_for_timestep(v, schedule_timesteps) for v in timestep.reshape(-1)],
                                dtype=torch.long, device=timestep.device)
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        ts = torch.as_tensor(self.timesteps if schedule_timesteps is None else schedule_timesteps)
        ts = ts.detach().to("cpu", torch.float64).reshape(-1).numpy()
        hits = np.flatnonzero(np.abs(ts - t) <= 1e-6 * max(1.0, abs(t)))
        if hits.size == 0:
            return int(ts.size - 1)
        stages = resolve(self.config.method)[0].stages
        first = [int(i) for i in hits if i % stages == 0]
        return first[0] if first else int(hits[0])

    def _start(self, timestep: Any) -> None:
        """First step(): the start index (begin index, else from the timestep) and the plan run from there."""
        k = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        if isinstance(k, torch.Tensor):  # a pipeline that passes the timestep once per sample
            k = int(k.reshape(-1)[0])
        run = self.plan
        if k:
            run = self._finish(build_plan(self.schedule, grid=list(self.plan.times), start_eval=k, **self._build_kw))
        if not run.ops or not isinstance(run.ops[0], Eval):
            raise RuntimeError("internal: a plan must start with an Eval")  # never happens for deis_fast plans
        self._run_plan, self._segments = run, segments(run)
        self._slots = [None] * run.num_slots
        self._step_index = k
        self._fin: list[torch.Tensor] = []   # per step() the sums of its sample and model output (no host sync)

    def step(self, model_output: torch.Tensor, timestep: int | float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True, generator: torch.Generator | list[torch.Generator] | None = None,
             **kwargs: Any) -> SchedulerOutput | tuple:
        """Consume the network output of Eval k (called on ``sample`` at ``timestep``) and return the
        input of Eval k+1 (or, after the last Eval, the final sample) as ``prev_sample``.

        ``timestep`` is read only on the first step without a begin index (to find k). Extra keyword
        arguments that pipelines pass to other schedulers (``eta``, ``use_clipped_model_output``) are ignored;
        ``generator`` feeds the noise of stochastic methods.
        """
        if self.plan is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            self._start(timestep)
            if self.config.tuned is not None:  # the scheduler sees the latent size, not the guidance scale
                from ...tuning.files import check_latent_shape
                check_latent_shape(self.config.tuned, sample.shape)
        k = self._step_index - (self.plan.nfe - self._run_plan.nfe)  # the Eval of the plan being run
        if k >= len(self._segments):
            raise IndexError(f"step() called past the last of the {self.plan.nfe} timesteps; call set_timesteps "
                             "again to start a new run")
        model_output = dc.split_learned_variance(model_output, sample, self.config.variance_type)
        if model_output.dtype != sample.dtype or model_output.device != sample.device:
            model_output = model_output.to(device=sample.device, dtype=sample.dtype)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}, the sample {tuple(sample.shape)}")
        prev = self._run_segment(k, model_output, sample, generator)
        if not torch.compiler.is_compiling():
            self._finite_check(k, sample, model_output, prev, last=k + 1 == len(self._segments))
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _finite_check(self, k: int, sample: torch.Tensor, model_output: torch.Tensor, prev: torch.Tensor,
                      last: bool) -> None:
        """The executor's deferred finite check across step() calls: one reduction per step (no sync), one host
        sync at the last step; raises :class:`NonFiniteError` naming the first step whose sample or model output
        was NaN / Inf (the run's result is then not returned)."""
        self._fin.append(torch.stack([torch.sum(v.detach(), dtype=torch.float32) for v in (sample, model_output)]))
        if not last:
            return
        sums = torch.cat(self._fin + [torch.sum(prev.detach(), dtype=torch.float32).reshape(1)])
        self._fin = []
        if math.isfinite(float(sums.sum())):
            return
        flags = torch.isfinite(sums).tolist()
        first = self._step_index - k   # the step() count of this run's Eval 0
        for i in range(len(flags) // 2):
            for j, what in enumerate(("sample", "model_output")):
                if not flags[2 * i + j]:
                    raise NonFiniteError(f"step() {first + i} of this run (timestep {float(self.timesteps[first + i]):g})"
                                         f" got a {what} with NaN or Inf; check the model, its dtype (fp16 overflow?) "
                                         "and the latents the pipeline passed")
        raise NonFiniteError("the scheduler's result contains NaN or Inf although every sample and model output "
                             "passed to step() was finite")

    def _run_segment(self, k: int, model_output: torch.Tensor, sample: torch.Tensor,
                     generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """Eval k's output into its slot, then the Combines up to Eval k+1 (the one executor, out of place:
        the pipeline owns the tensors it gets); returns Eval k+1's input (the final sample after the last)."""
        plan, slots, spans = self._run_plan, self._slots, self._segments
        slots[plan.ops[spans[k][0]].src] = sample

        def evaluate(x: torch.Tensor, op: Eval, _k: int, _buf: Any) -> torch.Tensor:
            return convert_output(self.prediction, op, x, [(1.0, model_output)], threshold=self._threshold)

        run_plan(plan, slots, evaluate, span=spans[k], first_eval=k, in_place=False,
                 step_noise=_StepNoise(sample, generator, dc.noise_dtype(self.config.source_scheduler)))
        if k + 1 < len(spans):
            return slots[plan.ops[spans[k + 1][0]].src]
        prev = slots[0]
        self._slots = [None] * len(slots)  # release the history
        return prev

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t * x0 + sigma_t * noise`` at (possibly fractional) model timesteps, exact in float64
        (flow: ``(1 - t) x0 + t noise`` with t = timestep / 1000)."""
        mt = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1).numpy()
        t = self.schedule.t_from_model_time(mt)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        if self._source is not None and self.plan is not None:
            # the source scheduler's grid: as there, the noise level of the run's step at that timestep (its sigma,
            # e.g. a Karras one, not that of the rounded timestep)
            evals = self.plan.evals
            idx = [self.index_for_timestep(float(v)) for v in mt]
            a = np.array([evals[i].alpha for i in idx])
            s = np.array([evals[i].sigma for i in idx])
        alpha = torch.as_tensor(a, dtype=original_samples.dtype, device=original_samples.device)
        sigma = torch.as_tensor(s, dtype=original_samples.dtype, device=original_samples.device)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return alpha.reshape(shape) * original_samples + sigma.reshape(shape) * noise

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
        """FlowMatch's name for the forward process (img2img pipelines): :meth:`add_noise` at ``timestep``."""
        if noise is None:
            raise ValueError("scale_noise(sample, timestep, noise) needs the noise tensor")
        return self.add_noise(sample, noise, torch.as_tensor(timestep))

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class _StepNoise:
    """The step noise of a segment, drawn when a noisy Combine asks for it (diffusers' ``randn_tensor``, so a
    list of generators gives each sample its own noise)."""

    def __init__(self, like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None,
                 dtype: torch.dtype | None = None):
        self.like, self.generator, self.dtype = like, generator, dtype

    def __getitem__(self, _index: int) -> torch.Tensor:
        x = self.like
        z = randn_tensor(x.shape, generator=self.generator, device=x.device, dtype=self.dtype or x.dtype)
        return z.to(x.dtype)


def _dedupe(ts: np.ndarray, t_end: float, n: int) -> np.ndarray:
    """Decreasing model times with repeats (and times at or below t_end) removed, in one warning."""
    keep = np.concatenate([[True], np.diff(ts) < 0]) & (ts > t_end)
    if not np.all(keep):
        warnings.warn(f"num_inference_steps={n}: {int((~keep).sum())} timestep(s) round to an integer already used "
                      f"(or to the end); they were removed, so the run has {int(keep.sum())} steps. Use "
                      "timestep_type='float' (deis_fast grids) to keep every step", UserWarning, stacklevel=5)
    return ts[keep]


def _training_arrays(schedule: Schedule) -> tuple[torch.Tensor | None, ...]:
    """(betas, alphas, alphas_cumprod) over the training timesteps, float32 as diffusers keeps them (None for flow
    matching, which has no betas)."""
    if isinstance(schedule, FlowSchedule):
        return None, None, None
    ac = schedule.alphas_cumprod
    alphas = ac / np.concatenate([[1.0], ac[:-1]])
    return (torch.from_numpy(1.0 - alphas).float(), torch.from_numpy(alphas).float(), torch.from_numpy(ac).float())


def _training_times(schedule: Schedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``timesteps`` and ``sigmas`` before set_timesteps: every training step (flow: FlowMatch's shifted sigmas)."""
    if isinstance(schedule, FlowSchedule):
        t = schedule.grid_transform(np.linspace(1.0, 1.0 / n, n))
        return torch.from_numpy(schedule.model_time(t)), torch.from_numpy(t).float()
    rho = schedule.rho(np.arange(n, dtype=np.float64))
    return torch.arange(n - 1, -1, -1, dtype=torch.int64), torch.from_numpy(rho).float()


def _sigmas_attribute(schedule: Schedule, plan: Plan) -> np.ndarray:
    """diffusers' ``sigmas`` after set_timesteps, one per Eval plus the end: sigma / alpha for VP, t for flow
    (FlowMatch's sigma)."""
    if isinstance(schedule, FlowSchedule):
        return np.append([e.t for e in plan.evals], plan.times[-1])
    rho = grid_rho(schedule, np.asarray(plan.times))
    with np.errstate(divide="ignore"):   # inf at alpha = 0 (zero terminal SNR), as diffusers' sigmas
        at_evals = np.array([e.sigma for e in plan.evals]) / np.array([e.alpha for e in plan.evals])
    return np.append(at_evals, rho[-1])


def _inference_steps(n: Any, sigmas: Sequence[float] | None, timesteps: Sequence[float] | None) -> int | None:
    """The NFE set_timesteps was asked for (None: explicit timesteps), validated."""
    if sigmas is not None and timesteps is not None:
        raise ValueError("pass sigmas or timesteps, not both (timesteps are the model times of the solver grid, "
                         "sigmas the FlowMatch list the config's shift is applied to)")
    if timesteps is not None:
        return None
    if sigmas is not None:
        sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        sig = sig[:-1] if sig.size > 1 and sig[-1] == 0.0 else sig  # a trailing 0 is the end, not a call
        if sig.size < 1 or not np.all(np.isfinite(sig)) or sig[0] > 1.0 or sig[-1] <= 0.0 or np.any(np.diff(sig) >= 0):
            raise ValueError(f"sigmas must decrease within (0, 1] (FlowMatch's unshifted times), got {list(sigmas)[:6]}")
        if n is not None and n != sig.size:
            raise ValueError(f"num_inference_steps={n} but {sig.size} sigmas were given; give one of them")
        return int(sig.size)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
    return int(n)


def _schedule_times(schedule: Schedule, model_times: Sequence[float], what: str) -> np.ndarray:
    """Model times (a user's ``timesteps`` / ``grid``) as schedule times (flow: divided by 1000)."""
    mt = np.array([float(v) for v in model_times], dtype=np.float64)
    if mt.ndim != 1 or mt.size < 1:
        raise ValueError(f"{what} must be a non-empty list of model times")
    return schedule.t_from_model_time(mt)


def _resample(t: np.ndarray, steps: int) -> np.ndarray:
    """A decreasing list of times at another number of intervals, linear in the index (the pipelines' uniform
    ``linspace(1, 1/n, n)`` stays uniform); unchanged when it already has ``steps`` intervals."""
    if t.size - 1 == steps:
        return t
    return np.interp(np.linspace(0.0, t.size - 1.0, steps + 1), np.arange(t.size, dtype=np.float64), t)


def _stretch_to_terminal(t: np.ndarray, terminal: float) -> np.ndarray:
    """diffusers' ``shift_terminal``: stretch 1 - t so that the last time (before the final 0) is ``terminal``."""
    one_minus = 1.0 - t
    return 1.0 - one_minus * ((1.0 - terminal) / one_minus[-1])


def _is_flowmatch_config(cfg: dict) -> bool:
    """A FlowMatchEuler/Heun config: named so, or (in-memory configs carry no class name) FlowMatch's own keys
    and no betas."""
    name = str(cfg.get("_class_name") or "")
    if name:
        return name.startswith("FlowMatch")
    return any(k in cfg for k in _FLOWMATCH_KEYS) and "beta_start" not in cfg and "trained_betas" not in cfg


def _check_process_keys(cfg: Any) -> None:
    """Refuse config keys that contradict the noise process the config describes (VP or flow matching)."""
    pred = normalize_prediction(cfg.prediction_type)
    flow_keys = [k for k in ("use_dynamic_shifting", "shift_terminal") if cfg[k]]
    if _flow_config(cfg):
        if pred != "flow":
            raise ValueError(f"a flow-matching config (use_flow_sigmas=True, or a FlowMatch scheduler's config) needs "
                             f"prediction_type='flow_prediction', got {cfg.prediction_type!r}: flow models predict the "
                             "velocity noise - x0")
        if cfg.rescale_betas_zero_snr:
            raise ValueError("rescale_betas_zero_snr is a VP option; a flow-matching config has no betas to rescale")
        if cfg.time_shift_type not in _TIME_SHIFTS:
            raise ValueError(f"time_shift_type must be one of {_TIME_SHIFTS}, got {cfg.time_shift_type!r}")
        if cfg.shift_terminal is not None and not 0.0 < float(cfg.shift_terminal) < 1.0:
            raise ValueError(f"shift_terminal must be in (0, 1) (the last time before 0), got {cfg.shift_terminal}")
        if cfg.timestep_type == "int":
            raise ValueError("timestep_type='int' does not apply to flow models: they take float timesteps 1000 t")
    elif pred not in ("eps", "x0", "v"):
        raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported; use 'epsilon', 'sample', "
                         "'v_prediction' or 'flow_prediction'")
    elif flow_keys:
        raise ValueError(f"{', '.join(flow_keys)} only apply to flow-matching configs: set use_flow_sigmas=True and "
                         "prediction_type='flow_prediction' for a flow model")


def _flow_config(cfg: Any) -> bool:
    """A flow-matching config: use_flow_sigmas (the multistep schedulers' switch) or a FlowMatchEuler config."""
    return bool(cfg.use_flow_sigmas) or cfg.source_scheduler == dc.FLOWMATCH


def _noise_schedule(cfg: Any, mu: float | None = None) -> Schedule:
    """The noise process a config describes: a FlowSchedule (its shift, or FLUX's ``mu``, as the grid transform;
    without mu a dynamic-shift config has none until set_timesteps) or the discrete VP schedule."""
    if not _flow_config(cfg):
        sched = schedule_from_diffusers_config(cfg)
        if cfg.rescale_betas_zero_snr and dc.clamps_zero_snr(normalize_prediction(cfg.prediction_type)):
            sched = VPSchedule.from_alphas_cumprod(dc.clamped_alphas_cumprod(sched.alphas_cumprod),
                                                   name=sched.name + "+clamped")
        return sched
    if cfg.use_dynamic_shifting and mu is None:
        return FlowSchedule(time_scale=float(cfg.num_train_timesteps))
    # shift_terminal stretches the grid (DEISFastScheduler._flow_grid), not the process
    return flow_schedule_from_diffusers_config(dict(cfg, prediction_type="flow_prediction", shift_terminal=None), mu)


def _solver_options(cfg: Any) -> dict:
    """The corrector / variant / s_noise plan options a config sets (only those away from their defaults, so that
    a method without them is never handed one)."""
    out: dict = {}
    if cfg.get("corrector") is not None:
        out["corrector"] = bool(cfg["corrector"])
    if cfg.get("disable_corrector"):
        out["disable_corrector"] = tuple(int(i) for i in cfg["disable_corrector"])
    if cfg.get("variant") is not None:
        out["variant"] = str(cfg["variant"])
    if float(cfg.get("s_noise", 1.0)) != 1.0:
        out["s_noise"] = float(cfg["s_noise"])
    return out


def _check_solver_options(method: str, pfdiff: Any, corrector: bool | None, disable_corrector: Sequence[int] | None,
                          variant: str | None, s_noise: float, eta: float) -> None:
    """Refuse at construction what build_plan would refuse at set_timesteps: a corrector on a method without one,
    an unknown variant, a negative noise scale."""
    if float(eta) < 0 or float(s_noise) < 0:
        raise ValueError(f"eta and s_noise are noise scales and must be >= 0, got eta={eta}, s_noise={s_noise}")
    if float(eta) != 1.0:   # away from its default: refused where the method has no noise, as sample() refuses it
        build_options = PlanOptions(pfdiff=tuple(pfdiff) if pfdiff is not None else None, eta=float(eta))
        spec, o = resolve(method, build_options)
        if "eta" not in spec.options:
            raise ValueError(f"eta={eta} applies to stochastic methods (ddim_eta, dpmpp_2m_sde, dpmpp_3m_sde), not "
                             f"{method!r}; drop eta or use one of those")
    opts = _solver_options(dict(corrector=corrector, disable_corrector=disable_corrector, variant=variant,
                                s_noise=s_noise))
    if not opts:
        return
    spec, o = resolve(method, PlanOptions(pfdiff=tuple(pfdiff) if pfdiff is not None else None, **opts))
    if o.pfdiff is not None:
        raise ValueError(f"PFDiff wraps a plain first-order step: {', '.join(sorted(opts))} do(es) not apply "
                         f"(method={method!r}, pfdiff={o.pfdiff})")
    builder_options(spec, o)  # raises for an option the method lacks and for an unknown variant


def _refuse_schedule_changing_keys(cfg: dict) -> None:
    bad = sorted(k for k in _SCHEDULE_CHANGING if cfg.get(k))
    if bad:
        raise ValueError(f"DEISFastScheduler does not support {', '.join(f'{k}=True' for k in bad)}: it would change "
                         "the sampling process. Set them to False (or use the original scheduler)")


def _refuse_ve_config(cfg: dict) -> None:
    """A sigma range without betas is a VE / EDM scheduler (ScoreSdeVe, EDMEuler, ...): not a discrete VP one."""
    if cfg.get("sigma_max") is not None and "beta_start" not in cfg and cfg.get("trained_betas") is None:
        name = cfg.get("_class_name", "this scheduler")
        raise ValueError(f"{name}'s config describes a VE / EDM noise schedule (sigma_min={cfg.get('sigma_min')}, "
                         f"sigma_max={cfg['sigma_max']}, no betas); DEISFastScheduler supports discrete VP (DDPM-style "
                         "betas) schedules only. For VE models use deis_fast.sample(..., schedule="
                         "deis_fast.VESchedule(sigma_min, sigma_max)) or deis_fast.integrations.k_diffusion")
