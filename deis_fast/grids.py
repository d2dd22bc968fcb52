"""Time grids: N+1 decreasing times t_0 = t_start > ... > t_N = t_end for an N-step solver."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence, Union

import numpy as np

from .schedules import Schedule

GRIDS = ("time_uniform", "time_quadratic", "logsnr", "karras", "beta")
BETA_AB = (0.6, 0.6)  # Beta(a, b) of the "beta" grid (Lee et al., 2024; diffusers' use_beta_sigmas)
GridSpec = Union[str, Sequence[float], np.ndarray, Mapping[str, Sequence[float]]]

__all__ = ["GRIDS", "make_grid", "default_t_range", "validate_times", "grid_rho"]


# Grid names that need the model and calibration noise to be resolved (name -> resolver(model, schedule, method,
# nfe, calibration_noise, t_start, t_end, **kw) -> a grid with .method and .pfdiff). deis_fast.grid_opt registers
# "optimized"; the sampler looks names up here, so it never imports the optimizer.
MODEL_GRIDS: dict = {}

def default_t_range(schedule: Schedule, t_start: float | None, t_end: float | None) -> tuple[float, float]:
    """Fill in t_start / t_end: the schedule's full range unless given, validated."""
    ts = schedule.t_max if t_start is None else float(t_start)
    te = schedule.t_min if t_end is None else float(t_end)
    schedule.check_times(np.array([ts, te]), "t_start/t_end")
    if not ts > te:
        raise ValueError(f"t_start ({ts}) must be greater than t_end ({te}): sampling runs from noise to data")
    return ts, te


def make_grid(schedule: Schedule, grid: GridSpec, steps: int | None, t_start: float | None = None,
              t_end: float | None = None, karras_rho: float = 7.0, integer_timesteps: bool = False,
              beta_ab: tuple[float, float] = BETA_AB) -> np.ndarray:
    """Return the float64 array of N+1 decreasing times for ``steps`` = N solver steps.

    ``grid`` is a name from :data:`GRIDS` ("beta": rho at the Beta(``beta_ab``) quantiles between rho_max
    and rho_min, as diffusers' ``use_beta_sigmas``), a sequence of times, or ``{"t": [...]}`` / ``{"rho": [...]}``
    (``"sigma"`` is accepted as an alias of ``"rho"`` for VE schedules). ``integer_timesteps`` rounds
    the times of a discrete schedule to the training timesteps (diffusers style), dropping duplicates.
    """
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; valid grids: {', '.join(GRIDS)}, or a list of times")
        if steps is None or int(steps) < 1:
            raise ValueError(f"a named grid needs steps >= 1, got {steps}")
        ts, te = default_t_range(schedule, t_start, t_end)
        if grid == "karras" and karras_rho <= 0:
            raise ValueError(f"karras_rho must be > 0, got {karras_rho}")
        if grid == "beta":
            _check_beta_ab(beta_ab)
        t = _named_grid(schedule, grid, int(steps), ts, te, karras_rho, beta_ab)
    else:
        t = _times_from_user(schedule, grid)
        if steps is not None and len(t) - 1 != int(steps):
            raise ValueError(f"the given grid has {len(t) - 1} steps but {steps} steps were asked for; "
                             "pass nfe=None with an explicit grid")
    if integer_timesteps:
        if not schedule.discrete:
            raise ValueError("integer_timesteps applies only to discrete schedules")
        t = _round_unique(t)
    validate_times(schedule, t)
    return t


def _named_grid(schedule: Schedule, grid: str, n: int, ts: float, te: float, karras_rho: float,
                beta_ab: tuple[float, float] = BETA_AB) -> np.ndarray:
    """``n``-step named grid from ts to te. Spacings in log rho (logsnr) or rho^(1/p) (karras) cannot reach an
    end at rho = inf (alpha = 0: flow matching, zero terminal SNR) or, for logsnr, rho = 0: there the first
    (last) step is one uniform-time step of (ts - te) / n and the named spacing covers the rest. Time
    spacings run in the schedule's unshifted time (FlowSchedule's shift is applied afterwards)."""
    with np.errstate(divide="ignore"):
        ra, rb = float(schedule.rho(ts)), float(schedule.rho(te))
    head = int(grid in ("logsnr", "karras", "beta") and np.isinf(ra))
    tail = int(grid == "logsnr" and rb == 0.0)
    if head or tail:
        need = 1 + head + tail
        if n < need:
            raise ValueError(f"the {grid} grid from rho = {ra:g} to rho = {rb:g} needs steps >= {need} (its "
                             "singular ends take one uniform-time step each); use time_uniform")
        d = (ts - te) / n
        inner = _named_grid(schedule, grid, n - head - tail, ts - d if head else ts, te + d if tail else te, karras_rho,
                            beta_ab)
        return np.concatenate([[ts]] * head + [inner] + [[te]] * tail)
    u = np.arange(n + 1, dtype=np.float64) / n
    if grid in ("time_uniform", "time_quadratic"):
        a, b = schedule.grid_transform(np.array([ts, te]), inverse=True)
        v = a + u * (b - a) if grid == "time_uniform" else (np.sqrt(a) + u * (np.sqrt(b) - np.sqrt(a))) ** 2
        t = schedule.grid_transform(v)
    elif grid == "logsnr":
        la, lb = float(schedule.lam(ts)), float(schedule.lam(te))
        t = schedule.t_from_lambda(la + u * (lb - la))
    elif grid == "beta":  # rho_i = rho_min + Q(1 - u_i) (rho_max - rho_min), Q the Beta(a, b) quantile function
        from scipy.special import betaincinv
        t = schedule.t_from_rho(rb + betaincinv(float(beta_ab[0]), float(beta_ab[1]), 1.0 - u) * (ra - rb))
    else:  # karras
        p = 1.0 / karras_rho
        t = schedule.t_from_rho((ra ** p + u * (rb ** p - ra ** p)) ** karras_rho)
    t[0], t[-1] = ts, te  # exact endpoints despite round-off of the inverse maps
    return t


def _check_beta_ab(beta_ab: Any) -> None:
    try:
        a, b = (float(v) for v in beta_ab)
    except (TypeError, ValueError):
        raise ValueError(f"beta_ab must be a pair (a, b), got {beta_ab!r}") from None
    if not (a > 0 and b > 0 and np.isfinite(a) and np.isfinite(b)):
        raise ValueError(f"the beta grid needs Beta parameters a, b > 0, got {beta_ab!r}")


def _times_from_user(schedule: Schedule, grid: Any) -> np.ndarray:
    if isinstance(grid, Mapping):
        keys = set(grid)
        if keys == {"t"}:
            return np.asarray(grid["t"], dtype=np.float64).copy()
        if keys in ({"rho"}, {"sigma"}):
            rho = np.asarray(grid[keys.pop()], dtype=np.float64)
            if np.any(rho < 0):
                raise ValueError("rho/sigma values must be >= 0")
            t = schedule.t_from_rho(rho)
            # a final rho = 0 is the denoised endpoint: keep it even if slightly outside [t_min, t_max]
            return t
        raise ValueError(f"a grid mapping needs exactly one key of 't', 'rho' or 'sigma', got {sorted(keys)}")
    try:
        return np.asarray(grid, dtype=np.float64).reshape(-1).copy()
    except (TypeError, ValueError) as e:
        raise ValueError(f"grid must be one of {GRIDS} or a sequence of times, got {grid!r}") from e


def _round_unique(t: np.ndarray) -> np.ndarray:
    r = np.round(t)
    keep = np.concatenate([[True], np.diff(r) != 0])
    if not np.all(keep):
        warnings.warn(f"rounding the grid to integer timesteps produced {int((~keep).sum())} duplicate(s); "
                      f"they were removed, so the grid now has {int(keep.sum()) - 1} steps", stacklevel=3)
    return r[keep]


def validate_times(schedule: Schedule, t: np.ndarray) -> None:
    """Raise a clear error for grids that are too short, non-finite, non-monotone or out of range."""
    if t.ndim != 1 or t.size < 2:
        raise ValueError(f"a grid needs at least 2 times (1 step), got {t.size}")
    if not np.all(np.isfinite(t)):
        raise ValueError("grid contains non-finite times")
    d = np.diff(t)
    if np.any(d >= 0):
        i = int(np.argmax(d >= 0))
        raise ValueError(f"grid times must be strictly decreasing (noise to data); t[{i}]={t[i]} is followed by "
                         f"t[{i + 1}]={t[i + 1]}")
    inner = t[:-1] if _is_zero_rho_end(schedule, t) else t
    schedule.check_times(inner, "grid time")


def _is_zero_rho_end(schedule: Schedule, t: np.ndarray) -> bool:
    if t[-1] >= schedule.t_min:
        return False
    with np.errstate(invalid="ignore"):
        r = float(schedule.rho(t[-1]))
    return abs(r) < 1e-12


def grid_rho(schedule: Schedule, t: np.ndarray) -> np.ndarray:
    """rho at the grid times, with a final 'denoise to rho = 0' point snapped to exactly 0."""
    rho = schedule.rho(t[:-1]) if _is_zero_rho_end(schedule, t) else schedule.rho(t)
    return np.append(rho, 0.0) if rho.size < t.size else rho
