"""The ``deis-fast`` command line (also ``python -m deis_fast``).

    deis-fast demo                 # sample digits with several methods at NFE 5/10/20, PNGs + error table
    deis-fast sample --method tab3 --nfe 10 --num 16             # embedded digits model -> PNG files
    deis-fast sample --model ./my-ddpm --nfe 10                  # a diffusers UNet2DModel directory
    deis-fast plan --method pfdiff --nfe 4 [--json]              # the compiled plan, with coefficients
    deis-fast bench yardstick --nfe 5 10 20                      # the public yardstick table
    deis-fast bench quality ...                                  # when deis_fast.benchmarking has it

Exit codes: 0 success, 2 bad usage or input (one-line message), 1 runtime failure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

DEMO_METHODS = ("ddim", "tab3", "logrho3", "dpmpp2", "ipndm4", "pfdiff")
DEMO_NFES = (5, 10, 20)
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "vp-linear", "vp-cosine", "ve")


class UsageError(Exception):
    """Bad input detected by the CLI: exit code 2."""


# ----------------------------------------------------------------------------- helpers


def _parse_grid(text: str | None) -> Any:
    """A grid name, or a comma-separated list of times."""
    if text is None:
        return None
    from .grids import GRIDS
    if text in GRIDS:
        return text
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--grid must be one of {', '.join(GRIDS)} or a comma-separated list of times, "
                         f"got {text!r}") from None


def _parse_pfdiff(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, h = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--pfdiff takes k,h (e.g. 2,1), got {text!r}") from None
    return k, h


def _schedule(name: str):
    from .schedules import VESchedule, VPSchedule
    if name in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        return VPSchedule.discrete(name)
    if name == "vp-linear":
        return VPSchedule.linear()
    if name == "vp-cosine":
        return VPSchedule.cosine()
    if name == "ve":
        return VESchedule(0.002, 80.0)
    raise UsageError(f"unknown --schedule {name!r}; use one of {', '.join(SCHEDULES)}")


def _save_png(arr, path: str) -> None:
    from PIL import Image
    Image.fromarray(arr).save(path)


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


def demo_grid_size(cols: int = DEMO_COLS, rows: int = 1 + len(DEMO_METHODS) * len(DEMO_NFES)) -> tuple[int, int]:
    """(width, height) in pixels of the demo's samples.png."""
    cell = 8 * DEMO_SCALE + DEMO_PAD
    return DEMO_LABEL_W + cols * cell + DEMO_PAD, rows * cell + DEMO_PAD


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import deis_fast
    from .digits import load_digits_model, to_image
    from .testing import relative_errors

    t_wall = time.time()
    quick = args.quick
    n_samples = args.samples or (16 if quick else 64)
    ref_method, ref_nfe = ("tab3", 200) if quick else ("rho_rk4", 800)
    methods = args.methods or list(DEMO_METHODS)
    nfes = args.nfe or list(DEMO_NFES)
    for m in methods:
        if m != "pfdiff":
            deis_fast.solvers.get_method(m)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.outdir, exist_ok=True)
    sched = deis_fast.VPSchedule.discrete("linear")
    model = load_digits_model()
    noise = deis_fast.randn_per_sample((n_samples, 1, 8, 8), range(args.seed, args.seed + n_samples))
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    with torch.no_grad():
        t0 = time.time()
        ref = deis_fast.sample(model, noise, sched, ref_method, ref_nfe)
        t_ref = time.time() - t0
        log(f"reference: {ref_method} at {ref_nfe} NFE, {n_samples} samples, {t_ref:.1f} s")
        results: dict[str, dict[int, float]] = {}
        images: dict[tuple[str, int], Any] = {}
        for m in methods:
            results[m] = {}
            for n in nfes:
                x = deis_fast.sample(model, noise, sched, m, n)
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
    canvas.save(samples_png)
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
    ax.set_title(f"Embedded digits model: error vs NFE\n(reference: {ref_method} at {ref_nfe} NFE, "
                 f"{n_samples} samples)", fontsize=10)
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot_png = os.path.join(args.outdir, "error_vs_nfe.png")
    fig.savefig(plot_png)
    plt.close(fig)
    wall = time.time() - t_wall
    table = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for m in methods:
        table.append(f"| {m} | " + " | ".join(f"{results[m][n]:.3g}" for n in nfes) + " |")
    report = {"samples": n_samples, "seed": args.seed, "reference": {"method": ref_method, "nfe": ref_nfe},
              "errors": {m: {str(n): results[m][n] for n in nfes} for m in methods},
              "files": {"samples": samples_png, "plot": plot_png}, "wall_seconds": round(wall, 2)}
    with open(os.path.join(args.outdir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"\nMedian relative error to the reference ({ref_method}, {ref_nfe} NFE), {n_samples} digits, "
              f"same noise:\n")
        print("\n".join(table))
        print(f"\nwrote {samples_png} and {plot_png}  ({wall:.1f} s)")
    return 0


# ----------------------------------------------------------------------------- sample


def _load_diffusers_model(path: str):
    if not os.path.isdir(path):
        raise UsageError(f"--model {path!r} is not a directory (a diffusers UNet2DModel or pipeline folder)")
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise UsageError("--model needs diffusers (pip install diffusers)") from None
    sub = "unet" if os.path.isdir(os.path.join(path, "unet")) else None
    cfg_path = None
    for cand in (os.path.join(path, "scheduler", "scheduler_config.json"), os.path.join(path, "scheduler_config.json")):
        if os.path.isfile(cand):
            cfg_path = cand
            break
    if cfg_path is None:
        raise UsageError(f"no scheduler config found in {path!r} (looked for scheduler/scheduler_config.json and "
                         "scheduler_config.json)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    unet = UNet2DModel.from_pretrained(path, subfolder=sub, use_safetensors=True).eval()
    return unet, cfg


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import deis_fast
    from .schedules import schedule_from_diffusers_config

    grid = _parse_grid(args.grid)
    pfdiff = _parse_pfdiff(args.pfdiff)
    if args.num < 1 or args.batch_size < 1:
        raise UsageError("--num and --batch-size must be >= 1")
    if args.model:
        unet, cfg = _load_diffusers_model(args.model)
        sched = schedule_from_diffusers_config(cfg)
        prediction = cfg.get("prediction_type", "epsilon")
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (unet.config.in_channels,) + size
        model = unet
        upscale = args.upscale or 1
    else:
        from .digits import DIGITS_SHAPE, load_digits_model
        sched = deis_fast.VPSchedule.discrete("linear")
        prediction = "eps"
        shape = DIGITS_SHAPE
        model = load_digits_model()
        upscale = args.upscale or 4
    sampler = deis_fast.Sampler(model, sched, args.method, args.nfe, grid, prediction, pfdiff=pfdiff,
                                eta=args.eta)
    os.makedirs(args.outdir, exist_ok=True)
    from tqdm.auto import tqdm
    files: list[str] = []
    t0 = time.time()
    all_imgs = []
    bar = tqdm(total=args.num, desc=f"deis-fast {args.method} @ {sampler.nfe} NFE", unit="img",
               disable=args.json or args.quiet)
    with torch.no_grad():
        for start in range(0, args.num, args.batch_size):
            b = min(args.batch_size, args.num - start)
            seeds = range(args.seed + start, args.seed + start + b)
            noise = deis_fast.randn_per_sample((b,) + tuple(shape), seeds)
            gens = [torch.Generator().manual_seed(10_000_019 + s) for s in seeds] if sampler.plan.num_noise else None
            x = sampler(noise, generator=gens)
            imgs = np.round(((x.float() / 2 + 0.5).clamp(0, 1) * 255).numpy()).astype(np.uint8)
            imgs = imgs.transpose(0, 2, 3, 1)
            if imgs.shape[-1] == 1:
                imgs = imgs[..., 0]
            for j in range(b):
                img = imgs[j]
                if upscale > 1:
                    img = img.repeat(upscale, axis=0).repeat(upscale, axis=1)
                p = os.path.join(args.outdir, f"{args.seed + start + j:06d}.png")
                _save_png(img, p)
                files.append(p)
                all_imgs.append(imgs[j])
            bar.update(b)
    bar.close()
    grid_png = os.path.join(args.outdir, "grid.png")
    _save_png(_tile(all_imgs, min(8, len(all_imgs)), upscale), grid_png)
    secs = time.time() - t0
    info = {"method": args.method, "nfe": sampler.nfe, "num": len(files), "seconds": round(secs, 3),
            "outdir": args.outdir, "grid": grid_png, "files": files,
            "model": args.model or "embedded digits model"}
    if args.json:
        print(json.dumps(info))
    elif not args.quiet:
        print(f"wrote {len(files)} images + {grid_png} ({args.method}, {sampler.nfe} NFE, {secs:.1f} s)")
    return 0


# ----------------------------------------------------------------------------- plan


def plan_to_dict(plan) -> dict:
    from .plan import Eval
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
            "num_noise": plan.num_noise, "times": list(plan.times), "ops": ops}


def cmd_plan(args: argparse.Namespace) -> int:
    import deis_fast
    sched = _schedule(args.schedule)
    grid = _parse_grid(args.grid)
    nfe = None if (args.nfe == 0 or (args.nfe is None and isinstance(grid, list))) else (args.nfe or 10)
    plan = deis_fast.build_plan(sched, args.method, nfe, grid, args.t_start, args.t_end, eta=args.eta,
                                lower_order_final=args.lower_order_final, integer_timesteps=args.integer_timesteps,
                                pfdiff=_parse_pfdiff(args.pfdiff))
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
    from . import benchmarking
    rest = list(args.args)
    if args.which == "yardstick":
        return int(benchmarking.yardstick_main(rest) or 0)
    fn = getattr(benchmarking, "quality_main", None)
    if fn is None:
        print("deis-fast: error: 'bench quality' is not available in this version (deis_fast.benchmarking has no "
              "quality_main)", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


# ----------------------------------------------------------------------------- parser


def _generate_module():
    try:
        from . import generate
    except Exception:  # noqa: BLE001 - the subcommand is optional
        return None
    if callable(getattr(generate, "add_arguments", None)) and callable(getattr(generate, "run", None)):
        return generate
    return None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(
        prog="deis-fast",
        description="Few-step diffusion sampling (DEIS family, iPNDM, DPM-Solver++-style, PFDiff) with fused updates.",
        epilog="Run 'deis-fast COMMAND --help' for the options of a command. Exit codes: 0 ok, 2 bad usage or "
               "input, 1 runtime failure.")
    p.add_argument("--version", action="version", version=f"deis_fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="sample digits with several methods at NFE 5/10/20; PNG grid, plot, error table",
                       description="Samples digits from the embedded model with several methods at NFE 5, 10 and 20 "
                                   "from the same seeded noise, writes samples.png (rows = method x NFE), "
                                   "error_vs_nfe.png and results.json, and prints the error table. Error: median "
                                   "relative error to a high-accuracy reference (rho_rk4 at 800 NFE) from the "
                                   "same noise.")
    d.add_argument("--outdir", default="./deis_fast_demo", help="output folder (default: %(default)s)")
    d.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    d.add_argument("--seed", type=int, default=0, help="first per-sample seed (default: %(default)s)")
    d.add_argument("--samples", type=int, default=None, help=argparse.SUPPRESS)
    d.add_argument("--methods", nargs="+", default=None, help=argparse.SUPPRESS)
    d.add_argument("--nfe", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tests: fewer samples, cheaper reference
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample", help="write sample images (PNG) from the embedded model or a diffusers model",
                       description="Samples images and writes one PNG per image plus grid.png. Sample i depends "
                                   "only on seed+i (not on --batch-size).")
    s.add_argument("--model", default=None, metavar="PATH",
                   help="a diffusers UNet2DModel folder (or pipeline folder with unet/ and scheduler/); "
                        "default: the embedded 8x8 digits model")
    s.add_argument("--method", default="tab3", help="deis_fast method (default: %(default)s); see README")
    s.add_argument("--nfe", type=int, default=10, help="network evaluations (default: %(default)s)")
    s.add_argument("--grid", default=None, help="time_uniform, time_quadratic, logsnr, karras, or comma-separated "
                                                "times (default: the method's recommended grid)")
    s.add_argument("--pfdiff", default=None, metavar="K,H", help="wrap a first-order method in PFDiff-(k,h)")
    s.add_argument("--eta", type=float, default=1.0, help="noise level of ddim_eta (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="first per-sample seed (default: %(default)s)")
    s.add_argument("--num", type=int, default=16, help="number of images (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    s.add_argument("--upscale", type=int, default=None, help="nearest-neighbour upscaling of the PNGs "
                                                             "(default: 4 for the 8x8 digits, else 1)")
    s.add_argument("--outdir", default="./deis_fast_samples", help="output folder (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="print a JSON summary (file list, timing) on stdout")
    s.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    s.set_defaults(func=cmd_sample)

    pl = sub.add_parser("plan", help="print the compiled plan (network calls and fused combines)",
                        description="Prints the plan a method compiles to: Evals (network calls) and Combines "
                                    "(fused linear combinations with their float64 coefficients).")
    pl.add_argument("--method", default="tab3", help="deis_fast method (default: %(default)s)")
    pl.add_argument("--nfe", type=int, default=None, help="network evaluations (default: 10; with a list --grid: "
                                                          "taken from the grid)")
    pl.add_argument("--grid", default=None, help="grid name or comma-separated times")
    pl.add_argument("--schedule", default="linear", choices=SCHEDULES,
                    help="linear/scaled_linear/squaredcos_cap_v2 (discrete DDPM betas), vp-linear, vp-cosine, "
                         "ve (EDM sigma 0.002..80); default: %(default)s")
    pl.add_argument("--pfdiff", default=None, metavar="K,H", help="wrap a first-order method in PFDiff-(k,h)")
    pl.add_argument("--t-start", type=float, default=None)
    pl.add_argument("--t-end", type=float, default=None)
    pl.add_argument("--eta", type=float, default=1.0)
    pl.add_argument("--lower-order-final", action="store_true")
    pl.add_argument("--integer-timesteps", action="store_true", help="round a discrete grid to training timesteps")
    pl.add_argument("--json", action="store_true", help="machine-readable plan (ops with coefficients)")
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", help="benchmarks: 'yardstick' (public mixture table) or 'quality'",
                       description="deis-fast bench yardstick [ARGS] runs the public yardstick "
                                   "(see 'deis-fast bench yardstick --help'); deis-fast bench quality [ARGS] runs "
                                   "the quality benchmark where available.")
    b.add_argument("which", choices=("yardstick", "quality"))
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    b.set_defaults(func=cmd_bench)

    gen = _generate_module()
    if gen is not None:
        g = sub.add_parser("generate", help="bulk, resumable, seed-deterministic generation (FID-scale runs)",
                           description=(gen.__doc__ or "").strip().split("\n")[0] or None)
        gen.add_arguments(g)
        g.set_defaults(func=gen.run)
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
    except (ValueError, TypeError, FileNotFoundError) as e:
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
    except Exception as e:  # noqa: BLE001 - the CLI reports, not crashes
        print(f"deis-fast {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
