"""Sampler overhead (issue 5), side by side in one run; ratios, not absolute times.

(a) share of wall time spent outside the network: a full NFE-10 tab3 sampling of a small conv net
    vs the same network calls alone (the exact inputs the sampler fed it, recorded once);
(b) ATen ops dispatched per NFE outside the network: deis_fast vs diffusers' DEIS (order 3),
    DPM-Solver++ 2M and UniPC schedulers (their `step`, model output precomputed);
(c) one order-3 step on [4,4,128,128] fp32: deis_fast's Combine vs DEISMultistepScheduler.step
    (order 3, in its third-order regime).

    OMP_NUM_THREADS=2 python benchmarks/overhead.py [--reps 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deis_fast  # noqa: E402
from deis_fast import ops  # noqa: E402
from deis_fast.testing import DispatchRecorder  # noqa: E402


class SmallNet(torch.nn.Module):
    """A small conv eps-net with a time input (a few hundred microseconds per call on CPU)."""

    def __init__(self, ch: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, ch, 3, padding=1)
        self.c2 = torch.nn.Conv2d(ch, ch, 3, padding=1)
        self.c3 = torch.nn.Conv2d(ch, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.c1(x) + (t / 1000).view(-1, 1, 1, 1))
        h = torch.nn.functional.silu(self.c2(h))
        return self.c3(h)


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def part_a(reps: int, shape=(4, 3, 32, 32), nfe: int = 10) -> dict:
    net = SmallNet().eval()
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(x, t):
        calls.append((x.clone(), t.clone()))
        return net(x, t)

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    res = {}
    with torch.no_grad():
        deis_fast.Sampler(recording, method="tab3", nfe=nfe)(noise)
        samplers = {cf: deis_fast.Sampler(net, method="tab3", nfe=nfe, check_finite=cf) for cf in (False, True)}
        out = torch.empty_like(noise)
        for s in samplers.values():
            s(noise, out=out)

        def net_only():
            for x, t in calls:
                net(x, t)
        fixed = net(noise, calls[0][1])

        def null_model(x, t):            # the sampler's own cost: a network that costs nothing
            return fixed
        nulls = {cf: deis_fast.Sampler(null_model, method="tab3", nfe=nfe, check_finite=cf, copy_outputs=False)
                 for cf in (False, True)}
        for s in nulls.values():
            s(noise, out=out)
        runs = {"net": net_only, "sampler": lambda: samplers[False](noise, out=out),
                "sampler_check": lambda: samplers[True](noise, out=out),
                "null_net": lambda: nulls[False](noise, out=out),
                "null_net_check": lambda: nulls[True](noise, out=out)}
        times = {k: [] for k in runs}
        for _ in range(reps):          # round-robin so that load changes hit every variant alike
            for k, fn in runs.items():
                times[k] += _time(fn, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    res["shape"], res["nfe"] = shape, nfe
    res["median_ms"] = {k: 1e3 * v for k, v in med.items()}
    res["best_ms"] = {k: 1e3 * v for k, v in best.items()}
    res["share_median"] = {k: (med[k] - med["net"]) / med[k] for k in ("sampler", "sampler_check")}
    res["share_best"] = {k: (best[k] - best["net"]) / best[k] for k in ("sampler", "sampler_check")}
    # robust to load: the sampler's own time (null network) over the full sampling time
    res["own_share_best"] = {k: best["null_" + k.replace("sampler", "net")] / best[k]
                             for k in ("sampler", "sampler_check")}
    return res


def _diffusers_ops_per_step(name: str, steps: int = 10, shape=(2, 3, 16, 16)) -> float:
    import diffusers
    kw = {"DEISMultistepScheduler": dict(solver_order=3),
          "DPMSolverMultistepScheduler": dict(solver_order=2, algorithm_type="dpmsolver++"),
          "UniPCMultistepScheduler": dict(solver_order=2)}[name]
    sch = getattr(diffusers, name)(num_train_timesteps=1000, beta_schedule="linear", **kw)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    eps = [torch.randn(shape, generator=g) for _ in sch.timesteps]
    rec = DispatchRecorder()
    with torch.no_grad(), rec:
        for t, e in zip(sch.timesteps, eps):
            x = sch.step(e, t, x).prev_sample
    return len(rec.ops) / steps


def part_b(nfe: int = 10) -> dict:
    net = SmallNet().eval()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = {}
    with torch.no_grad():
        for label, kw in [("deis_fast tab3 (check_finite=False)", dict(check_finite=False)),
                          ("deis_fast tab3 (check_finite=True)", dict(check_finite=True)),
                          ("deis_fast dpmpp2 (x0 form, eps net)", dict(method="dpmpp2", check_finite=False))]:
            rec = DispatchRecorder()
            kw = {"method": "tab3", **kw}
            s = deis_fast.Sampler(rec.mark(net), nfe=nfe, **kw)
            out = torch.empty_like(noise)
            s(noise, out=out)
            rec.clear()
            with rec:
                s(noise, out=out)
            n10 = len(rec.ops)
            s2 = deis_fast.Sampler(rec.mark(net), nfe=2 * nfe, **kw)
            s2(noise, out=out)
            rec.clear()
            with rec:
                s2(noise, out=out)
            res[label] = (n10 / nfe, len(rec.allocations), (len(rec.ops) - n10) / nfe)
    for name in ("DEISMultistepScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        res[f"diffusers {name}"] = (_diffusers_ops_per_step(name, nfe), None, None)
    return res


def part_c(reps: int, shape=(4, 4, 128, 128)) -> dict:
    from diffusers import DEISMultistepScheduler
    g = torch.Generator().manual_seed(0)
    sch = DEISMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_order=3)
    sch.set_timesteps(20)
    x = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    with torch.no_grad():
        for t in sch.timesteps[:4]:            # warm up into the third-order regime
            x = sch.step(eps, t, x).prev_sample
        k = sch.step_index
        t_k = sch.timesteps[k]
        assert sch.lower_order_nums >= 3, "scheduler must be in its third-order regime"

        def diffusers_step():
            sch._step_index = k                 # stay on the same (third-order) step
            sch.step(eps, t_k, x)

        srcs = [torch.randn(shape, generator=g) for _ in range(4)]
        out = torch.empty(shape)
        coefs = [0.99, 0.1, -0.05, 0.01]

        def deis_step():
            ops.combine(srcs, coefs, out=out)
        for fn in (diffusers_step, deis_step):
            fn()
        td, tc = [], []
        for _ in range(reps):
            td += _time(diffusers_step, 1)
            tc += _time(deis_step, 1)
    return {"shape": shape, "diffusers_ms": (1e3 * min(td), 1e3 * statistics.median(td)),
            "deis_ms": (1e3 * min(tc), 1e3 * statistics.median(tc)),
            "speedup_best": min(td) / min(tc), "speedup_median": statistics.median(td) / statistics.median(tc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, reps={args.reps}")
    a = part_a(args.reps)
    print(f"\n(a) small conv net {a['shape']} fp32 CPU, tab3 NFE {a['nfe']}: wall time outside the network")
    print(f"{'variant':28s} {'best ms':>9s} {'median ms':>10s}")
    for k in ("net", "sampler", "sampler_check", "null_net", "null_net_check"):
        print(f"{k:28s} {a['best_ms'][k]:9.3f} {a['median_ms'][k]:10.3f}")
    for k in ("sampler", "sampler_check"):
        print(f"sampler share [{k}]: (sampling - network calls) / sampling = {100 * a['share_best'][k]:.1f}% (best), "
              f"{100 * a['share_median'][k]:.1f}% (median); sampler with a null network / sampling = "
              f"{100 * a['own_share_best'][k]:.2f}% (best)  (target <= 5%)")
    b = part_b()
    print("\n(b) ATen ops dispatched per NFE outside the network (second call, NFE 10; for deis_fast also the "
          "marginal ops per extra NFE (NFE 20 vs 10) and allocations per call)")
    for k, (per, alloc, marginal) in b.items():
        print(f"{k:45s} {per:7.1f}" + ("" if alloc is None else f"   marginal/NFE: {marginal:.1f}   "
                                                                   f"allocations/call: {alloc}"))
    c = part_c(args.reps)
    print(f"\n(c) one order-3 step on {c['shape']} fp32 (best / median ms)")
    print(f"diffusers DEISMultistepScheduler.step  {c['diffusers_ms'][0]:8.3f} {c['diffusers_ms'][1]:8.3f}")
    print(f"deis_fast Combine (ops.combine)        {c['deis_ms'][0]:8.3f} {c['deis_ms'][1]:8.3f}")
    print(f"speedup: {c['speedup_best']:.1f}x (best), {c['speedup_median']:.1f}x (median)  (target >= 20x)")


if __name__ == "__main__":
    main()
