"""``deis-fast tune`` and the ``--tuned FILE`` option of ``deis-fast sample`` / ``generate``.

    deis-fast tune --model digits --nfe 5 --out digits_nfe5.json         # an embedded model (digits, flow); the
                                                                          # method too (tab3/tab2, +corrector)
    deis-fast tune --model ./sd-pipeline --prompts prompts.txt --calibration 8 --held-out 4 \\
        --guidance-scale 7.5 --nfe 8 --out sd_nfe8.json                   # a pipeline folder: Stable Diffusion,
                                                                          # SDXL, SD3 or FLUX
    deis-fast sample --model digits --tuned digits_nfe5.json               # sample with it
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from .common import (UsageError, cli_terms, finite_float, nonneg_int, pfdiff_arg, positive_int,
                         solver_options)

__all__ = ["add_tune_parser", "add_tuned_argument", "tuned_plan_for", "cmd_tune", "check_out"]

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "deis_fast", "references")


def add_tuned_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tuned", default=None, metavar="FILE",
                   help="a file written by 'deis-fast tune': its grid or plan, method and NFE (refused when made for "
                        "another schedule, method or NFE; --method / --nfe, when given, must match it)")


def tuned_plan_for(args: argparse.Namespace, loaded: Any):
    """The plan of ``args.tuned``, checked against the loaded model and the options given (UsageError if not)."""
    from ..tuning.files import TunedFileError, TunedMismatchError, _label, load_tuned, tuned_plan
    try:
        t = load_tuned(args.tuned)
        if args.grid is not None:
            raise UsageError("--tuned fixes the grid: drop --grid")
        if solver_options(args):
            raise UsageError(f"--tuned fixes the plan options: drop {', '.join(solver_options(args))}")
        method = None if args.method == "tab3" else args.method   # the parser's default: take the file's
        plan, _ = tuned_plan(args.tuned, loaded.schedule, method, args.nfe, prediction=loaded.prediction)
    except (TunedFileError, TunedMismatchError) as e:
        raise UsageError(f"--tuned: {e}") from None
    args.method = t.method
    args.method_label = _label(t.method, t.options)   # what the summary prints: the corrector, PFDiff's k and h
    return plan


def add_tune_parser(sub: Any) -> None:
    from ..tuning import AUTO_METHODS
    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser("tune", formatter_class=fmt,
                       help="tune a method, its grid (and optionally a plan) to a model; writes a file for --tuned",
                       description="Fits the time grid (and with --plan every plan coefficient) of METHOD (default: "
                                   "the best of a few candidates on the calibration noises) at NFE to a model, "
                                   "against fine reference solutions of calibration noises (cached), checks "
                                   "it on held-out noises (and prompts) it never saw, and writes a tuned file; the "
                                   "untuned configuration is kept when tuning does not beat it there. Embedded "
                                   "models (digits, flow), a diffusers UNet2DModel folder, or a Stable Diffusion, "
                                   "SDXL, SD3 or FLUX pipeline folder with --prompts.")
    t.add_argument("--model", default="digits", metavar="digits|flow|PATH",
                   help="'digits', 'flow', a diffusers UNet2DModel folder, or a pipeline folder (with --prompts)")
    t.add_argument("--out", required=True, help="the tuned file to write (JSON); checked before the run: an existing "
                                                "file is replaced only if it is a tuned file, or with --overwrite")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file that is not a tuned file")
    t.add_argument("--method", type=_methods_arg, default="auto",
                   help="'auto': choose among " + ", ".join(AUTO_METHODS) + " (each with its tuned grid, chosen on the "
                        "calibration noises); or a method, or a comma-separated list of candidates (NAME or "
                        "NAME+corrector)")
    t.add_argument("--nfe", type=positive_int, default=5, help="network evaluations per sample")
    t.add_argument("--pfdiff", type=pfdiff_arg, default=None, metavar="K,H", help="PFDiff-k_h on a first-order method")
    t.add_argument("--corrector", action=argparse.BooleanOptionalAction, default=None,
                   help="UniC-style corrector on a multistep method")
    t.add_argument("--calibration", type=positive_int, default=64,
                   help="calibration noises (pipelines: calibration prompts, the first lines of --prompts)")
    t.add_argument("--held-out", type=positive_int, default=32,
                   help="held-out noises (pipelines: held-out prompts, the lines after the calibration ones)")
    t.add_argument("--seed", type=nonneg_int, default=0, help="first noise seed (the held-out ones follow)")
    t.add_argument("--plan", action="store_true", help="also fit the plan's coefficients (autograd through the model)")
    t.add_argument("--plan-iters", type=positive_int, default=200, help="Adam steps of --plan")
    t.add_argument("--checkpoint", action="store_true",
                   help="activation checkpointing for --plan (when autograd through the network does not fit)")
    t.add_argument("--time-budget", type=finite_float, default=60.0, help="seconds for the grid search")
    t.add_argument("--reference-nfe", type=positive_int, default=400, help="NFE of the fine reference (rho_rk4)")
    t.add_argument("--cache", default=DEFAULT_CACHE, help="reference cache folder ('' = no cache)")
    t.add_argument("--prompts", default=None, help="pipelines: a text file, one prompt per line")
    t.add_argument("--noises-per-prompt", type=positive_int, default=1, help="pipelines: latent noises per prompt")
    t.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="pipelines: the guidance scale to tune for (CFG; FLUX: its distilled guidance embedding); "
                        "default: the pipeline's own (SD 7.5, SDXL 5, SD3 7, FLUX 3.5)")
    t.add_argument("--negative-prompt", default=None, help="pipelines: the negative prompt (not for FLUX)")
    t.add_argument("--height", type=positive_int, default=None, help="pipelines: image height (default: the model's)")
    t.add_argument("--width", type=positive_int, default=None, help="pipelines: image width (default: the model's)")
    t.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_tune)


def _is_tuned_file(path: str) -> bool:
    """Whether ``path`` holds a file 'deis-fast tune' wrote (its JSON format tag; the checksum is not needed here)."""
    from ..tuning.files import FORMAT
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def check_out(path: str, overwrite: bool) -> None:
    """Refuse a ``--out`` that tune could not write, or that holds a file it did not write (unless ``overwrite``),
    before any work: a folder, a missing folder, an unwritable place (tried with a probe file, removed again)."""
    if os.path.isdir(path):
        raise UsageError(f"--out {path!r} is a folder; give a file name, e.g. {os.path.join(path, 'tuned.json')!r}")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out {path!r}: folder {out_dir!r} does not exist")
    if os.path.exists(path) and not overwrite and not _is_tuned_file(path):
        raise UsageError(f"--out {path!r} exists and is not a tuned file; pass --overwrite to replace it, or pick "
                         "another name")
    probe = os.path.join(out_dir, f".{os.path.basename(path)}.{os.getpid()}.probe")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--out {path!r}: cannot write in {out_dir!r} ({e.strerror or e})") from None


def _methods_arg(s: str) -> str | list[str]:
    """'auto', one method name, or a comma-separated list of candidates (each NAME or NAME+corrector)."""
    if s == "auto":
        return s
    from ..tuning.search import _candidates
    names = [m.strip() for m in s.split(",") if m.strip()]
    try:
        _candidates(names, {})
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names[0] if len(names) == 1 and "+" not in names[0] else names


def _prompts(path: str, n_cal: int, n_ho: int) -> tuple[list[str], list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError as e:
        raise UsageError(f"--prompts {path!r}: {e}") from None
    if len(lines) < n_cal + n_ho:
        raise UsageError(f"--prompts {path!r} has {len(lines)} prompts; --calibration {n_cal} and --held-out {n_ho} "
                         f"need {n_cal + n_ho}")
    return lines[:n_cal], lines[n_cal:n_cal + n_ho]


def cmd_tune(args: argparse.Namespace) -> int:
    import torch

    from .. import tuning
    from ..tuning import AUTO_METHODS
    from ..tuning.files import _fmt, _label
    if args.threads:
        torch.set_num_threads(args.threads)
    check_out(args.out, args.overwrite)   # before the run: a bad --out must not cost a whole tuning run
    opts = {k: v for k, v in dict(pfdiff=args.pfdiff, corrector=args.corrector).items() if v is not None}
    if args.method == "auto" and opts:
        raise UsageError(f"--{'pfdiff' if 'pfdiff' in opts else 'corrector'} needs --method (the automatic search "
                         f"tries {', '.join(AUTO_METHODS)})")
    method = None if args.method == "auto" else args.method
    common = dict(plan=args.plan, plan_iters=args.plan_iters, checkpoint=args.checkpoint,
                  time_budget=args.time_budget, reference_nfe=args.reference_nfe, cache_dir=args.cache or None,
                  progress=not (args.quiet or args.json), **opts)
    began = time.time()
    try:
        if args.prompts is not None:
            cal, ho = _prompts(args.prompts, args.calibration, args.held_out)
            try:
                from diffusers import DiffusionPipeline
            except ImportError:
                raise UsageError("tuning a pipeline needs diffusers: pip install 'deis_fast[diffusers]'") from None
            try:
                pipe = DiffusionPipeline.from_pretrained(args.model, use_safetensors=True)   # never pickle
            except (OSError, ValueError) as e:
                raise UsageError(f"--model {args.model!r}: cannot load a diffusers pipeline: {e}") from None
            from ..integrations.diffusers.pipeline import tune_pipeline
            t = tune_pipeline(pipe, cal, ho, method, args.nfe, guidance_scale=args.guidance_scale,
                              negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                              noises_per_prompt=args.noises_per_prompt, seed=args.seed,
                              meta={"model": os.path.abspath(args.model)}, **common)
        else:
            from .common import load_model
            from ..zoo.digits import DIGITS_KINDS
            # the embedded models are tiny: tune in float64 (a cleaner reference); the grid serves float32 too
            loaded = load_model(args.model, dtype=torch.float64 if args.model in DIGITS_KINDS else torch.float32)
            t = tuning.tune(loaded.model, loaded.schedule, method, args.nfe, prediction=loaded.prediction,
                            shape=loaded.shape, calibration=args.calibration, held_out=args.held_out, seed=args.seed,
                            meta={"model": loaded.model_id}, **common)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UsageError(cli_terms(str(e))) from None
    try:
        t.save(args.out)
    except OSError as e:   # checked above; the folder changed during the run
        raise UsageError(f"--out {args.out!r}: cannot write it ({e.strerror or e})") from None
    secs = time.time() - began
    e = t.errors
    if args.json:
        print(json.dumps({"out": args.out, "kind": t.kind, "method": t.method, "options": t.options, "nfe": t.nfe,
                          "errors": e, "candidates": t.meta.get("candidates"),
                          "seconds": round(secs, 1)}))
    elif not args.quiet:
        label = _label(t.method, t.options)
        cands = t.meta.get("candidates")
        if cands:
            print(f"\nmethod search at NFE {t.nfe} (each on the best grid the search found for it; chosen on the {t.meta.get('calibration')} "
                  "calibration noises, the held-out column only for the record):\n")
            print("| candidate | calibration error | held-out error |\n|---|---|---|")
            for c in cands:
                print(f"| {c['method']} | {_fmt(c['calibration_error'])} | {_fmt(c['held_out_error'])} |")
        # what the grid row holds: the tuned grid, or the default one where the search kept it (files from before
        # grid_tuned existed: tuned); then a gain is the method or its options, not the grid
        grid_name = "tuned grid" if t.meta.get("grid_tuned", True) or "held_out_plan" in e else "default grid"
        first = cands[0]["method"] if cands else label
        chosen = t.meta["chosen"] if cands else label
        rows = [(f"untuned ({first}, default grid)", e.get("held_out_untuned")),
                (f"{chosen}, {grid_name}", e.get("held_out_grid"))]
        if "held_out_plan" in e:
            rows.append(("tuned plan", e.get("held_out_plan")))
        print(f"\n{label} @ NFE {t.nfe}, held-out median relative error to the reference "
              f"({t.meta.get('reference')}, {t.meta.get('held_out')} held-out samples):\n")
        print("| configuration | held-out error |\n|---|---|")
        for name, v in rows:
            print(f"| {name} | {_fmt(v)} |")
        kept = {"untuned": "the untuned configuration (tuning did not beat it)", "grid": f"{label} on the {grid_name}",
                "plan": "the tuned plan"}[t.kind]
        print(f"\nkept {kept}: {_fmt(e.get('held_out_untuned'))} -> {_fmt(e.get('held_out_tuned'))}; "
              f"wrote {args.out} ({secs:.1f} s)")
    return 0
