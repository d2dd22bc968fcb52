"""The ``deis-fast`` command line (also ``python -m deis_fast``).

    deis-fast demo                 # sample digits with several methods at NFE 5/10/20, PNGs + error table
    deis-fast demo --model flow    # the same with the embedded rectified-flow digits model
    deis-fast sample --method tab3 --nfe 10 --num 16             # embedded digits model -> PNG files
    deis-fast sample --model flow --nfe 10                       # embedded flow model -> PNG files
    deis-fast sample --model ./my-ddpm --nfe 10                  # a diffusers UNet2DModel directory
    deis-fast sample --tuned digits_nfe5.json                    # a grid / plan written by deis-fast tune
    deis-fast tune --model digits --nfe 5 --out digits_nfe5.json # tune a grid (--plan: a plan) to a model
    deis-fast plan --method pfdiff --nfe 4 [--json]              # the compiled plan, with coefficients
    deis-fast bench yardstick --nfe 5 10 20                      # the public yardstick table
    deis-fast bench quality ...                                  # when deis_fast.cli.bench has it
    deis-fast serve --model digits --port 8000                   # HTTP server (POST /generate), extra [serve]

Exit codes: 0 success, 2 bad usage, input, environment variable or output folder (one-line message),
1 internal failure (with the traceback), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

from .common import (ArgumentParser, HelpFormatter, UsageError, add_model_arguments, add_output_arguments,
                         add_solver_arguments, check_backend_env, claim_outdir, cli_terms, method_arg, nonneg_int, png_bytes,
                         positive_int, quiet_third_party, solver_options)

__all__ = ["main", "build_parser"]

DEMO_METHODS = ("ddim", "tab3", "logrho3", "dpmpp2", "ipndm4", "pfdiff")
DEMO_NFES = (5, 10, 20)
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "vp-linear", "vp-cosine", "ve")


def _schedule(name: str):
    from ..core.schedules import VESchedule, VPSchedule
    if name in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        return VPSchedule.discrete(name)
    if name == "vp-linear":
        return VPSchedule.linear()
    if name == "vp-cosine":
        return VPSchedule.cosine()
    if name == "ve":
        return VESchedule(0.002, 80.0)
    raise UsageError(f"unknown --schedule {name!r}; use one of {', '.join(SCHEDULES)}")


def _write(path: str, save: Any) -> None:
    """``save(path)`` (or the bytes ``save``) into a file of a claimed --outdir; an OSError there is bad output."""
    try:
        if isinstance(save, (bytes, str)):
            with open(path, "wb" if isinstance(save, bytes) else "w") as f:
                f.write(save)
        else:
            save(path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def _save_png(arr, path: str) -> None:
    """uint8 [H, W] or [H, W, C] -> PNG file."""
    import numpy as np
    a = np.asarray(arr)
    a = a[None] if a.ndim == 2 else np.transpose(a, (2, 0, 1))
    _write(path, png_bytes(np.ascontiguousarray(a)))


def _tile(images, cols: int, scale: int, pad: int = 2, fill: int = 255):
    """[N, H, W] or [N, H, W, C] uint8 -> one uint8 mosaic, ``cols`` per row, each image upscaled."""
    import numpy as np
    imgs = np.asarray(images)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w = imgs.shape[:3]
    rows = (n + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad) + imgs.shape[3:], fill, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = imgs[i]
    return out


# ----------------------------------------------------------------------------- demo

DEMO_COLS, DEMO_SCALE, DEMO_PAD, DEMO_LABEL_W = 16, 4, 2, 150
DEMO_FILES = ("samples.png", "error_vs_nfe.png", "results.json")


def _require(*modules: str) -> None:
    """Fail fast, with the install command, when an optional dependency of a command is missing."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = {"PIL": "Pillow"}
        raise UsageError(f"this command needs {', '.join(names.get(m, m) for m in missing)}: "
                         "pip install 'deis_fast[demo]'")


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..sampler import randn_per_sample, sample
    from .common import load_model
    from ..zoo.digits import to_image
    from ..testing import relative_errors

    _require("matplotlib", "PIL")  # before computing anything
    check_backend_env("cpu")
    t_wall = time.time()
    quick = args.quick
    n_samples = args.samples or (16 if quick else 64)
    ref_method, ref_nfe = ("tab3", 200) if quick else ("rho_rk4", 800)
    methods = args.methods or list(DEMO_METHODS)
    nfes = args.nfe or list(DEMO_NFES)
    if args.threads:
        torch.set_num_threads(args.threads)
    # the demo's own earlier output (its marker says "deis-fast demo") is replaced: the main command runs twice
    claim_outdir(args.outdir, "demo", DEMO_FILES, args.overwrite, rerun=True)
    loaded = load_model(args.model)
    model, sched, pred = loaded.model, loaded.schedule, loaded.prediction
    noise = randn_per_sample((n_samples,) + loaded.shape, range(args.seed, args.seed + n_samples))
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    with torch.no_grad():
        t0 = time.time()
        ref = sample(model, noise, sched, ref_method, ref_nfe, prediction=pred)
        t_ref = time.time() - t0
        log(f"reference: {ref_method} at {ref_nfe} NFE, {n_samples} samples, {t_ref:.1f} s")
        results: dict[str, dict[int, float]] = {}
        images: dict[tuple[str, int], Any] = {}
        for m in methods:
            results[m] = {}
            for n in nfes:
                x = sample(model, noise, sched, m, n, prediction=pred)
                results[m][n] = float(relative_errors(x, ref).median())
                images[(m, n)] = to_image(x[:DEMO_COLS, 0])
    # samples.png: reference row, then one row per (method, NFE)
    from PIL import Image, ImageDraw
    rows = [("reference", to_image(ref[:DEMO_COLS, 0]))] + [(f"{m} @ {n}", images[(m, n)]) for m in methods
                                                            for n in nfes]
    mosaic = _tile(np.concatenate([r[1] for r in rows]), min(DEMO_COLS, n_samples), DEMO_SCALE, DEMO_PAD)
    cell = 8 * DEMO_SCALE + DEMO_PAD
    canvas = Image.new("L", (DEMO_LABEL_W + mosaic.shape[1], mosaic.shape[0]), 255)
    canvas.paste(Image.fromarray(mosaic), (DEMO_LABEL_W, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (label, _) in enumerate(rows):
        draw.text((6, DEMO_PAD + i * cell + 10), label, fill=0)
    samples_png = os.path.join(args.outdir, "samples.png")
    _write(samples_png, canvas.save)
    # error_vs_nfe.png
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for m in methods:
        ax.loglog(nfes, [results[m][n] for n in nfes], "o-", label=m)
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel("median relative error")
    ax.set_title(f"Embedded {args.model} model: error vs NFE\n(reference: {ref_method} at {ref_nfe} NFE, "
                 f"{n_samples} samples)", fontsize=10)
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot_png = os.path.join(args.outdir, "error_vs_nfe.png")
    _write(plot_png, fig.savefig)
    plt.close(fig)
    wall = time.time() - t_wall
    table = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for m in methods:
        table.append(f"| {m} | " + " | ".join(f"{results[m][n]:.3g}" for n in nfes) + " |")
    report = {"model": args.model, "samples": n_samples, "seed": args.seed,
              "reference": {"method": ref_method, "nfe": ref_nfe},
              "errors": {m: {str(n): results[m][n] for n in nfes} for m in methods},
              "files": {"samples": samples_png, "plot": plot_png}, "wall_seconds": round(wall, 2)}
    _write(os.path.join(args.outdir, "results.json"), json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"\nEmbedded {args.model} model: median relative error to the reference ({ref_method}, "
              f"{ref_nfe} NFE), {n_samples} digits, same noise:\n")
        print("\n".join(table))
        print(f"\nwrote {samples_png} and {plot_png}  ({wall:.1f} s)")
    return 0


# ----------------------------------------------------------------------------- sample


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .common import load_model
    from ..zoo.digits import DIGITS_KINDS, to_image
    from .generate import make_sampler, sample_images

    check_backend_env("cpu")
    with quiet_third_party(args.quiet):
        loaded = load_model(args.model, prediction=args.prediction, schedule=args.schedule)
        sampler = make_sampler(loaded, args, args.model_batch)
    upscale = args.upscale or (4 if args.model in DIGITS_KINDS else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {seed: f"{seed:06d}.png" for seed in range(args.seed, args.seed + args.num)}
    claim_outdir(args.outdir, "sample", list(names.values()) + ["grid.png"], args.overwrite)
    from tqdm.auto import tqdm
    files: list[str] = []
    t0 = time.time()
    all_imgs = []
    from ..tuning.files import _label
    label = getattr(args, "method_label", None) or _label(args.method, solver_options(args))
    bar = tqdm(total=args.num, desc=f"deis-fast {label} @ {sampler.nfe} NFE", unit="img",
               disable=args.json or args.quiet)
    for start in range(0, args.num, args.batch_size):
        b = min(args.batch_size, args.num - start)
        seeds = list(range(args.seed + start, args.seed + start + b))
        imgs = to_image(sample_images(sampler, loaded.shape, seeds))  # [b, C, H, W] uint8
        for j, seed in enumerate(seeds):
            img = imgs[j]
            all_imgs.append(img)
            if upscale > 1:
                img = img.repeat(upscale, axis=1).repeat(upscale, axis=2)
            p = os.path.join(args.outdir, names[seed])
            _write(p, png_bytes(img))
            files.append(p)
        bar.update(b)
    bar.close()
    grid_png = os.path.join(args.outdir, "grid.png")
    hwc = [im.transpose(1, 2, 0) if im.shape[0] > 1 else im[0] for im in all_imgs]
    _save_png(_tile(hwc, min(8, len(hwc)), upscale), grid_png)
    secs = time.time() - t0
    info = {"method": args.method, "nfe": sampler.nfe, "num": len(files), "seconds": round(secs, 3),
            "outdir": args.outdir, "grid": grid_png, "files": files,
            "model": args.model if args.model not in DIGITS_KINDS else f"embedded {args.model} model"}
    if args.json:
        print(json.dumps(info))
    elif not args.quiet:
        print(f"wrote {len(files)} images + {grid_png} ({label}, {sampler.nfe} NFE, {secs:.1f} s)")
    return 0


# ----------------------------------------------------------------------------- plan


def plan_to_dict(plan) -> dict:
    from ..core.plan import Eval
    ops = []
    for op in plan.ops:
        if isinstance(op, Eval):
            ops.append({"op": "eval", "src": op.src, "dst": op.dst, "t": op.t, "model_t": op.model_t,
                        "alpha": op.alpha, "sigma": op.sigma, "target": op.target, "nfe_index": op.index})
        else:
            d = {"op": "combine", "dst": op.dst, "coefs": list(op.coefs), "srcs": list(op.srcs)}
            if op.noise_index >= 0:
                d.update(noise_coef=op.noise_coef, noise_index=op.noise_index)
            ops.append(d)
    return {"method": plan.method, "nfe": plan.nfe, "num_slots": plan.num_slots, "slot_names": list(plan.slot_names),
            "num_noise": plan.num_noise, "times": list(plan.times), "state_slots": list(plan.state_slots), "ops": ops}


def cmd_plan(args: argparse.Namespace) -> int:
    from ..sampler import build_plan
    from .common import resolve_nfe
    sched = _schedule(args.schedule)
    opts = solver_options(args)
    try:
        plan = build_plan(sched, args.method, resolve_nfe(args), args.grid, args.t_start, args.t_end,
                                    lower_order_final=args.lower_order_final,
                                    integer_timesteps=args.integer_timesteps, **opts)
    except (ValueError, TypeError) as e:
        raise UsageError(cli_terms(str(e), t_flags=True)) from None
    if args.json:
        d = plan_to_dict(plan)
        d["schedule"] = repr(sched)
        print(json.dumps(d))
    else:
        print(f"# schedule: {sched!r}")
        print(plan)
    return 0


# ----------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench as benchmarking
    check_backend_env("cpu")
    rest = list(args.args)
    if args.which == "yardstick":
        return int(benchmarking.yardstick_main(rest) or 0)
    return int(benchmarking.quality_main(rest) or 0)


# ----------------------------------------------------------------------------- parser


def cmd_methods(args: argparse.Namespace) -> int:
    from ..solvers import ALIASES, describe_methods
    for name, text in describe_methods():
        print(f"{name:14s} {text}")
    print("aliases: " + ", ".join(f"{a} = {m}" for a, m in ALIASES.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__
    from . import tune as cli_tune, generate
    fmt = HelpFormatter
    p = ArgumentParser(
        prog="deis-fast",
        description="Few-step diffusion sampling (DEIS family, iPNDM, DPM-Solver++-style, PFDiff) with fused updates.",
        epilog="Run 'deis-fast COMMAND --help' for the options of a command, 'deis-fast methods' for the solvers. "
               "Exit codes: 0 ok; 2 bad usage, input, environment variable or output folder (one line); "
               "1 internal failure (traceback); 130 interrupted (Ctrl-C).")
    p.add_argument("--version", action="version", version=f"deis_fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="sample digits with several methods at NFE 5/10/20; PNG grid, plot, error table",
                       description="Samples 64 digits from the embedded model with several methods at NFE 5, 10 "
                                   "and 20 from the same seeded noise, writes samples.png (the first 16 digits; "
                                   "rows = method x NFE), error_vs_nfe.png and results.json, and prints the error "
                                   "table. Error: median relative error to a high-accuracy reference (rho_rk4 at "
                                   "800 NFE) from the same noise. --model flow runs the embedded rectified-flow "
                                   "model instead (from t = 1). Needs the [demo] extra (matplotlib, Pillow).")
    d.add_argument("--model", choices=("digits", "flow"), default="digits",
                   help="embedded model: digits (eps, VP) or flow (rectified flow, velocity)")
    add_output_arguments(d, "./deis_fast_demo")
    d.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    d.add_argument("--seed", type=nonneg_int, default=0, help="first per-sample seed")
    d.add_argument("--samples", type=positive_int, default=None, help="number of digits (default 64)")
    d.add_argument("--methods", type=method_arg, nargs="+", default=None,
                   help=f"methods (default: {' '.join(DEMO_METHODS)})")
    d.add_argument("--nfe", type=positive_int, nargs="+", default=None,
                   help=f"NFE budgets (default: {' '.join(map(str, DEMO_NFES))})")
    d.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    d.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tests: fewer samples, cheaper reference
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample", formatter_class=fmt,
                       help="write sample images (PNG) from an embedded model (digits, flow) or a diffusers model",
                       description="Samples images and writes one PNG per image ({seed:06d}.png) plus grid.png "
                                   "into a new or empty --outdir. Image i depends only on seed+i and has the pixels "
                                   "'deis-fast generate' makes for that seed (the same PNG bytes with --upscale 1; "
                                   "generate names its files {index:08d}.png).")
    add_model_arguments(s)
    add_solver_arguments(s)
    s.add_argument("--seed", type=nonneg_int, default=0, help="first per-sample seed")
    s.add_argument("--num", type=positive_int, default=16, help="number of images")
    s.add_argument("--batch-size", type=positive_int, default=64, help="images per sampler call")
    s.add_argument("--model-batch", type=positive_int, default=generate.MODEL_BATCH,
                   help="the network always sees this many samples per call (results do not depend on --batch-size)")
    s.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    s.add_argument("--upscale", type=positive_int, default=None,
                   help="nearest-neighbour upscaling of the PNGs (default: 4 for the 8x8 digits, else 1)")
    add_output_arguments(s, "./deis_fast_samples")
    s.add_argument("--json", action="store_true", help="print a JSON summary (file list, timing) on stdout")
    s.add_argument("--quiet", action="store_true",
                   help="no progress bar, no summary line, no Python or diffusers warnings")
    cli_tune.add_tuned_argument(s)
    s.set_defaults(func=cmd_sample)

    pl = sub.add_parser("plan", formatter_class=fmt, help="print the compiled plan (network calls and fused combines)",
                        description="Prints the plan a method compiles to: Evals (network calls) and Combines "
                                    "(fused linear combinations with their float64 coefficients).")
    add_solver_arguments(pl)
    pl.add_argument("--schedule", default="linear", choices=SCHEDULES,
                    help="linear/scaled_linear/squaredcos_cap_v2 (discrete DDPM betas), vp-linear, vp-cosine, "
                         "ve (EDM sigma 0.002..80)")
    pl.add_argument("--t-start", type=float, default=None, help="first time (default: the schedule's t_max)")
    pl.add_argument("--t-end", type=float, default=None, help="last time (default: the schedule's t_min)")
    pl.add_argument("--lower-order-final", action="store_true",
                    help="lower the order on the last steps of a multistep method (diffusers' lower_order_final)")
    pl.add_argument("--integer-timesteps", action="store_true", help="round a discrete grid to training timesteps")
    pl.add_argument("--json", action="store_true", help="machine-readable plan (ops with coefficients)")
    pl.set_defaults(func=cmd_plan)

    m = sub.add_parser("methods", help="list the solvers", description="Lists every method with its order.")
    m.set_defaults(func=cmd_methods)

    b = sub.add_parser("bench", help="benchmarks: 'yardstick' (public mixture table) or 'quality'",
                       description="deis-fast bench yardstick [ARGS] runs the public yardstick "
                                   "(see 'deis-fast bench yardstick --help'); deis-fast bench quality [ARGS] runs "
                                   "the quality benchmark.")
    b.add_argument("which", choices=("yardstick", "quality"))
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("generate", formatter_class=fmt,
                       help="bulk, resumable, seed-deterministic generation (FID-scale runs)",
                       description=(generate.__doc__ or "").strip().split("\n")[0] or None)
    generate.add_arguments(g)
    g.set_defaults(func=generate.run)
    cli_tune.add_tune_parser(sub)
    from ..serving import command as serve_command
    sv = sub.add_parser("serve", formatter_class=fmt, help="HTTP server: step-level batched sampling (extra [serve])",
                        description=(serve_command.__doc__ or "").strip().split("\n")[0])
    serve_command.add_arguments(sv)
    sv.set_defaults(func=serve_command.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # 'bench' forwards everything after its name, --help included
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in ("yardstick", "quality"):
        args = argparse.Namespace(command="bench", which=argv[1], args=argv[2:], func=cmd_bench)
    else:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            return int(e.code or 0) if not isinstance(e.code, str) else 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SystemExit as e:  # sub-tools using argparse
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except UsageError as e:
        print(f"deis-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deis-fast: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `deis-fast plan ... | head`: the reader left, not a failure
        try:
            sys.stdout = open(os.devnull, "w")  # silence the flush at interpreter exit
        except OSError:
            pass
        return 0
    except Exception as e:  # noqa: BLE001 - an internal failure: the traceback (for a bug report), then exit 1
        import traceback
        traceback.print_exc()
        print(f"deis-fast {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
