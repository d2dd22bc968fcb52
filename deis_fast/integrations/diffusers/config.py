"""How ``DEISFastScheduler`` reads the configs of the schedulers it replaces: one table, :data:`KEYS`.

Every config key of the four source schedulers (``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``,
``DEISMultistepScheduler``, ``FlowMatchEulerDiscreteScheduler``) has one row saying what happens to it:

* ``schedule`` -- the noise process (betas, prediction type, zero terminal SNR): honoured by the deis_fast schedule;
* ``spacing`` -- where the run's timesteps and sigmas lie: with ``grid="diffusers"`` they are the source
  scheduler's own ``set_timesteps`` result (diffusers computes them: every spacing key has diffusers' exact
  meaning, whatever the version); other grids take the ``use_*_sigmas`` switches as deis_fast grids;
* ``final`` -- the order of the last steps (``lower_order_final``, ``euler_at_final``): a plan option;
* ``output`` -- the conversion of the model output (thresholding, the learned-variance split);
* ``solver`` -- which solver runs (``solver_order``, ``algorithm_type``, ...): replaced by ``method=``;
* ``refused`` -- not reproducible by a deis_fast plan: a config that sets one raises, naming it.

So honouring a new key is one row here (and, for a spacing key, nothing else: the source computes it).
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["KEYS", "SOURCES", "Row", "source_of", "source_times", "final_orders", "clamps_zero_snr",
           "refused_keys", "LEARNED_VARIANCE", "split_learned_variance", "equivalent_method", "warn_ignored"]

DPM, UNIPC, DEIS, FLOWMATCH = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                               "FlowMatchEulerDiscreteScheduler")
SOURCES = (DPM, UNIPC, DEIS, FLOWMATCH)
ALL = SOURCES
MULTISTEP = (DPM, UNIPC, DEIS)
LEARNED_VARIANCE = ("learned", "learned_range")
ZERO_SNR_CLAMP = 2.0 ** -24


@dataclass(frozen=True)
class Row:
    kind: str                     # schedule | spacing | final | output | solver | refused
    sources: tuple[str, ...]      # the source schedulers that document the key
    handling: str                 # what deis_fast does with it (README's equivalence table)


def _row(kind: str, handling: str, sources: tuple[str, ...] = ALL) -> Row:
    return Row(kind, sources, handling)


KEYS: dict[str, Row] = {
    # the noise process
    "num_train_timesteps": _row("schedule", "the training schedule"),
    "beta_start": _row("schedule", "the training schedule", MULTISTEP),
    "beta_end": _row("schedule", "the training schedule", MULTISTEP),
    "beta_schedule": _row("schedule", "the training schedule", MULTISTEP),
    "trained_betas": _row("schedule", "the training schedule (any length)", MULTISTEP),
    "prediction_type": _row("schedule", "the model output's conversion", MULTISTEP),
    "rescale_betas_zero_snr": _row("schedule", "zero terminal SNR; an epsilon model gets alphas_cumprod[-1] = 2**-24 "
                                   "as in DPM-Solver and UniPC, with a warning", (DPM, UNIPC)),
    # where the timesteps and sigmas lie (grid="diffusers": the source's own set_timesteps)
    "timestep_spacing": _row("spacing", "linspace / leading / trailing", MULTISTEP),
    "steps_offset": _row("spacing", "with leading spacing", MULTISTEP),
    "use_karras_sigmas": _row("spacing", "Karras sigmas (other grids: the karras grid)"),
    "use_exponential_sigmas": _row("spacing", "log-uniform sigmas (other grids: logsnr)"),
    "use_beta_sigmas": _row("spacing", "Beta-quantile sigmas (other grids: beta)"),
    "beta_alpha": _row("spacing", "parameter of use_beta_sigmas", (FLOWMATCH,)),
    "beta_beta": _row("spacing", "parameter of use_beta_sigmas", (FLOWMATCH,)),
    "use_lu_lambdas": _row("spacing", "uniform-lambda sigmas (other grids: logsnr)", (DPM,)),
    "lambda_min_clipped": _row("spacing", "caps the first timestep (other grids start there too)", (DPM,)),
    "final_sigmas_type": _row("spacing", "the last sigma: sigma_min or zero", MULTISTEP),
    "sigma_min": _row("spacing", "Karras range of flow sigmas", (UNIPC,)),
    "sigma_max": _row("spacing", "Karras range of flow sigmas", (UNIPC,)),
    "use_flow_sigmas": _row("spacing", "flow matching (x = (1 - t) x0 + t noise)", MULTISTEP),
    "flow_shift": _row("spacing", "the flow shift", MULTISTEP),
    "shift": _row("spacing", "the flow shift", (FLOWMATCH,)),
    "use_dynamic_shifting": _row("spacing", "FLUX's mu from set_timesteps", (DPM, UNIPC, FLOWMATCH)),
    "base_shift": _row("spacing", "kept for the pipeline, which computes mu", (FLOWMATCH,)),
    "max_shift": _row("spacing", "kept for the pipeline, which computes mu", (FLOWMATCH,)),
    "base_image_seq_len": _row("spacing", "kept for the pipeline, which computes mu", (FLOWMATCH,)),
    "max_image_seq_len": _row("spacing", "kept for the pipeline, which computes mu", (FLOWMATCH,)),
    "time_shift_type": _row("spacing", "exponential / linear time shift", (DPM, UNIPC, FLOWMATCH)),
    "shift_terminal": _row("spacing", "stretch to the last sigma", (UNIPC, FLOWMATCH)),
    # the last steps' order
    "lower_order_final": _row("final", "the source's rule (DPM-Solver / DEIS: below 15 steps; UniPC: always) "
                              "with grid='diffusers'; off on deis_fast grids unless set", MULTISTEP),
    "euler_at_final": _row("final", "first-order last step", (DPM,)),
    # the model output
    "thresholding": _row("output", "dynamic thresholding of the x0 prediction", MULTISTEP),
    "dynamic_thresholding_ratio": _row("output", "its quantile, 0..1", MULTISTEP),
    "sample_max_value": _row("output", "its upper clamp, any value > 0", MULTISTEP),
    "variance_type": _row("output", "learned / learned_range: the first half of the output channels is used",
                          (DPM,)),
    # the solver: replaced by method= (see equivalent_method)
    "solver_order": _row("solver", "method=: logrho{k}, dpmpp_2m / dpmpp_3m, unipc{k}", MULTISTEP),
    "algorithm_type": _row("solver", "method=: dpmpp_*, dpmpp_2m_sde, logrho*", (DPM, DEIS)),
    "solver_type": _row("solver", "method= (dpmpp2 for heun) or variant= (bh1 / bh2)", MULTISTEP),
    "predict_x0": _row("solver", "method=unipc* (predict_x0=False is UniPC's eps form: not available)", (UNIPC,)),
    "disable_corrector": _row("solver", "the same key of unipc* (and corrector=True methods)", (UNIPC,)),
    # not reproducible by a plan
    "solver_p": _row("refused", "an external first-order solver inside UniPC", (UNIPC,)),
    "invert_sigmas": _row("refused", "a different process", (FLOWMATCH,)),
    "stochastic_sampling": _row("refused", "a different process", (FLOWMATCH,)),
}


def keys_of(kind: str) -> tuple[str, ...]:
    return tuple(k for k, r in KEYS.items() if r.kind == kind)


def source_of(config: Mapping[str, Any], instance: Any = None) -> str | None:
    """The source scheduler a config comes from (one of :data:`SOURCES`), else None: its ``_class_name``, the class
    of the scheduler instance passed, a DEISFastScheduler config's ``source_scheduler``, or (in-memory configs carry
    no class name) the keys only that scheduler has."""
    name = config.get("_class_name") or (type(instance).__name__ if instance is not None else None)
    if name == "DEISFastScheduler" or "method" in config:
        return config.get("source_scheduler")
    if name:
        return name if name in SOURCES else None
    if any(k in config for k in ("shift", "invert_sigmas", "stochastic_sampling")) and "beta_start" not in config:
        return FLOWMATCH
    if "predict_x0" in config or "solver_p" in config:
        return UNIPC
    if "euler_at_final" in config or "use_lu_lambdas" in config:
        return DPM
    if config.get("algorithm_type") == "deis":
        return DEIS
    return None


def refused_keys(config: Mapping[str, Any]) -> list[str]:
    """The ``refused`` keys a config sets (a value that changes what the source scheduler does)."""
    return sorted(k for k in keys_of("refused") if config.get(k))


def _source_class(name: str | None, flow: bool) -> Any:
    import diffusers
    return getattr(diffusers, name or (FLOWMATCH if flow else DPM))


def spacing_defaults(source: str) -> dict[str, Any]:
    """The source scheduler's defaults of its spacing keys (what its config means where it leaves them out)."""
    params = inspect.signature(_source_class(source, False).__init__).parameters
    return {k: p.default for k, p in params.items() if k in KEYS and KEYS[k].kind == "spacing"
            and p.default is not inspect.Parameter.empty}


def source_times(config: Mapping[str, Any], n: int, flow: bool, mu: float | None = None,
                 sigmas: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(timesteps, sigmas) of the source scheduler's ``set_timesteps(n)`` (its sigmas end with the final one):
    the source scheduler (``config["source_scheduler"]``; DPM-Solver for VP configs without one, FlowMatchEuler
    for flow configs) built from the config's keys it takes. None when it cannot take the pipeline's ``sigmas``."""
    cls = _source_class(config.get("source_scheduler"), flow)
    params = inspect.signature(cls.__init__).parameters
    kw = {k: config[k] for k in params if k in config and config[k] is not None and k in KEYS
          and KEYS[k].kind in ("schedule", "spacing")}
    call = inspect.signature(cls.set_timesteps).parameters
    extra: dict[str, Any] = {}
    if sigmas is not None:
        if "sigmas" not in call:
            return None
        extra["sigmas"] = np.asarray(sigmas, dtype=np.float64)
    if mu is not None and config.get("use_dynamic_shifting"):
        extra["mu"] = float(mu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = cls(**kw)
        src.set_timesteps(None if sigmas is not None else n, **extra)
    return src.timesteps.double().numpy(), src.sigmas.double().numpy()


def final_orders(source: str | None, lower_order_final: bool, euler_at_final: bool, n_timesteps: int,
                 noop_tail: bool) -> bool | tuple[int, ...]:
    """The plan option ``lower_order_final`` that reproduces the source scheduler's order on its last steps for a
    run of ``n_timesteps`` calls: DPM-Solver / DEIS lower the last two steps below 15 steps, UniPC always
    (order <= steps left), ``euler_at_final`` makes the last step first order. ``noop_tail``: the run's last
    step has zero length (Karras-type sigmas ending at sigma_min): first order there, where the source's step is
    the identity (or nan, for its higher orders)."""
    if source == UNIPC:
        caps: bool | tuple[int, ...] = bool(lower_order_final)
    elif lower_order_final and n_timesteps < 15:
        caps = True
    else:
        caps = (1,) if euler_at_final else False
    if noop_tail and caps is not True:
        caps = (1,)
    return caps


def clamps_zero_snr(prediction: str) -> bool:
    """Whether ``rescale_betas_zero_snr`` keeps alphas_cumprod[-1] > 0: for an epsilon model, which says nothing
    about x0 at alpha = 0 (diffusers' DPM-Solver and UniPC clamp it to 2**-24 for every model; with
    ``grid="diffusers"`` their sigmas, 2**-24 included, are used as they are, so the exact zero-SNR schedule
    serves v-prediction models there too)."""
    return prediction == "eps"


def clamped_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """alphas_cumprod[-1] = 2**-24, as diffusers clamps it; where that would exceed alphas_cumprod[-2] (linear
    betas: diffusers' clamped schedule is not monotone there) half of alphas_cumprod[-2]."""
    ac = np.array(alphas_cumprod, dtype=np.float64)
    ac[-1] = ZERO_SNR_CLAMP if ZERO_SNR_CLAMP < ac[-2] else 0.5 * ac[-2]
    return ac


def noise_dtype(source: str | None) -> Any:
    """The dtype the source scheduler draws its step noise in (DPM-Solver's SDE variants: float32, whatever the
    sample's), so that a generator gives the same noise; None: the sample's."""
    import torch
    return torch.float32 if source == DPM else None


def split_learned_variance(model_output: Any, sample: Any, variance_type: str | None) -> Any:
    """A learned-variance model's output (2C channels: the prediction, then the variance): its first C channels,
    as diffusers' DPM-Solver takes them. Anything else unchanged."""
    if (variance_type in LEARNED_VARIANCE and model_output.ndim >= 2 and sample.ndim >= 2
            and model_output.shape[1] == 2 * sample.shape[1]):
        return model_output[:, :sample.shape[1]]
    return model_output


def lambda_clip_start(alphas_cumprod: np.ndarray, lambda_min_clipped: float) -> float | None:
    """The first timestep DPM-Solver allows under ``lambda_min_clipped`` (None when it clips nothing)."""
    if lambda_min_clipped is None or not math.isfinite(float(lambda_min_clipped)):
        return None
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lam = 0.5 * (np.log(ac) - np.log1p(-ac))
    clipped = int(np.searchsorted(lam[::-1], float(lambda_min_clipped)))
    return float(ac.size - clipped - 1)


# --- the solver keys: replaced by method= ---------------------------------------------------------------------
def equivalent_method(config: dict) -> str | None:
    """The deis_fast method running the same update as the DEIS / DPM-Solver++ / UniPC multistep scheduler
    that ``config`` describes (recognized by its ``algorithm_type`` / ``solver_type``), else None."""
    algo, k = config.get("algorithm_type"), config.get("solver_order")
    if algo == "deis" and k in (1, 2, 3):
        return f"logrho{k}"
    if algo == "dpmsolver++" and k in (1, 2, 3):
        return {1: "dpmpp1", 2: "dpmpp2" if config.get("solver_type") == "heun" else "dpmpp_2m", 3: "dpmpp_3m"}[k]
    if algo == "sde-dpmsolver++" and k in (1, 2):
        return {1: "dpmpp_1m_sde", 2: "dpmpp_2m_sde"}[k]
    if algo == "dpmsolver" and k in (1, 2, 3):
        return f"dpmsolver{k}"
    if algo == "sde-dpmsolver" and k in (1, 2):
        return f"sde_dpmsolver{k}"
    if config.get("solver_type") in ("bh1", "bh2") and config.get("predict_x0", True) and k in (1, 2, 3):
        return f"unipc{k}"  # UniPCMultistepScheduler
    return None


def source_defaults(class_name: Any, config: dict) -> list[dict]:
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


# dropped without a warning: how the source scheduler warms up its own multistep solver (PNDM's Runge-Kutta steps;
# every Stable Diffusion config sets skip_prk_steps=True), which method= replaces whatever its value
SILENT_KEYS = frozenset({"skip_prk_steps"})


def set_by_user(keys: dict, class_name: Any, config: dict) -> dict:
    """The keys whose values differ from the source scheduler's defaults (deliberate choices that would change
    what that scheduler does); all of them when the source class cannot be told."""
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    sources = source_defaults(class_name, config)
    return {k: v for k, v in keys.items()
            if not any(k in d and norm(d[k]) == norm(v) for d in sources)}


def warn_ignored(keys: dict, stacklevel: int, config: dict | None = None) -> None:
    names = ", ".join(f"{k}={keys[k]!r}" for k in sorted(keys))
    same = equivalent_method(config or {})
    with_variant = ("unipc1", "unipc2", "unipc3", "dpmpp_2m_sde", "dpmsolver2", "sde_dpmsolver2")
    variant = (config or {}).get("solver_type") if same in with_variant else None
    extra = f", variant={variant!r}" if variant in ("bh1", "heun") else ""
    hint = f"; method={same!r}{extra} runs the same update as that scheduler" if same else ""
    warnings.warn(f"DEISFastScheduler ignores the config keys {names}: deis_fast picks its solver with the method= "
                  f"argument{hint}.", UserWarning, stacklevel=stacklevel)
