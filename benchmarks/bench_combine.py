"""CPU combine benchmark (issue 3): order-3 combine (4 reads + 1 write) on 16M fp32 elements vs
(a) copy bandwidth measured in the same run and (b) the best eager torch composition.

    python benchmarks/bench_combine.py [--n 16777216] [--threads 2] [--reps 15]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deis_fast import ops


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n, esz = a.n, 4
    srcs = [torch.randn(n) for _ in range(4)]
    c = [0.9, -0.3, 0.25, 0.05]
    out = torch.empty(n)

    def copy():
        out.copy_(srcs[0])

    def eager():
        torch.mul(srcs[0], c[0], out=out)
        for s, cc in zip(srcs[1:], c[1:]):
            out.add_(s, alpha=cc)

    def fused():
        ops.combine(srcs, c, out=out, backend="cpu")

    def fused_torch():
        ops.combine(srcs, c, out=out, backend="torch")

    variants = (("copy", copy, 2 * n * esz), ("combine[cpu]", fused, 5 * n * esz),
                ("eager mul+add_ x3", eager, 5 * n * esz), ("combine[torch] (reference)", fused_torch, 5 * n * esz))
    times = {name: [] for name, _, _ in variants}
    for name, fn, _ in variants:
        fn()  # warm-up
    for _ in range(a.reps):  # round-robin: load drift on a shared machine hits all variants alike
        for name, fn, _ in variants:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rows = {}
    for name, _, nbytes in variants:
        ts = sorted(times[name])
        rows[name] = (ts[0], ts[len(ts) // 2], nbytes / ts[0] / 1e9)
    ref = sum(cc * s.double() for cc, s in zip(c, srcs))
    fused()
    err = (out.double() - ref).abs().max().item()
    with _Count() as cnt:
        fused()
    print(f"n={n} fp32, threads={a.threads}, reps={a.reps}, best-of-reps (median in parentheses)")
    print(f"{'variant':30s} {'ms':>8s} {'(med)':>8s} {'GB/s (nominal bytes)':>22s}")
    for k, (tmin, tmed, gbs) in rows.items():
        print(f"{k:30s} {tmin*1e3:8.2f} {tmed*1e3:8.2f} {gbs:22.1f}")
    bw = rows["combine[cpu]"][2] / rows["copy"][2]
    sp = rows["eager mul+add_ x3"][0] / rows["combine[cpu]"][0]
    print(f"combine bandwidth / copy bandwidth = {bw:.2f}  (target >= 0.80)")
    print(f"speedup vs best eager composition = {sp:.2f}x  (target >= 1.5x)")
    print(f"dispatched ops per ops.combine call = {cnt.n}  (target 1)")
    print(f"max abs err vs fp64 = {err:.2e}")


if __name__ == "__main__":
    main()
