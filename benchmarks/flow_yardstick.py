"""Flow yardstick: the public mixture (8 components, 64-d, std 0.3) under the flow-matching process
x_t = (1 - t) x0 + t eps, t 1 -> 0, at shift 1 and 3; 400 noises from seed 0 (4 seeds x 100); median per-sample
relative error to the exact ODE endpoint. deis_fast methods on diffusers' FlowMatch grid (the default; other named
grids where the label says so) against
diffusers' flow schedulers driven by the exact velocity model. ``--models digits``: the embedded rectified-flow
digits U-Net in float64 (4 seeds x 32 noises), error to a fine reference (rho_rk4 at 800 NFE from t = 1); the
shift only changes the sampling grid (the model was trained at shift 1).

    python benchmarks/flow_yardstick.py [--models mixture digits] [--nfe 4 5 6 8 10 15 20] [--shifts 1 3]
                                        [--out benchmarks/flow_yardstick.md]

diffusers' DEIS / DPM-Solver++ / UniPC with use_flow_sigmas start at shift(1 - 1/1000), not at t = 1, and are
fed the same pure noise (as in their pipelines); FlowMatchHeun makes 2N - 1 calls for N steps, so it only
appears at odd NFE.
"""
import argparse
import sys
import warnings

import torch

from deis_fast.cli.bench import Result, deis_runner, digits_problem, evaluate, markdown_table
from deis_fast.core.schedules import FlowSchedule
from deis_fast.testing import GaussianMixture, reference_solution

# (method, grid (None: the default FlowMatch grid, shifted), options). The shift is a transform of the time grids
# (time_uniform, time_quadratic); the rho-spaced grids (logsnr, kl_optimal) are the same at every shift (a shift
# multiplies rho, and their ends are pinned at t = 1 and 0), so their rows repeat across the shift tables.
DEIS_FAST = [("ddim", None, {}), ("tab2", None, {}), ("tab3", None, {}), ("rhoab3", None, {}), ("dpmpp3", None, {}),
             ("ipndm4", None, {}), ("tab3", None, {"corrector": True}), ("rhoab3", None, {"corrector": True}),
             ("ddim", None, {"pfdiff": (1, 1)}), ("ddim", None, {"pfdiff": (2, 1)}),
             ("ddim", "time_quadratic", {"pfdiff": (1, 1)}), ("ddim", "logsnr", {"pfdiff": (1, 1)}),
             ("ddim", "kl_optimal", {"pfdiff": (1, 1)}), ("tab2", "logsnr", {}),
             ("tab1", None, {"pfdiff": (1, 1), "pfdiff_experimental": True})]
DIFFUSERS = {
    "FlowMatchEuler": ("FlowMatchEulerDiscreteScheduler", {}),
    "FlowMatchHeun": ("FlowMatchHeunDiscreteScheduler", {}),
    "DEIS-3 (flow sigmas)": ("DEISMultistepScheduler", {"solver_order": 3}),
    "DPM++2M (flow sigmas)": ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    "UniPC-2 (flow sigmas)": ("UniPCMultistepScheduler", {"solver_order": 2}),
}


def diffusers_runner(name: str, shift: float, model):
    import diffusers
    cls_name, kw = DIFFUSERS[name]
    if cls_name.startswith("FlowMatch"):
        kw = dict(kw, shift=shift)
    else:
        kw = dict(kw, use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")

    def run(noise: torch.Tensor, nfe: int) -> torch.Tensor | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sch = getattr(diffusers, cls_name)(**kw)
            steps = (nfe + 1) // 2 if "Heun" in cls_name else nfe
            sch.set_timesteps(steps)
            if len(sch.timesteps) != nfe:
                return None
            x = noise.clone()
            for t in sch.timesteps:
                v = model(x, torch.full((x.shape[0],), float(t), dtype=x.dtype))
                x = sch.step(v, t, x).prev_sample
        return x
    return run


def mixture_problem():
    """(title, velocity model, [(noise, exact endpoint)] x 4): the public mixture; shift does not change either."""
    mix = GaussianMixture.random(8, 64, 0.3, 1234)
    sched = FlowSchedule()
    noise = torch.randn(400, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return "Flow yardstick", mix.model(sched, "flow"), [(z, reference_solution(mix, sched, z, 1.0, 0.0))
                                                        for z in noise.chunk(4)]


def flow_digits_problem():
    """(title, velocity model, [(noise, fine reference)] x 4): the embedded flow digits U-Net in float64."""
    prob = digits_problem(kind="flow")
    return f"Flow digits: {prob.name}", prob.model, prob.sets


PROBLEMS = {"mixture": mixture_problem, "digits": flow_digits_problem}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=tuple(PROBLEMS), default=list(PROBLEMS))
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10, 15, 20])
    ap.add_argument("--shifts", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = []
    for title, model, problems in (PROBLEMS[name]() for name in args.models):
        out += run_problem(title, model, problems, args.shifts, args.nfe)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out))
    return 0


def run_problem(title: str, model, problems, shifts, nfes) -> list[str]:
    """One markdown table per shift: every deis_fast configuration and diffusers scheduler on ``problems``."""
    out = []
    for shift in shifts:
        sched = FlowSchedule(shift)
        results: list[Result] = []
        for method, grid, kw in DEIS_FAST:
            label = method + (f" PFDiff-{kw['pfdiff'][0]},{kw['pfdiff'][1]}" if "pfdiff" in kw else "") + \
                (" + corrector" if kw.get("corrector") else "") + (f" / {grid}" if grid else "")
            results.append(evaluate(label, "deis_fast", deis_runner(model, sched, method, grid, prediction="flow",
                                                                    **kw), problems, nfes))
        for name in DIFFUSERS:
            results.append(evaluate(name, "diffusers", diffusers_runner(name, shift, model), problems, nfes))
        out.append(f"### {title}, shift {shift:g}\n\n" + markdown_table(results, nfes) + "\n")
        print(out[-1], flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
