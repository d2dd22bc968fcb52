"""img2img quality as a diffusers user runs it: the embedded digits U-Net (float64), real digits images,
strength 0.5, the pipelines' loop (set_timesteps(N), set_begin_index(t_start), add_noise at timesteps[t_start],
step() over timesteps[t_start:]) with N = 2 x NFE, so NFE 5 and 10.

Strength picks an index into ``timesteps``, so the start noise level depends on the grid: deis_fast's default
grids start later (less noise) than diffusers' linspace spacing at the same strength; the ``grid=diffusers`` rows
start where diffusers' schedulers do, and so do the ``deis_fast.sample(t_start=500)`` rows (a named grid from that
time: deis_fast's own spacing from diffusers' starting noise). The table gives each row's start timestep.

Error: median per-sample relative error to a fine reference of the same problem, i.e. the probability-flow
ODE from that scheduler's own noised start (its first timestep) to t = 0 (rho_rk4, 400 NFE, logsnr grid).
Mean over seeds (each seed: 32 images, its own noise).

    python benchmarks/img2img.py [--seeds 3] [--out-md benchmarks/img2img.md]
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

import deis_fast
from deis_fast.cli.bench import make_diffusers_scheduler
from deis_fast.zoo.digits import load_digits_data, load_digits_model
from deis_fast.integrations.diffusers import DEISFastScheduler
from deis_fast.testing import relative_errors

DEIS_FAST = ["tab3", "logrho3", "dpmpp_2m", "dpmpp3", "ipndm4", "pfdiff", "rho_heun"]
DIFFUSERS = ["DEIS-3", "DPM++2M", "DPM++3M", "UniPC-2", "UniPC-3"]
STRENGTH = 0.5


def img2img_loop(sch, model, x0: torch.Tensor, z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """What StableDiffusionImg2ImgPipeline does; returns (result, noised start, start timestep)."""
    sch.set_timesteps(n)
    t_start = n - min(int(n * STRENGTH), n)
    timesteps = sch.timesteps[t_start * sch.order:]
    sch.set_begin_index(t_start * sch.order)
    x = sch.add_noise(x0, z, timesteps[:1].repeat(x0.shape[0]))
    start = x.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in timesteps:
            eps = model(sch.scale_model_input(x, t), torch.full((x.shape[0],), float(t), dtype=torch.float64))
            x = sch.step(eps, t, x).prev_sample
    return x, start, float(timesteps[0])


class SampleFrom:
    """Not a scheduler: deis_fast.sample from timestep ``t0`` on the method's default grid with ``nfe`` calls
    (what a user who wants diffusers' starting noise with a deis_fast grid runs), in img2img_loop's shape."""

    def __init__(self, method: str, t0: float):
        self.method, self.t0 = method, t0


def sample_from(run: SampleFrom, model, x0: torch.Tensor, z: torch.Tensor, n: int, sched) -> tuple:
    x = DEISFastScheduler().add_noise(x0, z, torch.tensor([run.t0]))
    out = deis_fast.sample(model, x, sched, run.method, n // 2, t_start=run.t0, t_end=0.0)
    return out, x, run.t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-seed", type=int, default=32)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--reference-nfe", type=int, default=400)
    ap.add_argument("--out-md", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    net = load_digits_model(dtype=torch.float64)
    sched = deis_fast.VPSchedule.discrete("linear")

    def model(x, t):
        with torch.no_grad():
            return net(x, t)
    data = load_digits_data().double()
    refs: dict[tuple, torch.Tensor] = {}

    def reference(start: torch.Tensor, t0: float, seed: int) -> torch.Tensor:
        key = (round(t0, 9), seed)
        if key not in refs:
            refs[key] = deis_fast.sample(model, start, sched, "rho_rk4", args.reference_nfe, "logsnr", t_start=t0,
                                         t_end=0.0)
        return refs[key]

    makers = {f"deis_fast {m}": (lambda m=m: DEISFastScheduler(method=m)) for m in DEIS_FAST}
    makers.update({f"deis_fast {m} / grid=diffusers": (lambda m=m: DEISFastScheduler(method=m, grid="diffusers"))
                   for m in DEIS_FAST if m not in ("pfdiff", "logrho3")})  # logrho3: the diffusers grid already
    makers.update({f"deis_fast.sample {m}, t_start=500": (lambda m=m: SampleFrom(m, 500.0))
                   for m in ("tab3", "dpmpp_2m", "ipndm4", "pfdiff")})
    makers.update({f"diffusers {d}": (lambda d=d: make_diffusers_scheduler(d, False)) for d in DIFFUSERS})
    rows = []
    for label, make in makers.items():
        errs, starts = {}, {}
        for nfe in args.nfe:
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(1000 + seed)
                idx = torch.randperm(len(data), generator=g)[:args.per_seed]
                x0 = data[idx]
                z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
                sch = make()
                if isinstance(sch, SampleFrom):
                    x, start, t0 = sample_from(sch, model, x0, z, 2 * nfe, sched)
                else:
                    x, start, t0 = img2img_loop(sch, model, x0, z, 2 * nfe)
                errs.setdefault(nfe, []).append(float(relative_errors(x, reference(start, t0, seed)).median()))
                starts[nfe] = t0
        rows.append((label, errs, starts))
        print(label, {n: f"{np.mean(v):.4g} (t_start {starts[n]:.4g})" for n, v in errs.items()}, flush=True)
    head = "| sampler | " + " | ".join(f"NFE {n} (t_start)" for n in args.nfe) + " |"
    lines = [head, "|---|" + "---|" * len(args.nfe)]
    for label, errs, starts in rows:
        lines.append(f"| {label} | " + " | ".join(f"{np.mean(errs[n]):.4f} ({starts[n]:.0f})" for n in args.nfe) + " |")
    print("\n".join(lines))
    if args.out_md:
        Path(args.out_md).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
