"""Time grids: N+1 decreasing times t_0 = t_start > ... > t_N = t_end for an N-step solver."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence, Union

import numpy as np

from .schedules import FlowSchedule, Schedule

GRIDS = ("time_uniform", "time_quadratic", "logsnr", "karras", "beta", "ays", "ays_sdxl", "ays_svd", "kl_optimal",
         "linear_quadratic")
BETA_AB = (0.6, 0.6)  # Beta(a, b) of the "beta" grid (Lee et al., 2024; diffusers' use_beta_sigmas)

# Align Your Steps (Sabour, Fidler, Kreis, 2024): the published 10-step noise levels (sigma = rho) for
# Stable Diffusion 1.5, SDXL and Stable Video Diffusion, from the authors' page
# https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html (as in ComfyUI's
# comfy_extras/nodes_align_your_steps.py); other step counts use their log-linear interpolation.
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "ays": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "ays_sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "ays_svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}
GridSpec = Union[str, Sequence[float], np.ndarray, Mapping[str, Sequence[float]]]

__all__ = ["GRIDS", "AYS_SIGMAS", "make_grid", "check_grid_name", "default_t_range", "validate_times", "grid_rho", "ays_sigmas",
           "kl_optimal_sigmas", "linear_quadratic_fractions"]


def ays_sigmas(steps: int, table: str = "ays") -> np.ndarray:
    """``steps + 1`` Align Your Steps noise levels: the published list for 10 steps, else its log-linear
    interpolation over the normalized step index (the AYS authors' ``loglinear_interp``)."""
    if table not in AYS_SIGMAS:
        raise ValueError(f"unknown AYS table {table!r}; valid: {', '.join(AYS_SIGMAS)}")
    ys = np.log(np.array(AYS_SIGMAS[table][::-1]))
    xs = np.linspace(0.0, 1.0, ys.size)
    return np.exp(np.interp(np.linspace(0.0, 1.0, int(steps) + 1), xs, ys))[::-1].copy()


def kl_optimal_sigmas(steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """``steps + 1`` noise levels uniform in arctan(sigma), sigma_max to sigma_min (the KL-optimal
    schedule of the AYS paper, ComfyUI's ``kl_optimal``)."""
    u = np.arange(steps + 1, dtype=np.float64) / steps
    return np.tan(u * np.arctan(sigma_min) + (1.0 - u) * np.arctan(sigma_max))


def linear_quadratic_fractions(steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None) -> np.ndarray:
    """``steps + 1`` fractions 1 -> 0 of the noise range: linear down to 1 - threshold_noise over the first
    ``linear_steps`` (default steps // 2), then quadratic (Mochi's schedule, ComfyUI's ``linear_quadratic``)."""
    if steps == 1:
        return np.array([1.0, 0.0])
    ls = steps // 2 if linear_steps is None else int(linear_steps)
    if not 1 <= ls < steps:
        raise ValueError(f"linear_steps must be in [1, steps), got {ls} for steps={steps}")
    qs = steps - ls
    diff = ls - threshold_noise * steps
    qa = diff / (ls * qs ** 2)
    qb = threshold_noise / ls - 2.0 * diff / qs ** 2
    i = np.arange(steps, dtype=np.float64)
    x = np.where(i < ls, i * threshold_noise / ls, qa * i ** 2 + qb * i + qa * ls ** 2)
    return 1.0 - np.append(x, 1.0)


# Grid names that need the model and calibration noise to be resolved (name -> resolver(model, schedule, method,
# nfe, calibration_noise, t_start, t_end, **kw) -> a grid with .method and .pfdiff). deis_fast.tuning.grids registers
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


def check_grid_name(name: str) -> str:
    """``name`` if it is a grid name (:data:`GRIDS` or a model grid such as "optimized"); else a ValueError
    listing them, with a "did you mean" for a near miss."""
    valid = GRIDS + tuple(MODEL_GRIDS)
    if name in valid:
        return name
    import difflib
    close = difflib.get_close_matches(str(name).strip().lower().replace("-", "_"), valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown grid {name!r}; {hint}valid grids: {', '.join(valid)}, or a list of times")


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
            check_grid_name(grid)
            raise ValueError(f"grid {grid!r} needs the model: pass it to Sampler(model, ...), not to build_plan")
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
                             "drop nfe= (a list grid= sets the NFE itself) or pass a grid of that length")
        _check_flow_grid_end(schedule, t, t_end)
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
    head = int(grid not in ("time_uniform", "time_quadratic") and np.isinf(ra))
    tail = int((grid == "logsnr" or grid in AYS_SIGMAS) and rb == 0.0)
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
    elif grid in AYS_SIGMAS or grid in ("kl_optimal", "linear_quadratic"):
        t = schedule.t_from_rho(_tabulated_rho(grid, n, ra, rb))
    else:  # karras
        p = 1.0 / karras_rho
        t = schedule.t_from_rho((ra ** p + u * (rb ** p - ra ** p)) ** karras_rho)
    t[0], t[-1] = ts, te  # exact endpoints despite round-off of the inverse maps
    return t


def _check_flow_grid_end(schedule: Schedule, t: np.ndarray, t_end: float | None) -> None:
    """A flow sample is clean only at t = 0 (x_t = (1 - t) x0 + t eps); an explicit grid that stops short returns a
    noisy state. diffusers' FlowMatch ``sigmas`` leave the final 0 out (the scheduler appends it), so a copied list
    is the usual cause: refuse it unless ``t_end`` says the early stop is meant."""
    if not isinstance(schedule, FlowSchedule) or t.size == 0 or t[-1] == 0.0:
        return
    if t_end is not None and np.isclose(t[-1], float(t_end), rtol=1e-12, atol=1e-15):
        return
    raise ValueError(f"this flow grid ends at t = {t[-1]:.6g}: the result would be (1 - t) x0 + t noise there, not a "
                     "clean sample. Append 0 to the grid (diffusers' FlowMatch sigmas leave it out), or pass "
                     f"t_end={t[-1]:.6g} to stop there on purpose")


def _check_beta_ab(beta_ab: Any) -> None:
    try:
        a, b = (float(v) for v in beta_ab)
    except (TypeError, ValueError):
        raise ValueError(f"beta_ab must be a pair (a, b), got {beta_ab!r}") from None
    if not (a > 0 and b > 0 and np.isfinite(a) and np.isfinite(b)):
        raise ValueError(f"the beta grid needs Beta parameters a, b > 0, got {beta_ab!r}")


def _tabulated_rho(grid: str, n: int, ra: float, rb: float) -> np.ndarray:
    """rho of the ays* / kl_optimal / linear_quadratic grids from ra = rho(t_start) to rb = rho(t_end).

    AYS: the table's log-rho shape mapped affinely onto [log rho_start, log rho_end]; that is the table
    itself when the schedule's range is the table's (SD 1.5 / SDXL: 14.615 -> 0.0292; SVD: 700 -> 0.002).
    linear_quadratic: rho_end + fraction * (rho_start - rho_end).
    """
    if grid in AYS_SIGMAS:
        if rb <= 0.0:
            raise ValueError(f"the {grid} grid cannot end at rho = 0; give t_end > 0")
        tab = np.log(ays_sigmas(n, grid))
        u = (tab - tab[0]) / (tab[-1] - tab[0])
        return np.exp(np.log(ra) + u * (np.log(rb) - np.log(ra)))
    if grid == "kl_optimal":
        return kl_optimal_sigmas(n, rb, ra)
    return rb + linear_quadratic_fractions(n) * (ra - rb)


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
    # 1e-6: t_from_rho(0) of a discrete VP schedule is an extrapolated time where rho is ~1e-10..1e-8, not 0
    # (grid ends are far above that: rho_min of a 1000-step DDPM schedule is ~1e-2)
    return abs(r) < 1e-6


def grid_rho(schedule: Schedule, t: np.ndarray) -> np.ndarray:
    """rho at the grid times, with a final 'denoise to rho = 0' point snapped to exactly 0."""
    rho = schedule.rho(t[:-1]) if _is_zero_rho_end(schedule, t) else schedule.rho(t)
    return np.append(rho, 0.0) if rho.size < t.size else rho
