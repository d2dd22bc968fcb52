"""The tuned file: :class:`Tuned`, :func:`save_tuned` / :func:`load_tuned`, and the checks every front end runs
before it samples with one (:func:`tuned_plan`).

:func:`~deis_fast.tuning.tune` fits a time grid (:func:`~deis_fast.optimize_grid`, forward passes only) and optionally every
coefficient of the plan (:func:`~deis_fast.learn_plan`, through autograd) to one model, on calibration noises and
their fine reference solutions (cached on disk: they are the expensive part). A held-out part of the calibration
set (noises, and for a pipeline whole prompts) never enters the fit; on it the tuned configuration is compared with
the untuned one (the method's default grid), and the untuned one is kept whenever tuning does not beat it there.
With ``method=None`` it also chooses the method among :data:`AUTO_METHODS` (each on its own optimized grid, chosen
on the calibration noises only; the held-out part then guards against the untuned default).

A tuned file is JSON: the grid (schedule times) or the plan, what it was tuned for (schedule fingerprint, method,
NFE, plan options, prediction type, guidance scale, pipeline class, resolution), the held-out errors and the
deis_fast version, under a SHA-256 checksum of the payload. :func:`load_tuned` validates the schema and the
checksum (a corrupt or hand-edited file is refused); :meth:`Tuned.check` refuses another schedule, method, NFE or
prediction type and warns on another guidance scale or resolution (the grid still works, it is no longer tuned).
Every front end loads it through :func:`tuned_plan`: ``Sampler(..., plan=t.make_plan(schedule))``,
``DEISFastScheduler.from_config(config, tuned=path)``, ``k_diffusion.sample_deis_fast(..., tuned=path)``,
``deis-fast sample|generate --tuned path``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.schedules import Schedule, VESchedule, schedule_fingerprint

__all__ = ["FORMAT", "FORMAT_VERSION", "KINDS", "Tuned", "TunedFileError", "TunedMismatchError", "load_tuned",
           "save_tuned", "tuned_plan", "k_diffusion_plan", "check_latent_shape"]

FORMAT = "deis_fast.tuned"
FORMAT_VERSION = 1
KINDS = ("grid", "plan", "untuned")


class TunedFileError(ValueError):
    """A tuned file that is not one: unreadable, wrong schema, or a payload that does not match its checksum."""


class TunedMismatchError(ValueError):
    """A tuned file used with another schedule, method, NFE or prediction type than it was tuned for."""


@dataclass
class Tuned:
    """A tuned grid (``kind='grid'``), plan (``'plan'``), or the untuned default kept because tuning did not beat it
    on the held-out set (``'untuned'``). ``grid``: the schedule times (decreasing); ``plan``: the learned plan (None
    for a grid); ``errors``: median relative errors to the fine reference on the held-out set."""

    method: str
    nfe: int
    grid: list[float]
    schedule_fingerprint: str
    kind: str = "grid"
    plan: Any = None
    options: dict = field(default_factory=dict)
    prediction: str = "eps"
    schedule: str = ""                     # repr, for messages
    guidance_scale: float | None = None
    pipeline: str | None = None
    resolution: list[int] | None = None
    errors: dict = field(default_factory=dict)
    deis_fast_version: str = ""
    meta: dict = field(default_factory=dict)

    # --- checks ---------------------------------------------------------------------------------------------
    def check(self, schedule: Schedule | str | None = None, method: str | None = None, nfe: int | None = None,
              guidance_scale: float | None = None, resolution: Sequence[int] | None = None,
              prediction: str | None = None, source: str = "") -> "Tuned":
        """Raise :class:`TunedMismatchError` naming the mismatch when ``schedule`` (a Schedule or its fingerprint),
        ``method``, ``nfe`` or ``prediction`` differ from what this was tuned for; warn when ``guidance_scale`` or
        ``resolution`` differ. Arguments left None are not checked. Returns self."""
        where = f" ({source})" if source else ""
        if schedule is not None:
            fp = schedule if isinstance(schedule, str) else schedule_fingerprint(schedule)
            if fp != self.schedule_fingerprint:
                got = "" if isinstance(schedule, str) else f" {schedule!r}"
                raise TunedMismatchError(
                    f"tuned file{where} is for schedule {self.schedule_fingerprint} ({self.schedule}), not for the "
                    f"schedule given, fingerprint {fp}{got}: tune again for this model's schedule")
        if method is not None:
            from ..solvers import resolve
            if resolve(method)[0].name != resolve(self.method)[0].name:
                raise TunedMismatchError(f"tuned file{where} is for method {self.method!r}, not {method!r}: use "
                                         f"method={self.method!r} or tune again")
        if nfe is not None and int(nfe) != self.nfe:
            raise TunedMismatchError(f"tuned file{where} is for NFE {self.nfe}, not {nfe}: sample with {self.nfe} "
                                     "network evaluations or tune again for this NFE")
        if prediction is not None:
            from ..core.adapters import normalize_prediction
            if normalize_prediction(prediction) != normalize_prediction(self.prediction):
                raise TunedMismatchError(f"tuned file{where} is for a model predicting {self.prediction!r}, not "
                                         f"{prediction!r}")
        if guidance_scale is not None and self.guidance_scale is not None and \
                not math.isclose(float(guidance_scale), self.guidance_scale, rel_tol=1e-6):
            warnings.warn(f"tuned file{where} was tuned at guidance scale {self.guidance_scale:g}, used at "
                          f"{float(guidance_scale):g}: the grid still works but is no longer tuned", UserWarning,
                          stacklevel=2)
        if resolution is not None and self.resolution is not None and list(resolution) != list(self.resolution):
            warnings.warn(f"tuned file{where} was tuned at resolution {self.resolution}, used at {list(resolution)}: "
                          "the grid still works but is no longer tuned", UserWarning, stacklevel=2)
        return self

    # --- use --------------------------------------------------------------------------------------------------
    @property
    def plan_options(self) -> dict:
        """The plan options as PlanOptions keywords (pfdiff and disable_corrector as tuples)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in self.options.items()}

    def build_kw(self) -> dict:
        """The keywords that rebuild this grid's plan: ``build_plan(schedule, grid=self.grid, **t.build_kw())``."""
        o = self.plan_options
        return dict(method=self.method, nfe=self.nfe if o.get("pfdiff") is not None else None, **o)

    def make_plan(self, schedule: Schedule, check: bool = True):
        """The plan to run: the learned plan, or the method on the tuned grid (checked against ``schedule``)."""
        if check:
            self.check(schedule=schedule)
        if self.plan is not None:
            return self.plan
        from ..sampler import build_plan
        return build_plan(schedule, grid=list(self.grid), **self.build_kw())

    # --- file ---------------------------------------------------------------------------------------------
    def payload(self) -> dict:
        from .plans import plan_to_json
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["plan"] = None if self.plan is None else plan_to_json(self.plan)
        d["grid"] = [float(t) for t in self.grid]
        d["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}
        d["errors"] = {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in self.errors.items()}
        return d

    def to_json(self) -> dict:
        p = self.payload()
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "checksum": _checksum(p), "payload": p}

    def save(self, path: str | os.PathLike) -> None:
        save_tuned(self, path)

    def summary(self) -> str:
        e = self.errors
        before, after = e.get("held_out_untuned"), e.get("held_out_tuned")
        gain = f", {before / after:.2f}x lower" if before and after else ""
        return (f"{_label(self.method, self.options)} @ NFE {self.nfe} ({self.kind}): held-out error "
                f"{_fmt(before)} untuned -> "
                f"{_fmt(after)} tuned{gain}")


def _finite(v: Any) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _checksum(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _label(method: str, options: Mapping[str, Any]) -> str:
    """``tab3``, ``tab3+corrector``, ``ddim (pfdiff=[2, 1])``: a method and its non-default plan options."""
    o = dict(options)
    label = method + ("+corrector" if o.pop("corrector", None) else "")
    return label + (f" ({', '.join(f'{k}={v}' for k, v in o.items())})" if o else "")


def save_tuned(tuned: Tuned, path: str | os.PathLike) -> None:
    """Write ``tuned`` as JSON (atomically: a temporary file, then renamed; the temporary file never stays)."""
    p = Path(path)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(tuned.to_json(), indent=1, allow_nan=False))
        tmp.replace(p)
    finally:   # never leave the temporary file behind (a folder or an unwritable place at ``path``)
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- loading
_TYPES: dict[str, tuple] = {"method": (str,), "nfe": (int,), "grid": (list,), "schedule_fingerprint": (str,),
                            "kind": (str,), "plan": (dict, type(None)), "options": (dict,), "prediction": (str,),
                            "schedule": (str,), "guidance_scale": (int, float, type(None)),
                            "pipeline": (str, type(None)), "resolution": (list, type(None)), "errors": (dict,),
                            "deis_fast_version": (str,), "meta": (dict,)}


def _validate(d: Any, source: str) -> Tuned:
    def bad(msg: str) -> TunedFileError:
        return TunedFileError(f"{source}: not a valid deis_fast tuned file: {msg}")

    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise bad(f"'format' must be {FORMAT!r}")
    if d.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {d.get('format_version')!r}; this deis_fast reads version {FORMAT_VERSION}")
    p = d.get("payload")
    if not isinstance(p, dict):
        raise bad("no 'payload' object")
    try:
        ok = d.get("checksum") == _checksum(p)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise bad("the checksum does not match the payload (the file was corrupted or edited by hand; tune again)")
    missing = sorted(set(_TYPES) - set(p))
    extra = sorted(set(p) - set(_TYPES))
    if missing or extra:
        raise bad(f"missing keys {missing}" if missing else f"unknown keys {extra}")
    for k, types in _TYPES.items():
        if not isinstance(p[k], types) or (isinstance(p[k], bool) and bool not in types):
            raise bad(f"{k!r} has type {type(p[k]).__name__}")
    grid = p["grid"]
    if p["kind"] not in KINDS:
        raise bad(f"kind {p['kind']!r} is not one of {KINDS}")
    if p["nfe"] < 1 or len(grid) < 2 or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in grid) \
            or any(b >= a for a, b in zip(grid, grid[1:])):
        raise bad("the grid must be >= 2 finite, strictly decreasing times and nfe >= 1")
    plan = None
    if p["plan"] is not None:
        from .plans import plan_from_json
        from ..core.plan import Combine
        try:
            plan = plan_from_json(p["plan"])
        except (TypeError, KeyError, ValueError) as e:
            raise bad(f"unreadable plan ({e})") from None
        slots_ok = all(0 <= s < plan.num_slots for op in plan.ops
                       for s in ((op.dst,) + op.srcs if isinstance(op, Combine) else (op.src, op.dst)))
        coefs_ok = all(math.isfinite(c) for op in plan.combines for c in op.coefs + (op.noise_coef,))
        if plan.nfe != p["nfe"] or not slots_ok or not coefs_ok or \
                not np.allclose(plan.times, grid, rtol=1e-12, atol=0):
            raise bad("the plan does not match the file's NFE and grid, or has bad slots / coefficients")
    if p["kind"] == "plan" and plan is None:
        raise bad("kind 'plan' without a plan")
    fields = dict(p, plan=plan, grid=[float(t) for t in grid],
                  guidance_scale=None if p["guidance_scale"] is None else float(p["guidance_scale"]))
    return Tuned(**fields)


_CACHE: dict[tuple, Tuned] = {}


def load_tuned(path: str | os.PathLike | Tuned) -> Tuned:
    """Read and validate a tuned file (schema and checksum); a :class:`Tuned` passes through."""
    if isinstance(path, Tuned):
        return path
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
        if key in _CACHE:
            return _CACHE[key]
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise TunedFileError(f"tuned file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TunedFileError(f"{path}: cannot read a tuned file: {e}") from None
    _CACHE[key] = t = _validate(d, str(path))
    return t


def tuned_plan(tuned: str | os.PathLike | Tuned, schedule: Schedule, method: str | None = None,
               nfe: int | None = None, *, prediction: str | None = None, guidance_scale: float | None = None,
               resolution: Sequence[int] | None = None) -> tuple[Any, dict]:
    """What every front end calls: load ``tuned`` (a path or a :class:`Tuned`), check it against what the front end
    is about to run (None: not checked), and return ``(plan, build_kw)``; ``build_kw`` rebuilds the plan on its grid
    (``build_plan(schedule, grid=plan.times, start_eval=k, **build_kw)``, an img2img start)."""
    t = load_tuned(tuned)
    t.check(schedule=schedule, method=method, nfe=nfe, prediction=prediction, guidance_scale=guidance_scale,
            resolution=resolution, source=str(tuned) if not isinstance(tuned, Tuned) else "")
    return t.make_plan(schedule, check=False), dict(t.build_kw(), lower_order_final=False)


def check_latent_shape(tuned: str | os.PathLike | Tuned, shape: Sequence[int]) -> None:
    """Warn (once per file and shape) when a pipeline's latents are not the size ``tuned`` was tuned at."""
    t = load_tuned(tuned)
    want = t.meta.get("latent_shape")
    got = [int(s) for s in shape[1:]]
    key = (id(t), tuple(got))
    if want is not None and list(want) != got and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"tuned file {tuned} was tuned for latents {want} (resolution {t.resolution}), the pipeline runs "
                      f"{got}: the grid still works but is no longer tuned", UserWarning, stacklevel=3)


_WARNED: set = set()


def k_diffusion_plan(tuned: str | os.PathLike | Tuned, schedule: Schedule, method: str, nfe: int) -> tuple:
    """(schedule, plan) of ``tuned`` for a k-diffusion denoiser on ``schedule``; a VE range from float32 sigmas is read
    at float32 precision (0.0020000000949949026 is the 0.002 the file was tuned for), and that schedule is the one to
    sample with. The prediction type is not checked: a k-diffusion denoiser returns x0 whatever its network predicts
    (ComfyUI wraps eps and v models so), and a plan is the same for every prediction of one model, so a file tuned
    on the network's own eps (``tune(model, schedule)``) or on the denoiser (``prediction="x0"``) both load."""
    if isinstance(schedule, VESchedule):
        schedule = VESchedule(float(f"{schedule.sigma_min:.7g}"), float(f"{schedule.sigma_max:.7g}"))
    return schedule, tuned_plan(tuned, schedule, method, nfe)[0]


# ----------------------------------------------------------------------------------------------- tuning
