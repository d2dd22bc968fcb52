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

from .common import ArgumentParser, method_arg, positive_int
from ..sampler import sample
from ..core.schedules import Schedule
from ..testing import relative_errors

__all__ = ["quality_main", "yardstick_main", "DIFFUSERS_SCHEDULERS", "run_diffusers", "Result", "evaluate", "markdown_table", "nfe_to_reach", "report"]

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


def _optimized_result(label: str, model: Callable, sched: Schedule, method: str, kw: dict,
                      problems: Sequence[tuple[torch.Tensor, torch.Tensor]], nfes: Sequence[int], mix) -> Result:
    """Optimized grids, fit on 32 calibration noises (seed 100, exact reference), evaluated on ``problems``."""
    from ..tuning.grids import optimize_grid
    from ..testing import reference_solution
    cal = torch.randn(32, mix.dim, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    cref = reference_solution(mix, sched, cal, sched.t_max, sched.t_min)
    res = Result(label, "deis_fast")
    for n in nfes:
        og = optimize_grid(model, sched, method, n, cal, reference=cref, pfdiff=kw.get("pfdiff"),
                           pfdiff_experimental=kw.get("pfdiff_experimental", False))
        r = evaluate(label, "deis_fast", deis_runner(model, sched, og.method, og, pfdiff=og.pfdiff), problems, [n])
        res.errors.update(r.errors)
        res.rms.update(r.rms)
    return res


def _require_diffusers(ap: argparse.ArgumentParser, skipped: bool) -> None:
    if skipped:
        return
    try:
        import diffusers  # noqa: F401
    except ImportError:
        ap.error("the diffusers peers need diffusers: pip install 'deis_fast[diffusers]', or pass --no-diffusers")


def yardstick_main(argv: Sequence[str] | None = None) -> int:
    """The public-yardstick table (DESIGN §7); see benchmarks/yardstick.py for usage."""
    ap = ArgumentParser(prog="deis-fast bench yardstick", description="Public yardstick: deis_fast vs diffusers on the 64-d mixture.")
    ap.add_argument("--nfe", type=positive_int, nargs="+", default=[5, 6, 8, 10, 15, 20])
    ap.add_argument("--samples", type=positive_int, default=400)
    ap.add_argument("--methods", type=method_arg, nargs="*", default=YARDSTICK_METHODS)
    ap.add_argument("--grids", nargs="*", default=YARDSTICK_GRIDS)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[],
                    help="extra deis_fast rows as method:grid[:k,h for pfdiff[:exp]]; grid 'optimized' fits a grid "
                         "per NFE on 32 separate calibration noises (seed 100)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    _require_diffusers(ap, args.no_diffusers)
    torch.set_num_threads(2)
    t0 = time.time()
    from ..testing import yardstick_problem
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
        if g == "optimized":
            results.append(_optimized_result(label, model, sched, m, kw, problems, args.nfe, mix))
            continue
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
             markdown_table(results, args.nfe), ""]
    if not args.no_diffusers:
        lines += ["Best of each family:", "", summary_table(results, args.nfe), ""]
    lines.append(f"(wall time {time.time() - t0:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


# --------------------------------------------------------------------------------------------------
# The quality benchmark (issue 7): two models, fixed and optimized grids, diffusers peers, 4 seeds.
# --------------------------------------------------------------------------------------------------

QUALITY_METHODS = ["tab1", "tab2", "tab3", "rhoab3", "ipndm4", "dpmpp2", "dpmpp3", "logrho3", "pfdiff"]
QUALITY_GRIDS = ["logsnr", "time_quadratic", "karras"]


@dataclass
class Problem:
    name: str
    model: Callable
    schedule: Schedule
    sets: list[tuple[torch.Tensor, torch.Tensor]]        # held-out (noise, reference) per seed
    calibration: tuple[torch.Tensor, torch.Tensor]
    mixture: object = None                                # the GaussianMixture of an analytic problem
    prediction: str = "eps"                               # what model predicts (deis_fast name)


def mixture_problem(seeds: int = 4, per_seed: int = 100) -> Problem:
    from ..testing import GaussianMixture, reference_solution
    from ..core.schedules import VPSchedule
    mix = GaussianMixture.random(8, 64, 0.3, 1234)
    sched = VPSchedule.discrete("linear")

    def setup(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return z, reference_solution(mix, sched, z, sched.t_max, sched.t_min)
    return Problem("mixture (64-d, exact reference)", mix.model(sched), sched,
                   [setup(1 + s, per_seed) for s in range(seeds)], setup(100, 32), mix)


def digits_problem(seeds: int = 4, per_seed: int = 32, reference_nfe: int = 800, kind: str = "digits") -> Problem:
    """An embedded digits model in float64 (``kind`` 'digits': eps, VP; 'flow': rectified flow from t = 1);
    reference: rho_rk4 at ``reference_nfe`` NFE (logsnr grid for VP, the uniform FlowMatch grid for flow)."""
    from ..zoo.digits import digits_kind, load_digits_model
    from ..sampler import Sampler
    k = digits_kind(kind)
    net = load_digits_model(dtype=torch.float64, kind=k.name)
    sched = k.schedule()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x, t)
    ref_sampler = Sampler(model, sched, "rho_rk4", reference_nfe, "logsnr" if k.objective == "eps" else None,
                          k.prediction, check_finite=False)

    def setup(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return z, ref_sampler(z)
    what = "digits U-Net" if k.objective == "eps" else "flow digits U-Net"
    return Problem(f"embedded {what} (float64, reference rho_rk4 @ {reference_nfe} NFE)", model, sched,
                   [setup(1 + s, per_seed) for s in range(seeds)], setup(100, 32), prediction=k.prediction)


def quality_results(problem: Problem, nfes: Sequence[int], methods: Sequence[str], grids: Sequence[str],
                    opt_nfes: dict[str, Sequence[int]], opt_budget: float, diffusers: bool = True,
                    log: Callable[[str], None] = print) -> list[Result]:
    """Fixed grids for every method x grid at every NFE; optimized grids for ``opt_nfes[method]``."""
    from ..tuning.grids import optimize_grid
    results: list[Result] = []
    for m in methods:
        for g in grids:
            results.append(evaluate(f"deis_fast {m} / {g}", "deis_fast", deis_runner(problem.model, problem.schedule, m, g),
                                    problem.sets, nfes))
    cal_noise, cal_ref = problem.calibration
    for m, m_nfes in opt_nfes.items():
        res = Result(f"deis_fast {m} / optimized", "deis_fast")
        for n in m_nfes:
            og = optimize_grid(problem.model, problem.schedule, m, n, cal_noise, reference=cal_ref, time_budget=opt_budget)
            log(f"  optimized {m} @ {n}: calibration {og.start_error:.3g} ({og.start_grid}) -> {og.calibration_error:.3g}"
                f" in {og.seconds:.1f}s / {og.evaluations} evals")
            r = evaluate(res.label, "deis_fast", deis_runner(problem.model, problem.schedule, m, og), problem.sets, [n])
            res.errors.update(r.errors)
            res.rms.update(r.rms)
        results.append(res)
    if diffusers:
        for name in DIFFUSERS_SCHEDULERS:
            for karras in (False, True):
                r = evaluate(f"diffusers {name}" + (" karras" if karras else ""), "diffusers",
                             lambda nz, n, name=name, karras=karras: run_diffusers(name, karras, problem.model, nz, n),
                             problem.sets, nfes)
                if r.errors:
                    results.append(r)
    return results


def plot_quality(panels: Sequence[tuple[str, Sequence[Result]]], nfes: Sequence[int], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels):
        for r in _best_per_label_prefix(results, nfes):
            xs = [n for n in nfes if n in r.errors and np.isfinite(r.mean(n))]
            if not xs:
                continue
            style = "-o" if r.family == "deis_fast" else "--s"
            ax.errorbar(xs, [r.mean(n) for n in xs], yerr=[r.std(n) for n in xs], fmt=style, ms=3, capsize=2,
                        label=r.label, alpha=0.85)
        ax.axhline(0.01, color="gray", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="median relative error (mean ± std over seeds)",
               title=title)
        ax.set_xticks(list(nfes))
        ax.set_xticklabels([str(n) for n in nfes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _best_per_label_prefix(results: Sequence[Result], nfes: Sequence[int]) -> list[Result]:
    """One curve per method (its best grid by mean error over NFEs) and per diffusers scheduler."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        key = r.label.split(" / ")[0] if r.family == "deis_fast" else r.label.replace(" karras", "")
        groups.setdefault(key, []).append(r)

    def score(r: Result) -> float:
        v = [math.log(r.mean(n)) for n in nfes if n in r.errors and np.isfinite(r.mean(n)) and r.mean(n) > 0]
        return float(np.mean(v)) if len(v) == len(nfes) else math.inf
    return [min(g, key=score) for g in groups.values()]


def summary_table(results: Sequence[Result], nfes: Sequence[int]) -> str:
    bd, bf = best_per_nfe(results, "deis_fast", nfes), best_per_nfe(results, "diffusers", nfes)
    lines = ["| NFE | best deis_fast | best diffusers | ratio |", "|---|---|---|---|"]
    for n in nfes:
        if n in bd and n in bf:
            lines.append(f"| {n} | {bd[n][1]:.3g} ({bd[n][0].replace('deis_fast ', '')}) | {bf[n][1]:.3g} "
                         f"({bf[n][0].replace('diffusers ', '')}) | {bf[n][1] / bd[n][1]:.1f}x |")
    reach_d = [(nfe_to_reach(r), r.label) for r in results if r.family == "deis_fast"]
    reach_f = [(nfe_to_reach(r), r.label) for r in results if r.family == "diffusers"]
    fmt = lambda v: f"{v[0]} ({v[1]})" if v[0] is not None else f"> {max(nfes)}"
    lines += ["", "NFE to reach 1% median relative error: deis_fast " +
              fmt(min(((a, b) for a, b in reach_d if a is not None), default=(None, ""))) + "; diffusers " +
              fmt(min(((a, b) for a, b in reach_f if a is not None), default=(None, "")))]
    return "\n".join(lines)


def optimized_gain_table(results: Sequence[Result], nfe: int) -> str:
    """Per method: held-out error of its optimized grid against its best fixed grid at ``nfe``."""
    fixed: dict[str, tuple[float, str]] = {}
    opt: dict[str, float] = {}
    for r in results:
        if r.family != "deis_fast" or nfe not in r.errors:
            continue
        method, grid = r.label.removeprefix("deis_fast ").split(" / ")
        if grid == "optimized":
            opt[method] = r.mean(nfe)
        elif r.mean(nfe) < fixed.get(method, (math.inf, ""))[0]:
            fixed[method] = (r.mean(nfe), grid)
    lines = [f"| method | best fixed grid @ NFE {nfe} | optimized | gain |", "|---|---|---|---|"]
    for m, e in opt.items():
        if m in fixed:
            lines.append(f"| {m} | {fixed[m][0]:.3g} ({fixed[m][1]}) | {e:.3g} | {fixed[m][0] / e:.2f}x |")
    return "\n".join(lines)


def report(lines: Sequence[str], path: str | None) -> int:
    """Print a benchmark's markdown report and write it to ``path`` (when given); returns exit code 0."""
    out = "\n".join(lines)
    print(out)
    if path:
        with open(path, "w") as f:
            f.write(out + "\n")
    return 0


def quality_main(argv: Sequence[str] | None = None) -> int:
    """deis_fast vs diffusers on the mixture and the digits model, fixed and optimized grids."""
    ap = ArgumentParser(prog="deis-fast bench quality", description=quality_main.__doc__)
    ap.add_argument("--models", nargs="+", default=["mixture", "digits"], choices=["mixture", "digits"])
    ap.add_argument("--nfe", type=positive_int, nargs="+", default=[4, 5, 6, 8, 10, 15, 20])
    ap.add_argument("--seeds", type=positive_int, default=4)
    ap.add_argument("--methods", type=method_arg, nargs="*", default=QUALITY_METHODS)
    ap.add_argument("--grids", nargs="*", default=QUALITY_GRIDS)
    ap.add_argument("--opt-methods", nargs="*", default=None,
                    help="methods to run on optimized grids at every NFE (default: all for the mixture; "
                         "logrho3 dpmpp3 ipndm4 pfdiff for digits)")
    ap.add_argument("--gain-nfe", type=positive_int, default=5,
                    help="NFE at which every method also gets an optimized grid, compared with its best fixed grid")
    ap.add_argument("--opt-budget", type=float, default=60.0, help="seconds per grid optimization")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--out-md", default="quality.md")
    ap.add_argument("--out-png", default="quality.png")
    args = ap.parse_args(argv)
    _require_diffusers(ap, args.no_diffusers)
    torch.set_num_threads(1)
    t0 = time.time()
    panels, text = [], []
    for name in args.models:
        t1 = time.time()
        prob = mixture_problem(args.seeds) if name == "mixture" else digits_problem(args.seeds)
        print(f"[{name}] problem ready in {time.time() - t1:.0f}s", flush=True)
        opt = args.opt_methods
        if opt is None:
            opt = args.methods if name == "mixture" else [m for m in ("logrho3", "dpmpp3", "ipndm4", "pfdiff")
                                                           if m in args.methods]
        gain = [args.gain_nfe] if args.gain_nfe in args.nfe else []
        opt_nfes = {m: args.nfe if m in opt else gain for m in args.methods if m in opt or gain}
        res = quality_results(prob, args.nfe, args.methods, args.grids, opt_nfes, args.opt_budget,
                              not args.no_diffusers)
        panels.append((prob.name, res))
        text += [f"### {prob.name}", "", f"{args.seeds} held-out noise seeds; each cell: median per-sample "
                 "relative error, mean ± std over seeds. Optimized grids were fit on a separate calibration seed.",
                 "", markdown_table(res, args.nfe, with_std=True), "", summary_table(res, args.nfe), "",
                 f"Optimized grid against the same method's best fixed grid at NFE {args.gain_nfe} (held-out):", "",
                 optimized_gain_table(res, args.gain_nfe), ""]
        print(f"[{name}] done in {time.time() - t1:.0f}s", flush=True)
    plot_quality(panels, args.nfe, args.out_png)
    text.append(f"(total wall time {time.time() - t0:.0f} s; plot: {args.out_png})")
    return report(text, args.out_md)
