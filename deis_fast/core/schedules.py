"""Noise schedules: x_t = alpha(t) * x_0 + sigma(t) * eps, evaluated in float64 on the host.

Every schedule exposes alpha, sigma, rho = sigma/alpha, lam = -log(rho), their inverses
t_from_rho / t_from_lambda, the valid time range [t_min, t_max], and ``model_time(t)``: the
time input the network was trained with (discrete index units, continuous t, or sigma).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

ArrayLike = Any

__all__ = ["Schedule", "VPSchedule", "VESchedule", "FlowSchedule", "schedule_from_diffusers_config", "shift_times",
           "flux_mu", "flow_schedule_from_diffusers_config", "rescale_zero_terminal_snr"]


def _sqrt_roundoff(v: np.ndarray) -> np.ndarray:
    """sqrt of a variance-like quantity; a rounding-level negative (log alpha = +1e-20 at the rho = 0 end,
    reached by inverting rho) is 0, a real negative stays NaN."""
    return np.sqrt(np.where((v < 0.0) & (v > -1e-12), 0.0, v))


def _f64(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _alpha_from_rho(rho: np.ndarray) -> np.ndarray:
    return 1.0 / np.sqrt(1.0 + rho * rho)


class Schedule:
    """Base class. Subclasses define ``log_alpha`` and ``rho`` (and their inverses)."""

    t_min: float
    t_max: float
    discrete: bool = False
    variance_preserving: bool = True

    # --- subclass interface -------------------------------------------------
    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def rho(self, t: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def t_from_rho(self, rho: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def model_time(self, t: ArrayLike) -> np.ndarray:
        """The network's own time input for schedule time ``t``."""
        return _f64(t)

    def t_from_model_time(self, mt: ArrayLike) -> np.ndarray:
        """Inverse of :meth:`model_time`."""
        return _f64(mt)

    def knots(self, t_lo: float, t_hi: float) -> np.ndarray:
        """Points strictly inside (t_lo, t_hi) where the schedule is not smooth (for quadrature)."""
        return np.empty(0)

    # --- derived quantities ---------------------------------------------------
    def alpha(self, t: ArrayLike) -> np.ndarray:
        return np.exp(self.log_alpha(t))

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return self.alpha(t) * self.rho(t)

    def lam(self, t: ArrayLike) -> np.ndarray:
        """Half log-SNR: lambda = log(alpha / sigma) = -log(rho)."""
        with np.errstate(divide="ignore"):
            return -np.log(self.rho(t))

    def t_from_lambda(self, lam: ArrayLike) -> np.ndarray:
        return self.t_from_rho(np.exp(-_f64(lam)))

    def alpha_from_rho(self, rho: ArrayLike) -> np.ndarray:
        """alpha as a function of rho (1 for VE, 1/sqrt(1+rho^2) for VP; 0 at rho = inf)."""
        rho = _f64(rho)
        return _alpha_from_rho(rho) if self.variance_preserving else np.ones_like(rho)

    def sigma_from_rho(self, rho: ArrayLike) -> np.ndarray:
        """sigma as a function of rho, finite at rho = inf (where alpha = 0)."""
        rho = _f64(rho)
        with np.errstate(invalid="ignore"):
            return np.where(np.isinf(rho), 1.0, self.alpha_from_rho(rho) * rho)

    def grid_transform(self, t: ArrayLike, inverse: bool = False) -> np.ndarray:
        """Applied to every named grid (identity here; the SD3/FLUX shift for :class:`FlowSchedule`)."""
        return _f64(t)

    @property
    def starts_at_pure_noise(self) -> bool:
        """True when alpha(t_max) = 0 (flow matching, zero terminal SNR): rho = inf at the start."""
        return bool(self.alpha(self.t_max) == 0.0)

    @property
    def rho_min(self) -> float:
        return float(self.rho(self.t_min))

    @property
    def rho_max(self) -> float:
        return float(self.rho(self.t_max))

    def check_times(self, t: ArrayLike, what: str = "time") -> None:
        t = _f64(t)
        lo, hi = self.t_min, self.t_max
        tol = 1e-9 * max(1.0, abs(hi))
        bad = (t < lo - tol) | (t > hi + tol) | ~np.isfinite(t)
        if np.any(bad):
            raise ValueError(f"{what} {t[bad][:5].tolist()} outside the schedule's range [{lo}, {hi}] "
                             f"of {self!r}; pass t_start/t_end inside it")


class VPSchedule(Schedule):
    """Variance-preserving schedule (alpha^2 + sigma^2 = 1): discrete DDPM, continuous linear, cosine."""

    variance_preserving = True

    def __init__(self, kind: str, *, alphas_cumprod: ArrayLike | None = None, beta_min: float = 0.1,
                 beta_max: float = 20.0, cosine_s: float = 0.008, t_min: float | None = None,
                 t_max: float | None = None, name: str | None = None):
        self.kind = kind
        self.name = name or kind
        if kind == "discrete":
            ac = _f64(alphas_cumprod)
            if ac.ndim != 1 or ac.size < 2 or not np.all(np.isfinite(ac)) or np.any(ac[:-1] <= 0) or ac[-1] < 0 \
                    or np.any(ac > 1) or np.any(np.diff(ac) > 0):
                raise ValueError("alphas_cumprod must be a 1-D, non-increasing sequence in (0, 1] of length >= 2 "
                                 "(only the last value may be 0: zero terminal SNR)")
            self.alphas_cumprod = ac
            self.num_train_timesteps = ac.size
            # zero terminal SNR (alphas_cumprod[-1] = 0): alpha, not log alpha, is linear on the last interval
            self.zero_terminal_snr = bool(ac[-1] == 0.0)
            with np.errstate(divide="ignore"):
                self._log_alpha_grid = 0.5 * np.log(ac)  # log alpha at integer t
            self.discrete = True
            self.t_min = 0.0 if t_min is None else float(t_min)
            self.t_max = float(ac.size - 1) if t_max is None else float(t_max)
        elif kind == "linear":
            self.beta_min, self.beta_max = float(beta_min), float(beta_max)
            if not (math.isfinite(self.beta_min) and math.isfinite(self.beta_max) and self.beta_min >= 0
                    and self.beta_max > 0):
                raise ValueError(f"need finite beta_min >= 0 and beta_max > 0, got {beta_min}, {beta_max}")
            self.t_min = 1e-3 if t_min is None else float(t_min)
            self.t_max = 1.0 if t_max is None else float(t_max)
        elif kind == "cosine":
            self.cosine_s = float(cosine_s)
            if not (math.isfinite(self.cosine_s) and self.cosine_s >= 0):
                raise ValueError(f"cosine offset s must be finite and >= 0, got {cosine_s}")
            self._cos_beta_max = 999.0
            self.t_min = 1e-3 if t_min is None else float(t_min)
            # as in DPM-Solver: stop before alpha reaches 0
            self.t_max = 0.9946 if t_max is None else float(t_max)
            self._log_alpha_0 = math.log(math.cos(self.cosine_s / (1.0 + self.cosine_s) * math.pi / 2.0))
        else:
            raise ValueError(f"unknown VP schedule kind {kind!r}; use 'discrete', 'linear' or 'cosine'")
        if not (math.isfinite(self.t_min) and math.isfinite(self.t_max) and self.t_min < self.t_max):
            raise ValueError(f"need finite t_min < t_max, got {self.t_min}, {self.t_max}")
        with np.errstate(over="ignore", invalid="ignore"):
            rho_max = float(self.rho(self.t_max))
        if not np.isfinite(rho_max) and not (self.discrete and self.zero_terminal_snr):
            raise ValueError(f"{self!r}: sigma/alpha at t_max={self.t_max} overflows float64 (alpha underflows); "
                             "lower beta_max / t_max")

    # --- constructors ---------------------------------------------------------
    @classmethod
    def discrete(cls, preset: str = "linear", num_train_timesteps: int = 1000, beta_start: float | None = None,
                 beta_end: float | None = None) -> "VPSchedule":
        """Discrete DDPM schedule from a preset name: 'linear', 'scaled_linear' or 'squaredcos_cap_v2'."""
        return cls.from_betas(_betas_preset(preset, num_train_timesteps, beta_start, beta_end), name=preset)

    @classmethod
    def from_betas(cls, betas: ArrayLike, name: str = "custom") -> "VPSchedule":
        b = _f64(betas)
        if b.ndim != 1 or not np.all(np.isfinite(b)) or np.any(b <= 0) or np.any(b >= 1):
            raise ValueError("betas must be a 1-D sequence with every value in (0, 1)")
        return cls("discrete", alphas_cumprod=np.cumprod(1.0 - b), name=name)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: ArrayLike, name: str = "custom") -> "VPSchedule":
        return cls("discrete", alphas_cumprod=alphas_cumprod, name=name)

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0) -> "VPSchedule":
        """Continuous VP-SDE with linear beta(t) (Song et al.), t in [t_min, 1]."""
        return cls("linear", beta_min=beta_min, beta_max=beta_max, t_min=t_min, t_max=t_max)

    @classmethod
    def cosine(cls, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> "VPSchedule":
        """Continuous cosine schedule of improved DDPM, t in [t_min, 0.9946]."""
        return cls("cosine", cosine_s=s, t_min=t_min, t_max=t_max)

    def __repr__(self) -> str:
        if self.kind == "discrete":
            return f"VPSchedule.discrete({self.name!r}, N={self.num_train_timesteps})"
        if self.kind == "linear":
            return f"VPSchedule.linear(beta_min={self.beta_min}, beta_max={self.beta_max})"
        return f"VPSchedule.cosine(s={self.cosine_s})"

    # --- math -----------------------------------------------------------------
    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        t = _f64(t)
        if self.kind == "discrete":
            n = self.num_train_timesteps
            # piecewise linear in t between integers; linear extrapolation just outside [0, N-1]
            g = self._log_alpha_grid
            idx = np.clip(np.floor(t), 0, n - 2).astype(np.int64)
            w = t - idx
            if not self.zero_terminal_snr:
                return g[idx] * (1.0 - w) + g[idx + 1] * w
            last = idx == n - 2
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(last, g[n - 2] + np.log(np.maximum(1.0 - w, 0.0)),
                                g[idx] * (1.0 - w) + g[np.minimum(idx + 1, n - 2)] * w)
        if self.kind == "linear":
            return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self.cosine_s
        return np.log(np.cos((t + s) / (1.0 + s) * math.pi / 2.0)) - self._log_alpha_0

    def rho(self, t: ArrayLike) -> np.ndarray:
        return _sqrt_roundoff(np.expm1(-2.0 * self.log_alpha(t)))

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return _sqrt_roundoff(-np.expm1(2.0 * self.log_alpha(t)))

    def t_from_log_alpha(self, la: ArrayLike) -> np.ndarray:
        la = _f64(la)
        if self.kind == "discrete":
            g = self._log_alpha_grid  # decreasing in t
            n = g.size
            # locate segment: g[idx] >= la >= g[idx+1]
            idx = np.searchsorted(-g, -la, side="right") - 1
            idx = np.clip(idx, 0, n - 2)
            d = g[idx + 1] - g[idx]
            with np.errstate(divide="ignore", invalid="ignore"):
                w = np.where(d != 0, (la - g[idx]) / d, 0.0)
                if self.zero_terminal_snr:  # alpha linear on the last interval
                    w = np.where(idx == n - 2, 1.0 - np.exp(la - g[n - 2]), w)
            return idx + w
        if self.kind == "linear":
            a = 0.25 * (self.beta_max - self.beta_min)
            b = 0.5 * self.beta_min
            # a t^2 + b t + la = 0, positive root, written to avoid cancellation
            return (-2.0 * la) / (b + np.sqrt(b * b - 4.0 * a * la))
        s = self.cosine_s
        return 2.0 * (1.0 + s) / math.pi * np.arccos(np.exp(la + self._log_alpha_0)) - s

    def t_from_rho(self, rho: ArrayLike) -> np.ndarray:
        rho = _f64(rho)
        return self.t_from_log_alpha(-0.5 * np.log1p(rho * rho))

    def knots(self, t_lo: float, t_hi: float) -> np.ndarray:
        if self.kind != "discrete":
            return np.empty(0)
        lo, hi = min(t_lo, t_hi), max(t_lo, t_hi)
        k = np.arange(math.floor(lo) + 1, math.ceil(hi), dtype=np.float64)
        return k[(k > lo) & (k < hi)]


class VESchedule(Schedule):
    """Variance-exploding schedule (alpha = 1, rho = sigma).

    ``VESchedule(sigma_min, sigma_max)`` is EDM-style: the time variable *is* sigma (t = sigma),
    and the model is called with sigma. ``VESchedule.smld(...)`` is the SMLD/NCSN form
    sigma(t) = sigma_min * (sigma_max / sigma_min) ** t on t in [0, 1], model called with sigma.
    ``sigma_min = 0`` is allowed for the EDM form so that a grid may end at sigma = 0.
    """

    variance_preserving = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, *, geometric: bool = False,
                 model_time: str = "sigma"):
        if not (0.0 <= sigma_min < sigma_max) or not math.isfinite(sigma_max):
            raise ValueError(f"need 0 <= sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        if sigma_max > 1e30:
            raise ValueError(f"sigma_max={sigma_max} is absurdly large (limit 1e30): sigma^2 would overflow")
        if geometric and sigma_min <= 0:
            raise ValueError("the geometric VE schedule needs sigma_min > 0")
        if model_time not in ("sigma", "t"):
            raise ValueError("model_time must be 'sigma' or 't'")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.geometric = geometric
        self._model_time = model_time
        if geometric:
            self.t_min, self.t_max = 0.0, 1.0
            self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        else:
            self.t_min, self.t_max = self.sigma_min, self.sigma_max

    @classmethod
    def smld(cls, sigma_min: float = 0.01, sigma_max: float = 50.0, model_time: str = "sigma") -> "VESchedule":
        """SMLD / NCSN++ geometric schedule sigma(t) = sigma_min (sigma_max/sigma_min)^t, t in [0, 1]."""
        return cls(sigma_min, sigma_max, geometric=True, model_time=model_time)

    def __repr__(self) -> str:
        kind = ", geometric=True" if self.geometric else ""
        return f"VESchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}{kind})"

    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        return np.zeros_like(_f64(t))

    def alpha(self, t: ArrayLike) -> np.ndarray:
        return np.ones_like(_f64(t))

    def rho(self, t: ArrayLike) -> np.ndarray:
        t = _f64(t)
        if self.geometric:
            return self.sigma_min * np.exp(t * self._log_ratio)
        return t.copy()

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return self.rho(t)

    def t_from_rho(self, rho: ArrayLike) -> np.ndarray:
        rho = _f64(rho)
        if self.geometric:
            with np.errstate(divide="ignore"):
                return np.log(rho / self.sigma_min) / self._log_ratio
        return rho.copy()

    def model_time(self, t: ArrayLike) -> np.ndarray:
        return self.sigma(t) if self._model_time == "sigma" else _f64(t)

    def t_from_model_time(self, mt: ArrayLike) -> np.ndarray:
        return self.t_from_rho(mt) if self._model_time == "sigma" else _f64(mt)


def shift_times(t: ArrayLike, shift: float) -> np.ndarray:
    """SD3 time shift ``t' = s t / (1 + (s - 1) t)`` (= rho' = s rho). FLUX's dynamic shift with ``mu`` is
    ``shift = exp(mu)``: ``e^mu / (e^mu + 1/t - 1)`` is the same map."""
    t = _f64(t)
    return shift * t / (1.0 + (shift - 1.0) * t)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's dynamic-shift mu from the image token count: linear from base_shift at base_seq_len to
    max_shift at max_seq_len (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * m + base_shift - m * base_seq_len)


class FlowSchedule(Schedule):
    """Flow matching / rectified flow: x_t = (1 - t) x_0 + t eps on t in [0, 1] (SD3, FLUX, Wan, ...).

    alpha = 1 - t, sigma = t, rho = t / (1 - t) (inf at t = 1, where sampling starts). The network is
    called with ``time_scale * t`` (1000: diffusers' FlowMatch timesteps; 1: t itself). ``shift`` (SD3)
    or ``mu`` (FLUX dynamic shift, shift = e^mu) is a transform of the named grids, not of the process.
    """

    variance_preserving = False
    t_min, t_max = 0.0, 1.0

    def __init__(self, shift: float = 1.0, time_scale: float = 1000.0, *, mu: float | None = None):
        if mu is not None:
            if shift != 1.0:
                raise ValueError("give either shift or mu (FLUX dynamic shift, shift = exp(mu)), not both")
            if not math.isfinite(mu):
                raise ValueError(f"mu must be finite, got {mu}")
            shift = math.exp(mu)
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift}")
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be a finite number > 0, got {time_scale}")
        self.shift, self.time_scale, self.mu = float(shift), float(time_scale), mu

    @classmethod
    def flux(cls, image_seq_len: int | None = None, mu: float | None = None, time_scale: float = 1000.0,
             **shift_config: float) -> "FlowSchedule":
        """FLUX's dynamic shift: ``mu`` given, or computed from ``image_seq_len`` (see :func:`flux_mu`)."""
        if (mu is None) == (image_seq_len is None):
            raise ValueError("FlowSchedule.flux needs exactly one of mu or image_seq_len")
        return cls(time_scale=time_scale, mu=flux_mu(int(image_seq_len), **shift_config) if mu is None else mu)

    def with_time_scale(self, time_scale: float) -> "FlowSchedule":
        """The same schedule (shift, or FLUX ``mu``) with another network-time scale (1: ComfyUI's sigma)."""
        if self.mu is not None:
            return FlowSchedule(time_scale=time_scale, mu=self.mu)
        return FlowSchedule(self.shift, time_scale=time_scale)

    def __repr__(self) -> str:
        sh = f"mu={self.mu}" if self.mu is not None else f"shift={self.shift}"
        return f"FlowSchedule({sh}, time_scale={self.time_scale})"

    def alpha(self, t: ArrayLike) -> np.ndarray:
        return 1.0 - _f64(t)

    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log1p(-_f64(t))

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return _f64(t).copy()

    def rho(self, t: ArrayLike) -> np.ndarray:
        t = _f64(t)
        with np.errstate(divide="ignore"):
            return t / (1.0 - t)

    def t_from_rho(self, rho: ArrayLike) -> np.ndarray:
        rho = _f64(rho)
        with np.errstate(invalid="ignore"):
            return np.where(np.isinf(rho), 1.0, rho / (1.0 + rho))

    def alpha_from_rho(self, rho: ArrayLike) -> np.ndarray:
        return 1.0 / (1.0 + _f64(rho))

    def sigma_from_rho(self, rho: ArrayLike) -> np.ndarray:
        return self.t_from_rho(rho)

    def model_time(self, t: ArrayLike) -> np.ndarray:
        return self.time_scale * _f64(t)

    def t_from_model_time(self, mt: ArrayLike) -> np.ndarray:
        return _f64(mt) / self.time_scale

    def grid_transform(self, t: ArrayLike, inverse: bool = False) -> np.ndarray:
        if self.shift == 1.0:
            return _f64(t)
        return shift_times(t, 1.0 / self.shift if inverse else self.shift)


def flow_schedule_from_diffusers_config(config: Mapping[str, Any], mu: float | None = None) -> FlowSchedule:
    """The :class:`FlowSchedule` of a diffusers flow config: FlowMatchEuler/Heun (``shift``,
    ``use_dynamic_shifting`` with ``mu`` as the pipeline passes it, ``time_shift_type``) or DEIS / DPM-Solver++ /
    UniPC with ``use_flow_sigmas=True`` and ``flow_shift``. Raises on keys it would get wrong."""
    cfg = dict(config)
    pred = cfg.get("prediction_type", "flow_prediction")
    if pred != "flow_prediction":
        raise ValueError(f"a flow-matching config needs prediction_type='flow_prediction', got {pred!r}; the model "
                         "predicts the velocity eps - x0")
    if cfg.get("shift_terminal") or cfg.get("invert_sigmas") or cfg.get("stochastic_sampling"):
        raise ValueError("shift_terminal / invert_sigmas / stochastic_sampling are not supported; build a "
                         "FlowSchedule and pass the sigmas as an explicit grid")
    scale = float(cfg.get("num_train_timesteps", 1000))
    if cfg.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError("use_dynamic_shifting=True needs mu (FLUX pipelines pass mu = calculate_shift(image "
                             "token count); deis_fast.core.schedules.flux_mu computes it)")
        kind = cfg.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise ValueError(f"unknown time_shift_type {kind!r}; use 'exponential' or 'linear'")
        return FlowSchedule(time_scale=scale, mu=mu) if kind == "exponential" else FlowSchedule(float(mu), scale)
    if mu is not None:
        raise ValueError("mu was given but use_dynamic_shifting=False: the config's static shift applies; pass "
                         "use_dynamic_shifting=True or drop mu")
    return FlowSchedule(_static_shift(cfg), scale)


def _static_shift(cfg: Mapping[str, Any]) -> float:
    """The SD3 shift of a config: FlowMatch's ``shift`` or the multistep schedulers' ``flow_shift`` (one name each;
    a config carrying both must not disagree)."""
    shift, flow_shift = float(cfg.get("shift", 1.0)), float(cfg.get("flow_shift", 1.0))
    if shift != 1.0 and flow_shift != 1.0 and shift != flow_shift:
        raise ValueError(f"shift={shift} and flow_shift={flow_shift} both set the SD3 time shift (FlowMatch and "
                         "multistep schedulers name it differently); give one of them")
    return shift if shift != 1.0 else flow_shift


def _betas_preset(preset: str, n: int, beta_start: float | None, beta_end: float | None) -> np.ndarray:
    if preset == "linear":
        return np.linspace(beta_start or 1e-4, beta_end or 0.02, n, dtype=np.float64)
    if preset == "scaled_linear":
        return np.linspace((beta_start or 0.00085) ** 0.5, (beta_end or 0.012) ** 0.5, n, dtype=np.float64) ** 2
    if preset == "squaredcos_cap_v2":
        def abar(u: np.ndarray) -> np.ndarray:
            return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        i = np.arange(n, dtype=np.float64)
        return np.minimum(1.0 - abar((i + 1) / n) / abar(i / n), 0.999)
    raise ValueError(f"unknown beta schedule {preset!r}; use 'linear', 'scaled_linear' or 'squaredcos_cap_v2', "
                     "or VPSchedule.from_betas(...)")


def schedule_from_diffusers_config(config: Mapping[str, Any]) -> VPSchedule:
    """Build the discrete VP schedule described by a diffusers scheduler config (dict or FrozenDict)."""
    cfg = dict(config)
    n = int(cfg.get("num_train_timesteps", 1000))
    trained = cfg.get("trained_betas")
    if trained is not None:
        sched = VPSchedule.from_betas(np.asarray(trained, dtype=np.float64), name="trained_betas")
    else:
        preset = cfg.get("beta_schedule", "linear")
        sched = VPSchedule.discrete(preset, n, cfg.get("beta_start", 1e-4 if preset == "linear" else None),
                                    cfg.get("beta_end", 0.02 if preset == "linear" else None))
    if cfg.get("rescale_betas_zero_snr", False):
        sched = VPSchedule.from_alphas_cumprod(rescale_zero_terminal_snr(sched.alphas_cumprod),
                                               name=sched.name + "+zero_snr")
    return sched


def rescale_zero_terminal_snr(alphas_cumprod: ArrayLike) -> np.ndarray:
    """Lin et al. (2024): shift and scale sqrt(alphas_cumprod) so that the last value is 0 and the first is kept
    (diffusers' ``rescale_betas_zero_snr=True``)."""
    r = np.sqrt(_f64(alphas_cumprod))
    r0, rt = r[0], r[-1]
    out = ((r - rt) * (r0 / (r0 - rt))) ** 2
    out[-1] = 0.0
    return out


VPSchedule.from_diffusers_config = staticmethod(schedule_from_diffusers_config)  # type: ignore[attr-defined]


def schedule_fingerprint(schedule: Schedule) -> str:
    """A short, stable id of a schedule's process: its class, range, network-time map, shift and log-alpha.

    Saved grids, plans and tuned files carry it, so that loading one for another schedule is refused
    instead of silently mis-sampling (12 hex digits of a SHA-256 over values rounded to 10 digits).
    """
    import hashlib
    t = np.linspace(schedule.t_min, schedule.t_max, 65)
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = np.concatenate([schedule.log_alpha(t[:-1]), schedule.rho(t[:-1]), schedule.model_time(t),
                               [schedule.t_min, schedule.t_max, float(schedule.grid_transform(0.5))]])
    text = type(schedule).__name__ + ":" + ",".join(f"{v:.10g}" for v in vals)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
