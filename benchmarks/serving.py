"""Serving benchmark: one request at a time vs. whole-request dynamic batching vs. the step-level engine.

    nice python benchmarks/serving.py [--device cpu|cuda] [--requests 600] [--json out.json]

Mixed open-loop traffic on the embedded digits U-Net: each request is one sample with NFE 5, 8 or 10, a method
among tab3 / dpmpp2 / unipc3 / ddim, and one in four with classifier-free guidance (the digits model is
unconditional: guidance with an empty ``uncond`` costs what CFG costs, a doubled batch, and gives the unguided
sample). Three servers over the same model:

(a) ``sequential``: one request at a time, each a ``deis_fast.Sampler`` call (samplers cached per configuration);
(b) ``dynamic``: whole-request batching as Ray Serve's ``@serve.batch`` does it: when the worker is free it waits up to
    ``--window`` seconds (Ray's default 0.01) for up to ``--max-batch`` requests, then runs the batch, one batched
    Sampler call per distinct (method, NFE, CFG) in it; every request of the batch answers when the batch is done;
(c) ``engine``: :class:`deis_fast.serving.Engine`, step-level continuous batching (``--max-batch`` network rows).

Arrivals are Poisson at fractions of (a)'s measured capacity, plus a saturation run (every request queued at t=0).
Each server is driven by a trace-driven clock: a request arrives at its Poisson time; the server's work (sampler
calls, engine ticks, submits) is *run for real* and its measured time advances the clock: the CPU time of the
serving thread on a one-thread CPU run (``time.thread_time``: what an idle dedicated core would take, unaffected by
other processes on a shared machine), wall time otherwise (CUDA: synchronized). So the numbers are the servers'
compute and scheduling, without HTTP or thread hand-off costs (which all three would pay alike).
Latency = finish - arrival. Reports throughput at saturation, p50/p99 latency per load, and the ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deis_fast  # noqa: E402
from deis_fast.serving import Engine, GenerateRequest  # noqa: E402

METHODS = ("tab3", "dpmpp2", "unipc3", "ddim")
NFES = (5, 8, 10)
CFG_SCALE = 2.0
CLOCK = time.perf_counter   # main() picks time.thread_time on a 1-thread CPU run (immune to other processes)


def make_traffic(n: int, seed: int) -> list[tuple[str, int, bool, int]]:
    """(method, nfe, cfg, sample seed) of n requests: uniform NFE and method, one in four with CFG."""
    rng = np.random.default_rng(seed)
    return [(METHODS[rng.integers(len(METHODS))], int(NFES[rng.integers(len(NFES))]), bool(rng.random() < 0.25),
             1000 + i) for i in range(n)]


def arrivals(n: int, rate: float | None, seed: int) -> np.ndarray:
    """Poisson arrival times at ``rate`` per second (None: saturation, all at 0)."""
    if rate is None:
        return np.zeros(n)
    return np.cumsum(np.random.default_rng(seed + 1).exponential(1.0 / rate, n))


class Samplers:
    """deis_fast.Sampler per (method, nfe, cfg), as a server keeps them."""

    def __init__(self, m: Any, device: str):
        self.m, self.device, self.cache = m, device, {}

    def run(self, reqs: list[tuple[str, int, bool, int]]) -> torch.Tensor:
        method, nfe, cfg, _ = reqs[0]
        key = (method, nfe, cfg)
        s = self.cache.get(key)
        if s is None:
            s = self.cache[key] = deis_fast.Sampler(self.m.model, self.m.schedule, method, nfe,
                                                    prediction=self.m.prediction,
                                                    guidance_scale=CFG_SCALE if cfg else None,
                                                    uncond={} if cfg else None)
        noise = deis_fast.randn_per_sample((len(reqs),) + self.m.shape, [r[3] for r in reqs], self.device)
        out = s(noise)
        if out.is_cuda:
            torch.cuda.synchronize()
        return out


def run_sequential(traffic, arr, samplers: Samplers) -> np.ndarray:
    t, lat = 0.0, np.zeros(len(traffic))
    for i, r in enumerate(traffic):
        t = max(t, arr[i])
        t0 = CLOCK()
        samplers.run([r])
        t += CLOCK() - t0
        lat[i] = t - arr[i]
    return lat


def run_dynamic(traffic, arr, samplers: Samplers, window: float, max_batch: int) -> tuple[np.ndarray, list]:
    t, i, n, lat, sizes = 0.0, 0, len(traffic), np.zeros(len(traffic)), []
    while i < n:
        t = max(t, arr[i])                      # the worker is free and a request waits
        deadline = t + window
        j = i
        while j < n and j - i < max_batch and arr[j] <= deadline:
            j += 1
        start = max(t, arr[j - 1]) if j - i == max_batch else deadline   # full: go at once; else at the timeout
        groups: dict[tuple, list] = {}
        for r in traffic[i:j]:
            groups.setdefault(r[:3], []).append(r)
        t0 = CLOCK()
        for g in groups.values():
            samplers.run(g)
        t = start + (CLOCK() - t0)
        lat[i:j] = t - arr[i:j]
        sizes.append(j - i)
        i = j
    return lat, sizes


def run_engine(traffic, arr, m: Any, device: str, max_batch: int) -> tuple[np.ndarray, list]:
    eng = Engine(m.model, m.schedule, m.prediction, shape=m.shape, device=device, max_batch=max_batch,
                 max_queue=len(traffic) + 1)
    t, i, n, lat, rows = 0.0, 0, len(traffic), np.full(len(traffic), np.nan), []
    tickets: list = []
    pending: dict[int, Any] = {}
    while i < n or pending:
        t0 = CLOCK()
        while i < n and arr[i] <= t:
            method, nfe, cfg, seed = traffic[i]
            pending[i] = eng.submit(GenerateRequest(seeds=(seed,), method=method, nfe=nfe,
                                                    guidance_scale=CFG_SCALE if cfg else None,
                                                    uncond={} if cfg else None))
            i += 1
        if not pending:
            t = arr[i]
            continue
        eng.step()
        if device != "cpu":
            torch.cuda.synchronize()
        t += CLOCK() - t0
        rows.append(eng.last_batch_rows)
        for k in [k for k, tk in pending.items() if tk.future.done()]:
            pending.pop(k).result()
            lat[k] = t - arr[k]
    return lat, rows


def pct(lat: np.ndarray, q: float) -> float:
    return float(np.percentile(lat, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--requests", type=int, default=600, help="requests per run")
    ap.add_argument("--loads", default="0.5,0.8", help="arrival rates as fractions of (a)'s capacity")
    ap.add_argument("--window", type=float, default=0.01, help="(b)'s batching window, seconds")
    ap.add_argument("--max-batch", type=int, default=64, help="(b): requests per batch; (c): network rows per call")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.thread_time if args.device == "cpu" and args.threads == 1 else time.perf_counter
    t_start = time.time()
    m = deis_fast.load_model("digits", device=args.device)
    samplers = Samplers(m, args.device)
    traffic = make_traffic(args.requests, args.seed)
    with torch.inference_mode():
        # warm-up: every sampler configuration once, the engine once
        for cfg in {r[:3] for r in traffic}:
            samplers.run([cfg + (0,)])
        run_engine(traffic[:32], np.zeros(32), m, args.device, args.max_batch)
        res: dict[str, Any] = {"device": args.device, "threads": args.threads, "requests": args.requests,
                               "clock": CLOCK.__name__,
                               "window_s": args.window, "max_batch": args.max_batch, "runs": {}}
        sat = arrivals(args.requests, None, args.seed)
        runs = {"sequential": lambda a: (run_sequential(traffic, a, samplers), None),
                "dynamic": lambda a: run_dynamic(traffic, a, samplers, args.window, args.max_batch),
                "engine": lambda a: run_engine(traffic, a, m, args.device, args.max_batch)}
        for name, fn in runs.items():
            lat, extra = fn(sat)
            res["runs"][f"{name}@sat"] = {"throughput_rps": args.requests / float(lat.max()),
                                          "mean_batch": float(np.mean(extra)) if extra else 1.0}
        cap = res["runs"]["sequential@sat"]["throughput_rps"]
        res["capacity_a_rps"] = cap
        for load in [float(x) for x in args.loads.split(",")]:
            a = arrivals(args.requests, load * cap, args.seed)
            for name, fn in runs.items():
                lat, extra = fn(a)
                res["runs"][f"{name}@{load:g}"] = {"rate_rps": load * cap, "p50_ms": 1e3 * pct(lat, 50),
                                                   "p99_ms": 1e3 * pct(lat, 99), "mean_ms": 1e3 * float(lat.mean()),
                                                   "mean_batch": float(np.mean(extra)) if extra else 1.0}
    r = res["runs"]
    res["ratios"] = {
        "throughput_sat_engine_over_sequential": r["engine@sat"]["throughput_rps"] / cap,
        "throughput_sat_dynamic_over_sequential": r["dynamic@sat"]["throughput_rps"] / cap,
        "throughput_sat_engine_over_dynamic": r["engine@sat"]["throughput_rps"] / r["dynamic@sat"]["throughput_rps"]}
    for load in [float(x) for x in args.loads.split(",")]:
        for q in ("p50", "p99"):
            e, d, s = (r[f"{k}@{load:g}"][f"{q}_ms"] for k in ("engine", "dynamic", "sequential"))
            res["ratios"][f"{q}@{load:g}_engine_over_dynamic"] = e / d
            res["ratios"][f"{q}@{load:g}_engine_over_sequential"] = e / s
    res["seconds"] = round(time.time() - t_start, 1)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def report(res: dict) -> str:
    r, cap = res["runs"], res["capacity_a_rps"]
    lines = [f"device {res['device']}, {res['threads']} thread(s), clock {res['clock']}, {res['requests']} requests per run, "
             f"window {1e3 * res['window_s']:g} ms, max batch {res['max_batch']}; (a)'s capacity {cap:.1f} req/s",
             "", "| server | throughput at saturation | " + " | ".join(
                 f"p50 / p99 at {k.split('@')[1]}x" for k in r if k.startswith("sequential@") and "sat" not in k) + " |",
             "|---|---|" + "---|" * sum(1 for k in r if k.startswith("sequential@") and "sat" not in k)]
    for name, label in (("sequential", "(a) one at a time"), ("dynamic", "(b) whole-request batching"),
                        ("engine", "(c) step-level engine")):
        sat = r[f"{name}@sat"]
        cells = [f"{sat['throughput_rps']:.1f} req/s ({sat['throughput_rps'] / cap:.2f}x)"]
        for k, v in r.items():
            if k.startswith(name + "@") and "sat" not in k:
                cells.append(f"{v['p50_ms']:.1f} / {v['p99_ms']:.1f} ms")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {k}: {v:.2f}" for k, v in res["ratios"].items()]
    lines.append(f"- wall time of the benchmark: {res['seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
