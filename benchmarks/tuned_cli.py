"""``deis-fast tune`` then ``deis-fast sample --tuned`` on noise seeds tuning never saw (issue 26's acceptance).

For each embedded model (digits: VP eps; flow: rectified flow) and NFE, runs the real command line
``deis-fast tune --model M --nfe N --out FILE ...`` (no --method: the method search; seeds 0..95: 64 calibration +
32 held-out noises), then the sample path of ``deis-fast sample`` itself (its parser, ``generate.make_sampler`` and
``sample_images``: the same code, float32, per-seed noise) with and without ``--tuned FILE`` on seeds 10000..10063,
and reports the median per-sample relative error of each to a float64 fine solve of the same noise (rho_rk4 @ 800
NFE). ``--method X`` tunes X alone.

    python benchmarks/tuned_cli.py --out-md benchmarks/tuned_cli.md --save-dir benchmarks/tuned
"""
import argparse
import functools
import os
import sys
import time

import torch

from deis_fast.cli import main as cli
from deis_fast.cli.common import initial_noise, load_model
from deis_fast.cli.generate import make_sampler, sample_images
from deis_fast.sampler import Sampler
from deis_fast.testing import relative_errors
from deis_fast.tuning.files import _label, load_tuned
from deis_fast.tuning.search import _reference_grid


@functools.lru_cache(maxsize=None)
def fine_solution(model: str, seeds: tuple[int, ...]) -> torch.Tensor:
    fine = load_model(model, dtype=torch.float64)
    z, _ = initial_noise(fine.shape, seeds, dtype=torch.float64)
    return Sampler(fine.model, fine.schedule, "rho_rk4", 800, _reference_grid(fine.schedule), fine.prediction,
                   check_finite=False)(z)


def unseen_error(model: str, nfe: int, method: str | None, tuned: str | None, seeds: list[int]) -> float:
    argv = ["sample", "--model", model, "--nfe", str(nfe)] + (["--method", method] if method else []) + \
        (["--tuned", tuned] if tuned else [])
    args = cli.build_parser().parse_args(argv)
    loaded = load_model(args.model)
    x = sample_images(make_sampler(loaded, args, args.model_batch), loaded.shape, seeds)
    return float(relative_errors(x, fine_solution(model, tuple(seeds))).median())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["digits", "flow"])
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 7])
    ap.add_argument("--method", default="auto",
                    help="'auto': plain `deis-fast tune` (no --method: the method search); or a method to tune")
    ap.add_argument("--plan", action="store_true", help="pass --plan to deis-fast tune")
    ap.add_argument("--plan-iters", type=int, default=150)
    ap.add_argument("--time-budget", type=float, default=60.0, help="--time-budget of deis-fast tune (its default: 60)")
    ap.add_argument("--save-dir", default="benchmarks/tuned")
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--cache", default="", help="reference cache of deis-fast tune ('': none)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(a.save_dir, exist_ok=True)
    seeds = list(range(10000, 10064))
    auto = a.method == "auto"
    rows = ["| model | NFE | tune command | method in the file | held-out: untuned -> tuned (kept) | unseen: `sample` "
            f"default (tab3) | unseen: untuned {'default' if auto else a.method} | unseen: `--tuned` | gain over the "
            "default | tune time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in a.models:
        for n in a.nfe:
            name = f"{m}{'' if auto else '_' + a.method}_nfe{n}{'_plan' if a.plan else ''}.json"
            out = os.path.join(a.save_dir, name)
            cmd = ["tune", "--model", m] + ([] if auto else ["--method", a.method]) + ["--nfe", str(n), "--out", out,
                                                                                         "--calibration", "64",
                   "--held-out", "32", "--time-budget", str(a.time_budget), "--threads", "1", "--cache", a.cache]
            if a.plan:
                cmd += ["--plan", "--plan-iters", str(a.plan_iters)]
            t0 = time.time()
            rc = cli.main(cmd)
            secs = time.time() - t0
            if rc:
                print(f"deis-fast {' '.join(cmd)} failed ({rc})", file=sys.stderr)
                return rc
            t = load_tuned(out)
            default = unseen_error(m, n, "tab3", None, seeds)
            before = default if a.method in ("tab3", "auto") else unseen_error(m, n, a.method, None, seeds)
            after = unseen_error(m, n, None, out, seeds)   # no --method: the file's
            e = t.errors
            rows.append(f"| {m} | {n} | `deis-fast {' '.join(cmd)}` | {_label(t.method, t.options)} | "
                        f"{e['held_out_untuned']:.4g} -> "
                        f"{e['held_out_tuned']:.4g} ({t.kind}) | {default:.4g} | {before:.4g} | {after:.4g} | "
                        f"{default / after:.2f}x | {secs:.0f} s |")
            print(rows[-1], flush=True)
    text = "\n".join(rows)
    print(text)
    if a.out_md:
        with open(a.out_md, "w") as f:
            f.write(f"`python benchmarks/tuned_cli.py {' '.join(argv or sys.argv[1:])}` (1 CPU thread); unseen seeds "
                    f"10000..10063, median relative error to rho_rk4 @ 800 NFE (float64)\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
