"""Tune once per model, sample fewer steps everywhere: :func:`tune`, :func:`tune_pipeline` and the tuned file.

:func:`tune` fits a time grid (:func:`~deis_fast.optimize_grid`, forward passes only) and optionally every
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
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .schedules import Schedule, VESchedule, schedule_fingerprint

__all__ = ["AUTO_METHODS", "Tuned", "TunedFileError", "TunedMismatchError", "tune", "tune_pipeline", "load_tuned",
           "save_tuned",
           "tuned_plan", "k_diffusion_plan", "check_latent_shape", "reference_solutions"]

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
            from .solvers import resolve
            if resolve(method)[0].name != resolve(self.method)[0].name:
                raise TunedMismatchError(f"tuned file{where} is for method {self.method!r}, not {method!r}: use "
                                         f"method={self.method!r} or tune again")
        if nfe is not None and int(nfe) != self.nfe:
            raise TunedMismatchError(f"tuned file{where} is for NFE {self.nfe}, not {nfe}: sample with {self.nfe} "
                                     "network evaluations or tune again for this NFE")
        if prediction is not None:
            from .models import normalize_prediction
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
        from .sampler import build_plan
        return build_plan(schedule, grid=list(self.grid), **self.build_kw())

    # --- file ---------------------------------------------------------------------------------------------
    def payload(self) -> dict:
        from .learned import plan_to_json
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


def save_tuned(tuned: Tuned, path: str | os.PathLike) -> None:
    """Write ``tuned`` as JSON (atomically: a temporary file, then renamed)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(tuned.to_json(), indent=1, allow_nan=False))
    tmp.replace(p)


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
        from .learned import plan_from_json
        from .plan import Combine
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
def _median_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    from .testing import relative_errors
    return float(relative_errors(x, ref).median())


def _rows(cond: Mapping[str, Any], idx: slice, n: int) -> dict:
    return {k: v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v for k, v in cond.items()}


def _modules_of(model: Any) -> list[torch.nn.Module]:
    """The networks a model callable runs: itself, its attributes, or what its closure holds."""
    if isinstance(model, torch.nn.Module):
        return [model]
    objs = list(getattr(model, "__dict__", {}).values())
    objs += [c.cell_contents for c in (getattr(model, "__closure__", None) or ()) if c.cell_contents is not None]
    return [v for v in objs if isinstance(v, torch.nn.Module)]


def _model_digest(model: Any) -> str | None:
    """Identifies a network's weights for the reference cache: every parameter of a small module, the shapes and a
    strided sample of the values of a large one. None for a callable without a module (then only an explicit
    ``cache_key`` identifies it)."""
    mods = _modules_of(model)
    if not mods:
        return None
    h = hashlib.sha256()
    for m in mods:
        params = list(m.state_dict().items())
        big = sum(v.numel() for _, v in params) > 5e7
        for k, v in params:
            v = v.detach().reshape(-1)
            h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
            h.update((v[:: max(1, v.numel() // 4096)] if big else v).cpu().double().numpy().tobytes())
    return h.hexdigest()[:16]


def _tensor_digest(*ts: Any) -> str:
    h = hashlib.sha256()
    for t in ts:
        if isinstance(t, torch.Tensor):
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(t).encode())
    return h.hexdigest()[:16]


def _reference_grid(schedule: Schedule) -> str | None:
    lam = schedule.lam(np.array([schedule.t_max, schedule.t_min], dtype=np.float64))
    return "logsnr" if np.isfinite(lam).all() else None


def reference_solutions(model: Callable[..., torch.Tensor], schedule: Schedule, noise: torch.Tensor, *,
                        prediction: str = "eps", method: str = "rho_rk4", nfe: int = 400,
                        cond: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                        cache_key: str = "", batch: int = 64, progress: bool = False) -> torch.Tensor:
    """Fine solutions of ``noise`` (``method`` at ``nfe`` NFE on the logsnr grid, the schedule's default grid where
    log-SNR is infinite at an end), in batches of ``batch`` with a progress bar; cached in ``cache_dir`` under a
    key of the model's weights, the schedule, the noise, the conditioning and ``cache_key`` (a model callable
    that holds no ``nn.Module`` is cached only under an explicit ``cache_key``, which must then identify it)."""
    from .sampler import Sampler
    cond = dict(cond or {})
    path, digest = None, _model_digest(model)
    if cache_dir is not None and (digest is not None or cache_key):
        key = hashlib.sha256("|".join([
            str(digest), schedule_fingerprint(schedule), prediction, method, str(nfe), cache_key,
            _tensor_digest(noise, *[cond[k] for k in sorted(cond)], *sorted(cond))]).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"reference-{key}.safetensors"
        if path.is_file():
            try:
                from safetensors.torch import load_file
                ref = load_file(str(path))["reference"]
                if ref.shape == noise.shape:
                    return ref.to(noise.device, noise.dtype)
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
                pass
    sampler = Sampler(model, schedule, method, nfe, _reference_grid(schedule), prediction, check_finite=False)
    from tqdm.auto import tqdm
    n = noise.shape[0]
    out = []
    with torch.no_grad(), tqdm(total=n, desc=f"reference ({method} @ {nfe} NFE)", unit="sample",
                               disable=not progress, file=sys.stderr) as bar:
        for i in range(0, n, batch):
            s = slice(i, min(i + batch, n))
            out.append(sampler(noise[s], **_rows(cond, s, n)))
            bar.update(out[-1].shape[0])
    ref = torch.cat(out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        from safetensors.torch import save_file   # never pickle
        save_file({"reference": ref.detach().cpu().contiguous()}, str(tmp))
        tmp.replace(path)
    return ref


class _Ticking:
    """``model`` that calls ``tick()`` before each network call (a progress bar over a search of unknown length)."""

    def __init__(self, model: Callable[..., torch.Tensor], tick: Callable[[], None]):
        self.model, self.tick = model, tick

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        self.tick()
        return self.model(x, t, **cond)


class _seconds_bar:
    """A tqdm bar of elapsed seconds out of ``budget`` (a time-bounded search); yields its ``tick``."""

    def __init__(self, desc: str, budget: float | None, enabled: bool):
        self.desc, self.budget, self.enabled = desc, budget, enabled

    def __enter__(self) -> Callable[[], None]:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.budget, desc=self.desc, unit="s", disable=not self.enabled, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s")
        self.t0 = time.perf_counter()

        def tick() -> None:
            now = time.perf_counter() - self.t0
            if self.budget is not None:
                now = min(now, self.budget)
            if now - self.bar.n >= 0.5:
                self.bar.update(now - self.bar.n)
        return tick

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def _model_dtype(model: Any) -> torch.dtype:
    """The dtype of a module's (floating) parameters; float32 for a plain callable."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _checkpointed(model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``model`` with activation checkpointing while grad is on: the network's activations are recomputed in the
    backward pass instead of stored (one more forward per call, a fraction of the memory)."""
    from torch.utils.checkpoint import checkpoint

    def f(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(model, x, t, use_reentrant=False, **cond)
        return model(x, t, **cond)
    return f


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


# the candidates of tune(method=None) / `deis-fast tune` (--method auto): the default method, its corrected form and
# tab2 with and without corrector -- the strongest few-step methods on the embedded VP and flow models
# (benchmarks/RESULTS.md: tab3 + corrector is the best fixed configuration on the digits U-Net at NFE 4-10, an
# optimized tab2 grid beats optimized tab3 there, tab3's optimized grid wins on the mixture and the flow model)
AUTO_METHODS = ("tab3", "tab3+corrector", "tab2", "tab2+corrector")


def _candidates(method: str | Sequence[str] | None, plan_options: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """``[(spec, PlanOptions)]`` of ``method``: one name, a list of names, or None / ``"auto"`` (AUTO_METHODS); a
    name may end in ``+corrector`` (the UniC-style corrector on)."""
    from .solvers import PlanOptions, resolve
    if method is None or method == "auto":
        if plan_options:
            raise ValueError(f"plan options {sorted(plan_options)} need a method: the automatic method search "
                             f"tries {', '.join(AUTO_METHODS)}")
        method = AUTO_METHODS
    names = [method] if isinstance(method, str) else list(method)
    if not names:
        raise ValueError("no candidate method")
    out = []
    for m in names:
        name, plus, extra = m.partition("+")
        kw = dict(plan_options)
        if plus:
            if extra != "corrector":
                raise ValueError(f"method {m!r}: only '+corrector' may follow a method name")
            kw["corrector"] = True
        out.append(resolve(name, PlanOptions.of(None, **kw)))
    return out


def _label(method: str, options: Mapping[str, Any]) -> str:
    """``tab3``, ``tab3+corrector``, ``ddim (pfdiff=[2, 1])``: a method and its non-default plan options."""
    o = dict(options)
    label = method + ("+corrector" if o.pop("corrector", None) else "")
    return label + (f" ({', '.join(f'{k}={v}' for k, v in o.items())})" if o else "")


def _nondefault(o: Any) -> dict:
    from .solvers import PlanOptions
    return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)
            if getattr(o, f.name) != getattr(PlanOptions(), f.name)}


def tune(model: Callable[..., torch.Tensor], schedule: Schedule, method: str | Sequence[str] | None = "tab3",
         nfe: int = 5, *,
         prediction: str = "eps", noise: torch.Tensor | None = None, held_out_noise: torch.Tensor | None = None,
         shape: Sequence[int] | None = None, calibration: int = 32, held_out: int = 16, seed: int = 0,
         cond: Mapping[str, Any] | None = None, held_out_cond: Mapping[str, Any] | None = None,
         plan: bool = False, plan_iters: int = 200, plan_batch: int = 32, plan_lr: float = 4e-3,
         checkpoint: bool = False, time_budget: float | None = 60.0, reference_method: str = "rho_rk4",
         reference_nfe: int = 400, cache_dir: str | os.PathLike | None = None, cache_key: str = "",
         baseline_plan: Any = None, progress: bool = False, log: Callable[[str], None] | None = None,
         guidance_scale: float | None = None, pipeline: str | None = None, resolution: Sequence[int] | None = None,
         meta: Mapping[str, Any] | None = None, **plan_options: Any) -> Tuned:
    """Tune ``method`` at ``nfe`` for ``model`` (``model(x, t, **cond)`` predicting ``prediction`` on ``schedule``).

    Calibration noises: ``noise`` (and ``held_out_noise``), or ``calibration`` + ``held_out`` per-sample seeded
    noises of ``shape`` (seeds ``seed...``; VE schedules scale them to sigma_max). ``cond`` / ``held_out_cond``: the
    model's keyword arguments, tensors with one row per noise. The held-out rows never enter the fit: the result's
    ``errors`` are median relative errors to the fine reference (``reference_method`` at ``reference_nfe``; cached in
    ``cache_dir``) there, for the untuned configuration (``baseline_plan``, default: the method's default grid) and
    the tuned one; where tuning does not beat the untuned configuration on them the result is the untuned one
    (``kind='untuned'``). Fits the grid with :func:`optimize_grid` (``time_budget`` seconds) and, with ``plan``, the
    plan's coefficients with :func:`learn_plan` (``plan_iters`` Adam steps through the network; ``checkpoint``:
    activation checkpointing when autograd through the network does not fit in memory).

    ``method``: one method, a list of candidates (names, ``"tab3+corrector"`` for the corrector on) or None /
    ``"auto"`` (:data:`AUTO_METHODS`): each candidate gets its optimized grid (the ``time_budget`` shared among them)
    and the one with the lowest median error on the calibration noises is chosen; the held-out noises then only
    compare it with the untuned configuration, the first candidate on its default grid. The file records the method
    and options chosen (``meta['candidates']``: every candidate's calibration and, for the record, held-out error).
    """
    from . import __version__
    from .grid_opt import optimize_grid
    from .sampler import Sampler, build_plan

    say = log or (lambda s: print(s, file=sys.stderr) if progress else None)
    began = time.time()
    cand_specs = _candidates(method, plan_options)
    spec, o = cand_specs[0]
    scale = float(schedule.sigma(schedule.t_max)) if isinstance(schedule, VESchedule) else 1.0
    if noise is None:
        if shape is None:
            raise ValueError("give calibration `noise` (and `held_out_noise`) or the sample `shape`")
        from .sampler import randn_per_sample
        seeds = range(seed, seed + calibration + held_out)
        z = randn_per_sample((calibration + held_out,) + tuple(shape), seeds, dtype=_model_dtype(model)) * scale
        noise, held_out_noise = z[:calibration], z[calibration:]
        meta = dict(meta or {}, calibration_seeds=[seed, seed + calibration], held_out_seeds=[seed + calibration,
                                                                                              seed + calibration + held_out])
    if held_out_noise is None or held_out_noise.shape[0] < 1 or noise.shape[0] < 4:
        raise ValueError("tuning needs >= 4 calibration noises and >= 1 held-out noise (a few dozen of each is "
                         "typical)")
    n_cal, n_ho = noise.shape[0], held_out_noise.shape[0]
    cond = dict(cond or {})
    per_row = [k for k, v in cond.items() if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n_cal]
    if per_row and held_out_cond is None:
        raise ValueError(f"cond has per-noise tensors ({', '.join(per_row)}): give held_out_cond for the held-out "
                         "noises too")
    held_out_cond = dict(held_out_cond if held_out_cond is not None else cond)
    x_all = torch.cat([noise, held_out_noise.to(noise.dtype)])
    cond_all = {k: torch.cat([v, held_out_cond[k]]) if isinstance(v, torch.Tensor) and v.ndim and
                v.shape[0] == n_cal else v for k, v in cond.items()}
    ref = reference_solutions(model, schedule, x_all, prediction=prediction, method=reference_method,
                              nfe=reference_nfe, cond=cond_all, cache_dir=cache_dir, cache_key=cache_key,
                              progress=progress)
    cal, ho = slice(0, n_cal), slice(n_cal, n_cal + n_ho)
    ref_cal, ref_ho = ref[cal], ref[ho]
    c_cal, c_ho = _rows(cond_all, cal, n_cal + n_ho), _rows(cond_all, ho, n_cal + n_ho)

    def median_err(p: Any, rows: slice, ref_rows: torch.Tensor, c: Mapping[str, Any]) -> float:
        with torch.no_grad():
            x = Sampler(model, schedule, plan=p, prediction=prediction, check_finite=False)(x_all[rows], **c)
        e = _median_error(x, ref_rows)
        return e if math.isfinite(e) else math.inf

    def held_err(p: Any) -> float:
        return median_err(p, ho, ref_ho, c_ho)

    base = baseline_plan if baseline_plan is not None else build_plan(schedule, spec.name, nfe, options=o)
    if base.nfe != nfe:
        raise ValueError(f"baseline plan has NFE {base.nfe}, not {nfe}")
    errors: dict[str, float | None] = {"held_out_untuned": held_err(base)}
    say(f"untuned {_label(spec.name, _nondefault(o))} @ NFE {nfe}: held-out error {errors['held_out_untuned']:.4g}")
    # the grid of each candidate: forward passes only
    from .solvers import default_grid
    fits = []
    for k, (c_spec, c_o) in enumerate(cand_specs):
        dg = default_grid(schedule, c_spec.name)
        starts = (dg,) + tuple(g for g in ("time_quadratic", "logsnr", "karras", "time_uniform") if g != dg)
        if _reference_grid(schedule) is None:
            starts = tuple(g for g in starts if g != "logsnr")   # log-SNR is infinite at an end (flow from t = 1)
        label = _label(c_spec.name, _nondefault(c_o))
        # the budget left, shared by the candidates left (one that converges early leaves its time to the next)
        budget = None if time_budget is None else max(1.0, (time_budget - sum(f["og"].seconds for f in fits))
                                                      / (len(cand_specs) - k))
        with _seconds_bar(f"grid search {label}" if len(cand_specs) > 1 else "grid search", budget,
                          progress) as tick:
            og = optimize_grid(_Ticking(model, tick), schedule, c_spec.name, nfe, x_all[cal], prediction=prediction,
                               reference=ref_cal, time_budget=budget, start_grids=starts, options=c_o, **c_cal)
        p = build_plan(schedule, c_spec.name, nfe if c_o.pfdiff is not None else None, list(og.times), options=c_o)
        fits.append(dict(spec=c_spec, o=c_o, og=og, plan=p, label=label, cal=median_err(p, cal, ref_cal, c_cal)))
        say(f"grid {label} ({og.evaluations} evaluations, {og.seconds:.0f} s, from {og.start_grid}): calibration "
            f"error {fits[-1]['cal']:.4g}")
    # the method: chosen on the calibration noises only (the first candidate wins ties)
    best_fit = min(fits, key=lambda f: f["cal"])
    spec, o, og, grid_plan = best_fit["spec"], best_fit["o"], best_fit["og"], best_fit["plan"]
    errors["held_out_grid"] = held_err(grid_plan)
    if len(fits) > 1:
        for f in fits:   # for the record only: the choice above never saw these
            f["held_out"] = errors["held_out_grid"] if f is best_fit else held_err(f["plan"])
        say(f"chosen on the calibration noises: {best_fit['label']}")
    say(f"grid {best_fit['label']}: held-out error {errors['held_out_grid']:.4g}")
    cands = [("untuned", base, errors["held_out_untuned"], cand_specs[0]),
             ("grid", grid_plan, errors["held_out_grid"], (spec, o))]
    if plan:
        from .learned import learn_plan
        _, start_plan, _, start_cfg = min(cands, key=lambda c: c[2])
        net = _checkpointed(model) if checkpoint else model
        try:
            lp = learn_plan(net, schedule, start_plan, x_all[cal], ref_cal, prediction=prediction, iters=plan_iters,
                            batch=min(plan_batch, max(1, n_cal - max(1, round(n_cal / 4)))), lr=plan_lr,
                            log=say if progress else None, **c_cal)
        except (RuntimeError, MemoryError) as e:
            if not _is_oom(e):
                raise
            raise MemoryError(
                f"learn_plan: autograd through the network at batch {plan_batch} does not fit in memory ({e}). "
                + ("Lower plan_batch, or tune only the grid (plan=False)." if checkpoint else
                   "Pass checkpoint=True (activation checkpointing: one more forward per call, far less memory), "
                   "lower plan_batch, or tune only the grid (plan=False).")) from None
        errors["held_out_plan"] = held_err(lp.plan)
        say(f"plan ({lp.iteration} of {plan_iters} steps kept, {lp.seconds:.0f} s): held-out error "
            f"{errors['held_out_plan']:.4g}")
        cands.append(("plan", lp.plan, errors["held_out_plan"], start_cfg))
    # never worse than untuned on the held-out set: the untuned configuration wins ties
    kind, best, err, (spec, o) = min(cands, key=lambda c: (c[2], c[0] != "untuned"))
    errors["held_out_tuned"] = err
    if kind == "untuned":
        say("tuning did not beat the untuned configuration on the held-out set: keeping the untuned grid")
    cand_meta = {} if len(fits) < 2 else {"chosen": best_fit["label"], "candidates": [
        {"method": f["label"], "calibration_error": _finite(f["cal"]), "held_out_error": _finite(f["held_out"]),
         "grid_start": f["og"].start_grid, "grid_seconds": round(f["og"].seconds, 1)} for f in fits]}
    return Tuned(method=spec.name, nfe=int(nfe),
                 grid=[float(t) for t in best.times], schedule_fingerprint=schedule_fingerprint(schedule),
                 kind=kind, plan=best if kind == "plan" else None, options=_nondefault(o), prediction=prediction,
                 schedule=repr(schedule), guidance_scale=None if guidance_scale is None else float(guidance_scale),
                 pipeline=pipeline, resolution=None if resolution is None else [int(r) for r in resolution],
                 errors=errors, deis_fast_version=__version__,
                 meta=dict(meta or {}, **cand_meta, calibration=n_cal, held_out=n_ho,
                           reference=f"{reference_method}@{reference_nfe}",
                           seconds=round(time.time() - began, 1), grid_start=og.start_grid,
                           grid_evaluations=og.evaluations))


# ----------------------------------------------------------------------------------------------- pipelines
class _GuidedUNet(torch.nn.Module):
    """A Stable Diffusion pipeline's denoiser as the scheduler sees it: classifier-free guidance
    ``uncond + g (cond - uncond)`` of its UNet, batched as the pipeline batches it (negative first)."""

    def __init__(self, unet: torch.nn.Module, guidance_scale: float):
        super().__init__()
        self.unet, self.g = unet, float(guidance_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                negative_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x, prompt_embeds = x.to(self.unet.dtype), prompt_embeds.to(self.unet.dtype)
        negative_embeds = None if negative_embeds is None else negative_embeds.to(self.unet.dtype)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() in (1, x.shape[0]) else t
        if self.g > 1.0 and negative_embeds is not None:
            out = self.unet(torch.cat([x, x]), torch.cat([t, t]),
                            encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])).sample
            u, c = out.chunk(2)
            return u + self.g * (c - u)
        return self.unet(x, t, encoder_hidden_states=prompt_embeds).sample


def tune_pipeline(pipe: Any, prompts: Sequence[str], held_out_prompts: Sequence[str],
                  method: str | Sequence[str] | None = "tab3",
                  nfe: int = 8, *, guidance_scale: float = 7.5, negative_prompt: str | None = None,
                  height: int | None = None, width: int | None = None, noises_per_prompt: int = 1, seed: int = 0,
                  **kw: Any) -> Tuned:
    """:func:`tune` for a Stable Diffusion-style diffusers pipeline (``pipe.unet``, ``pipe.encode_prompt``):
    ``prompts`` are the calibration prompts, ``held_out_prompts`` the held-out ones (never seen by the fit), each with
    ``noises_per_prompt`` latent noises; the model tuned is the pipeline's UNet under classifier-free guidance at
    ``guidance_scale``, through the pipeline's own text encoder; the schedule and prediction type are what
    ``DEISFastScheduler.from_config(pipe.scheduler.config)`` runs, and the untuned configuration is that scheduler's
    own plan. Other keywords go to :func:`tune` (``plan=True``, ``checkpoint=True``, ``cache_dir``, ...)."""
    from .integrations.diffusers import DEISFastScheduler
    from .sampler import randn_per_sample
    if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
        raise NotImplementedError(f"tune_pipeline handles Stable Diffusion-style pipelines (a UNet and "
                                  f"encode_prompt); {type(pipe).__name__} is not one yet: wrap its denoiser as "
                                  "model(x, t, **cond) and call deis_fast.tuning.tune")
    if len(prompts) < 2 or len(held_out_prompts) < 1:
        raise ValueError("need >= 2 calibration prompts and >= 1 held-out prompt")
    # the untuned configuration: the scheduler's own plan of the (first) candidate method
    sch = DEISFastScheduler.from_config(pipe.scheduler.config, method=_candidates(method, {})[0][0].name)
    sch.set_timesteps(nfe)
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    size = pipe.unet.config.sample_size
    height = height or size * vae_scale
    width = width or size * vae_scale
    shape = (pipe.unet.config.in_channels, height // vae_scale, width // vae_scale)
    dev, dtype = pipe.unet.device, pipe.unet.dtype
    do_cfg = guidance_scale > 1.0

    def embeds(ps: Sequence[str]) -> dict:
        ps = [p for p in ps for _ in range(noises_per_prompt)]
        with torch.no_grad():
            pos, neg = pipe.encode_prompt(list(ps), dev, 1, do_cfg,
                                          None if negative_prompt is None else [negative_prompt] * len(ps))
        return {"prompt_embeds": pos, **({"negative_embeds": neg} if do_cfg else {})}

    n_cal, n_ho = len(prompts) * noises_per_prompt, len(held_out_prompts) * noises_per_prompt
    z = randn_per_sample((n_cal + n_ho,) + shape, range(seed, seed + n_cal + n_ho), dev, dtype)
    model = _GuidedUNet(pipe.unet, guidance_scale)
    meta = dict(kw.pop("meta", None) or {}, prompts=list(prompts), held_out_prompts=list(held_out_prompts),
                latent_shape=list(shape),
                noises_per_prompt=noises_per_prompt, seed=seed, negative_prompt=negative_prompt)
    return tune(model, sch.schedule, method, nfe, prediction=sch.prediction, noise=z[:n_cal],
                held_out_noise=z[n_cal:], cond=embeds(prompts), held_out_cond=embeds(held_out_prompts),
                baseline_plan=sch.plan, guidance_scale=guidance_scale, pipeline=type(pipe).__name__,
                resolution=(height, width), meta=meta, cache_key=f"cfg{guidance_scale}", **kw)
