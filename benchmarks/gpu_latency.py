"""GPU latency (issue 5): eager vs whole-loop CUDA graph vs torch.compile(reduce-overhead), for a
diffusers UNet2DModel built from a config (no hub download), tab3 NFE 10.

Reports time per sample batch, and kernel launches per NFE (torch.profiler, CUDA kernels only) for
eager and graph replay. Needs CUDA; exits with a message otherwise.

    python benchmarks/gpu_latency.py [--batch 8] [--size 64] [--reps 20] [--dtype fp16] [--guidance 7.5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _unet(size: int, dtype: torch.dtype):
    from diffusers import UNet2DModel
    m = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 128, 256, 256, 512, 512),
                    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
    return m.to("cuda", dtype).eval()


def _cuda_time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def _kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (class-free: same UNet, doubled batch)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_latency.py: no CUDA device available; this benchmark needs a GPU (nothing measured).")
        sys.exit(2)
    import deis_fast
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    net = _unet(args.size, dtype)
    noise = torch.randn(args.batch, 3, args.size, args.size, device="cuda", dtype=dtype)
    kw = {}
    if args.guidance is not None:
        kw = dict(guidance_scale=args.guidance, uncond={})
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  UNet2DModel {args.size}px batch {args.batch} "
          f"{args.dtype}, tab3 NFE {args.nfe}" + (f", CFG {args.guidance}" if kw else ""))
    with torch.inference_mode():
        s = deis_fast.Sampler(net, method="tab3", nfe=args.nfe, check_finite=False, **kw)
        out = torch.empty_like(noise)
        s(noise, out=out)
        g = s.cuda_graph(noise)
        net_calls = lambda: [net(noise, torch.full((args.batch,), 500.0, device="cuda")) for _ in range(args.nfe)]  # noqa: E731
        rows = {"network calls alone (eager)": net_calls, "deis_fast eager": lambda: s(noise, out=out),
                "deis_fast CUDA graph": lambda: g(noise, out=out)}
        if not args.no_compile:
            c = torch.compile(deis_fast.Sampler(net, method="tab3", nfe=args.nfe, check_finite=False, **kw),
                              fullgraph=True, mode="reduce-overhead")
            for _ in range(3):
                c(noise)
            rows["torch.compile reduce-overhead"] = lambda: c(noise)
        for fn in rows.values():
            fn()
        torch.cuda.synchronize()
        times = {k: _cuda_time(fn, args.reps) for k, fn in rows.items()}
        print(f"{'variant':34s} {'best ms':>9s} {'median ms':>10s} {'ms/NFE':>8s}")
        for k, v in times.items():
            print(f"{k:34s} {min(v):9.3f} {statistics.median(v):10.3f} {statistics.median(v) / args.nfe:8.3f}")
        e, gr = statistics.median(times["deis_fast eager"]), statistics.median(times["deis_fast CUDA graph"])
        print(f"graph speedup over eager: {e / gr:.2f}x")
        ke, kg = _kernels(lambda: s(noise, out=out)), _kernels(lambda: g(noise, out=out))
        kn = _kernels(lambda: net(noise, torch.full((args.batch,), 500.0, device="cuda")))
        print(f"CUDA kernels per NFE: eager {ke / args.nfe:.1f}, graph replay {kg / args.nfe:.1f}, "
              f"network alone {kn:.0f} (sampler's own: {(ke - args.nfe * kn) / args.nfe:.1f}/NFE eager)")


if __name__ == "__main__":
    main()
