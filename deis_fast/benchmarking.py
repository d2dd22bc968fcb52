"""Quality-per-NFE benchmark: deis_fast methods and grids against diffusers' schedulers, same noise,
same start and end times, error measured against an exact (or high-accuracy) ODE endpoint."""
from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .sampler import sample
from .schedules import Schedule
from .testing import relative_errors

__all__ = ["yardstick_main", "DIFFUSERS_SCHEDULERS", "run_diffusers", "Result", "evaluate", "markdown_table", "nfe_to_reach"]

# name -> (diffusers class, constructor kwargs); every one starts at t=999 and ends at t=0 (alpha_cumprod[0])
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "DDIM": ("DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": False, "clip_sample": False}),
    "DEIS-3": ("DEISMultistepScheduler", {"solver_order": 3}),
    "DPM++2M": ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++",
                                                "final_sigmas_type": "sigma_min"}),
    "DPM++3M": ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++",
                                                "final_sigmas_type": "sigma_min"}),
    "UniPC-2": ("UniPCMultistepScheduler", {"solver_order": 2, "final_sigmas_type": "sigma_min"}),
    "UniPC-3": ("UniPCMultistepScheduler", {"solver_order": 3, "final_sigmas_type": "sigma_min"}),
}


def make_diffusers_scheduler(name: str, karras: bool, beta_schedule: str = "linear"):
    import diffusers
    cls_name, kw = DIFFUSERS_SCHEDULERS[name]
    kw = dict(kw, beta_schedule=beta_schedule)
    if karras:
        if cls_name == "DDIMScheduler":
            return None  # DDIM has no Karras option
        kw["use_karras_sigmas"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, cls_name)(**kw)


def run_diffusers(name: str, karras: bool, model: Callable, noise: torch.Tensor, nfe: int,
                  beta_schedule: str = "linear") -> torch.Tensor | None:
    """Sample with a diffusers scheduler loop (``model(x, t)`` returns eps at float timestep t)."""
    sch = make_diffusers_scheduler(name, karras, beta_schedule)
    if sch is None:
        return None
    sch.set_timesteps(nfe)
    x = noise.clone() * sch.init_noise_sigma
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in sch.timesteps:
            xin = sch.scale_model_input(x, t)
            eps = model(xin, torch.full((x.shape[0],), float(t), dtype=torch.float64 if x.dtype == torch.float64
                                        else torch.float32))
            x = sch.step(eps, t, x).prev_sample
    return x


@dataclass
class Result:
    label: str
    family: str                   # 'deis_fast' or 'diffusers'
    errors: dict[int, list[float]] = field(default_factory=dict)   # nfe -> per-seed medians
    rms: dict[int, list[float]] = field(default_factory=dict)

    def mean(self, nfe: int) -> float:
        v = self.errors.get(nfe)
        return float(np.mean(v)) if v else math.nan

    def std(self, nfe: int) -> float:
        v = self.errors.get(nfe)
        return float(np.std(v)) if v else math.nan


def evaluate(label: str, family: str, run: Callable[[torch.Tensor, int], torch.Tensor | None],
             problems: Sequence[tuple[torch.Tensor, torch.Tensor]], nfes: Iterable[int]) -> Result:
    """``run(noise, nfe)`` on each (noise, reference) problem; median and RMS relative error per seed."""
    res = Result(label, family)
    for n in nfes:
        for noise, ref in problems:
            try:
                x = run(noise, n)
            except ValueError:
                x = None  # e.g. an RK method at an NFE that is not a multiple of its stages
            if x is None:
                continue
            e = relative_errors(x, ref)
            res.errors.setdefault(n, []).append(float(e.median()))
            res.rms.setdefault(n, []).append(float(e.pow(2).mean().sqrt()))
    return res


def deis_runner(model: Callable, schedule: Schedule, method: str, grid, **kw) -> Callable:
    def run(noise: torch.Tensor, n: int) -> torch.Tensor:
        return sample(model, noise, schedule=schedule, method=method, nfe=n, grid=grid, **kw)
    return run


def nfe_to_reach(res: Result, target: float = 0.01) -> int | None:
    for n in sorted(res.errors):
        if res.mean(n) <= target:
            return n
    return None


def _fmt(res: Result, n: int, with_std: bool) -> str:
    if n not in res.errors:
        return "—"
    m = res.mean(n)
    return f"{m:.3g} ± {res.std(n):.1g}" if with_std and len(res.errors[n]) > 1 else f"{m:.3g}"


def markdown_table(results: Sequence[Result], nfes: Sequence[int], with_std: bool = False,
                   headline: float | None = 0.01) -> str:
    head = "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + (f" | NFE to {headline:g} |" if headline else " |")
    sep = "|---|" + "---|" * (len(nfes) + (1 if headline else 0))
    rows = [head, sep]
    for r in results:
        cells = [_fmt(r, n, with_std) for n in nfes]
        if headline:
            reach = nfe_to_reach(r, headline)
            cells.append(str(reach) if reach is not None else f"> {max(nfes)}")
        rows.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def best_per_nfe(results: Sequence[Result], family: str, nfes: Sequence[int]) -> dict[int, tuple[str, float]]:
    out = {}
    for n in nfes:
        cands = [(r.mean(n), r.label) for r in results if r.family == family and n in r.errors]
        if cands:
            v, lab = min(cands)
            out[n] = (lab, v)
    return out


YARDSTICK_METHODS = ["ddim", "tab1", "tab2", "tab3", "rhoab3", "logrho3", "dpmpp2", "dpmpp3", "ipndm4", "ipndm_v"]
YARDSTICK_GRIDS = ["time_quadratic", "logsnr", "karras", "time_uniform"]


def yardstick_main(argv: Sequence[str] | None = None) -> int:
    """The public-yardstick table (DESIGN §7); see benchmarks/yardstick.py for usage."""
    ap = argparse.ArgumentParser(prog="deis-fast bench yardstick", description="Public yardstick: deis_fast vs diffusers on the 64-d mixture.")
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10, 15, 20])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--methods", nargs="*", default=YARDSTICK_METHODS)
    ap.add_argument("--grids", nargs="*", default=YARDSTICK_GRIDS)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="extra deis_fast rows as method:grid[:k,h for pfdiff]")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    from .testing import yardstick_problem
    mix, sched, noise, ref = yardstick_problem(args.samples)
    model = mix.model(sched)
    problems = [(noise, ref)]
    results = []
    for m in args.methods:
        for g in args.grids:
            results.append(evaluate(f"deis_fast {m} / {g}", "deis_fast", deis_runner(model, sched, m, g),
                                      problems, args.nfe))
    for spec in args.extra:
        m, g, *pf = spec.split(":")
        kw = {"pfdiff": tuple(int(v) for v in pf[0].split(","))} if pf else {}
        if len(pf) > 1 and pf[1] == "exp":
            kw["pfdiff_experimental"] = True
        label = f"deis_fast {m} / {g}" + (f" / PFDiff{kw['pfdiff']}" if pf else "") + (" exp." if len(pf) > 1 else "")
        results.append(evaluate(label, "deis_fast",
                                  deis_runner(model, sched, m, g, **kw), problems, args.nfe))
    for name in ([] if args.no_diffusers else DIFFUSERS_SCHEDULERS):
        for karras in (False, True):
            r = evaluate(f"diffusers {name}" + (" karras" if karras else ""), "diffusers",
                           lambda nz, n, name=name, karras=karras: run_diffusers(name, karras, model, nz, n),
                           problems, args.nfe)
            if r.errors:
                results.append(r)
    lines = ["Median per-sample relative error to the exact ODE endpoint (lower is better).", "",
             markdown_table(results, args.nfe), "", "Best of each family:", "",
             "| NFE | best deis_fast | best diffusers | ratio |", "|---|---|---|---|"]
    bd, bf = best_per_nfe(results, "deis_fast", args.nfe), best_per_nfe(results, "diffusers", args.nfe)
    for n in args.nfe:
        if n in bd and n in bf:
            lines.append(f"| {n} | {bd[n][0]} {bd[n][1]:.3g} | {bf[n][0]} {bf[n][1]:.3g} | {bf[n][1] / bd[n][1]:.1f}x |")
    lines.append("")
    lines.append(f"(wall time {time.time() - t0:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0
