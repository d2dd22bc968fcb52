"""What ``deis-fast sample`` and ``deis-fast generate`` share: argument types, the model loader, the
per-seed noise, the PNG writer. One of each, so that the same seed and method give the same image from
both commands."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["ArgumentParser", "UsageError", "int_at_least", "positive_int", "nonneg_int", "finite_float", "nonneg_float", "grid_arg",
           "pfdiff_arg", "method_arg", "resolve_nfe", "DEFAULT_NFE", "LoadedModel", "load_model", "MODEL_SCHEDULES", "PREDICTION_CHOICES",
           "initial_noise", "png_bytes", "add_model_arguments", "add_solver_arguments", "HelpFormatter", "OUTPUT_MARKER",
           "cli_terms",
           "claim_outdir", "check_outdir", "add_output_arguments", "check_backend_env",
           "quiet_third_party"]


from ..solvers import DEFAULT_NFE  # noqa: E402  (one default NFE for the API and the CLI)
from .. import zoo as _zoo  # noqa: E402
from ..zoo import MODEL_SCHEDULES, LoadedModel  # noqa: E402,F401  (LoadedModel: the return type of load_model)


class UsageError(ValueError):
    """Bad input detected by a command: exit code 2 with a one-line message."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (what was wrong, where to look) instead of the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' only where the help text does not already name its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------- argparse types
def int_at_least(lo: int, what: str) -> Callable[[str], int]:
    """An argparse type: an int >= lo, with a message naming ``what`` it expected."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {v}")
        return v
    return parse


positive_int = int_at_least(1, "positive")
nonneg_int = int_at_least(0, "non-negative")


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not np.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def nonneg_float(s: str) -> float:
    v = finite_float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def pfdiff_arg(s: str) -> tuple[int, int]:
    try:
        k, h = (int(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes 'k,h' (two integers, e.g. 2,1), got {s!r}") from None
    return k, h


def grid_arg(s: str) -> str | list[float]:
    """A grid name, or comma-separated times."""
    from ..core.grids import GRIDS, check_grid_name
    if "," not in s:
        try:
            check_grid_name(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if s not in GRIDS:
            raise argparse.ArgumentTypeError(f"grid {s!r} needs calibration noise: use deis_fast.optimize_grid in "
                                             f"Python; here one of {', '.join(GRIDS)} or comma-separated times")
        return s
    try:
        return [float(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a grid name or comma-separated times, got {s!r}") from None


def method_arg(s: str) -> str:
    """A registered method name (with a 'did you mean' for near misses)."""
    from ..solvers import check_method
    try:
        return check_method(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_solver_arguments(p: argparse.ArgumentParser) -> None:
    """--method, --nfe, --grid, --eta, --pfdiff: the sampler options every command takes."""
    p.add_argument("--method", type=method_arg, default="tab3", help="solver; 'deis-fast methods' lists them")
    p.add_argument("--nfe", type=positive_int, default=None,
                   help=f"network evaluations per sample (default {DEFAULT_NFE}; with a list --grid: from the grid)")
    from ..core.grids import GRIDS
    p.add_argument("--grid", type=grid_arg, default=None,
                   help=" | ".join(GRIDS) + ", or comma-separated times, which also set the NFE (default: the "
                        "method's recommended grid)")
    p.add_argument("--eta", type=nonneg_float, default=None,
                   help="noise level of ddim_eta and the SDE methods (default 1: ancestral)")
    p.add_argument("--pfdiff", type=pfdiff_arg, default=None, metavar="K,H",
                   help="PFDiff-k_h timestep skipping on a first-order method")
    p.add_argument("--corrector", action=argparse.BooleanOptionalAction, default=None,
                   help="UniC-style corrector on a multistep method (default: on for unipc*, off otherwise)")
    p.add_argument("--variant", default=None, help="bh1 | bh2 for unipc*, midpoint | heun for dpmpp_2m_sde")
    p.add_argument("--s-noise", type=nonneg_float, default=None, help="noise scale of the SDE methods (default 1)")


# the Python API's keywords in error messages, as the command line spells them (the library speaks Python: its
# messages name keywords; a command's message must name its flags)
_CLI_TERMS: tuple[tuple[str, str], ...] = (
    (r"\. Pass pfdiff_experimental=True to try it on a multistep eps-form base \([^)]*\)",
     ": use --method ddim, dpmpp1 or ddim_eta with --pfdiff"),
    (r"\bdrop nfe=", "drop --nfe"),
    (r"\bnfe=(\d+)", r"--nfe \1"),
    (r"\bnfe=", "--nfe"),
    (r"\ba list grid=", "a list --grid"),
    (r"\bgrid=", "--grid "),
    (r"\bmethod=", "--method "),
    (r"\b(eta|s_noise|pfdiff|corrector|variant)=", lambda m: "--" + m.group(1).replace("_", "-") + " "),
)


def cli_terms(message: str, t_flags: bool = False) -> str:
    """A library error message in the command line's terms: ``nfe=`` -> ``--nfe``, ``pass t_start/t_end`` -> the
    ``--t-start``/``--t-end`` flags (``t_flags``) or ``--grid`` times, ``pfdiff_experimental=True`` (not a flag) ->
    the first-order methods that take ``--pfdiff``."""
    import re
    msg = message.replace("pass t_start/t_end", "pass --t-start/--t-end" if t_flags else "give --grid times")
    msg = msg.replace("t_start/t_end", "--t-start/--t-end" if t_flags else "the grid's ends")
    for pattern, repl in _CLI_TERMS:
        msg = re.sub(pattern, repl, msg)
    return msg


def solver_options(args: argparse.Namespace) -> dict:
    """The plan options the user set (--eta, --pfdiff, --corrector, --variant, --s-noise), by PlanOptions name."""
    opts = {"eta": args.eta, "pfdiff": args.pfdiff, "corrector": args.corrector, "variant": args.variant,
            "s_noise": args.s_noise}
    return {k: v for k, v in opts.items() if v is not None}


def resolve_nfe(args: argparse.Namespace) -> int | None:
    """--nfe, else the number of steps a list --grid implies (None), else the default."""
    if args.nfe is not None:
        return args.nfe
    return None if isinstance(args.grid, list) else DEFAULT_NFE


# ----------------------------------------------------------------------------------------- output folders
OUTPUT_MARKER = ".deis-fast-output.json"   # what sample and demo write first: the files they own in a folder


def _marker(outdir: str) -> tuple[str, list[str]] | None:
    """(written_by, files) of the marker an earlier ``sample``/``demo`` run left in ``outdir`` (None: no marker)."""
    path = os.path.join(outdir, OUTPUT_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
        return str(d.get("written_by", "")), [str(x) for x in d["files"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--outdir {outdir}: unreadable {OUTPUT_MARKER} ({e}); pick a new or empty folder") from None


def check_outdir(outdir: str, overwrite: bool, rerun: str | None = None) -> list[str]:
    """Refuse an ``outdir`` that ``sample``/``demo`` may not write into; return the files they own there
    already. Allowed: a new or empty folder, or, with ``overwrite``, a folder holding only files its marker lists
    (an earlier run's output); ``rerun`` (a command, e.g. ``"demo"``): that command's own earlier output is replaced
    without ``overwrite`` too. Writes nothing."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UsageError(f"--outdir {outdir} exists and is not a folder; pick a new folder")
    if not os.path.isdir(outdir):
        return []
    try:
        present = sorted(n for n in os.listdir(outdir) if n != OUTPUT_MARKER)
    except OSError as e:
        raise UsageError(f"--outdir {outdir}: cannot list it ({e.strerror or e})") from None
    marker = _marker(outdir)
    owned = marker[1] if marker else []
    foreign = [n for n in present if n not in set(owned)]
    if foreign:
        raise UsageError(f"--outdir {outdir} holds files deis-fast did not write (e.g. {foreign[0]!r}); "
                         "pick a new or empty folder")
    if present and not overwrite and not (rerun and marker and marker[0] == f"deis-fast {rerun}"):
        raise UsageError(f"--outdir {outdir} holds an earlier deis-fast output (e.g. {present[0]!r}); pass "
                         "--overwrite to replace it, or pick a new folder")
    return owned


def claim_outdir(outdir: str, command: str, files: Sequence[str], overwrite: bool, rerun: bool = False) -> None:
    """Check ``outdir`` (:func:`check_outdir`; ``rerun``: this command's own earlier output there is replaced without
    ``overwrite``), create it and write the marker listing ``files`` (and the files earlier runs own there) before
    any of them is written; an unusable path is a :class:`UsageError`."""
    owned = check_outdir(outdir, overwrite, command if rerun else None)
    body = json.dumps({"written_by": f"deis-fast {command}", "files": sorted(set(owned) | set(files))}, indent=1)
    try:
        os.makedirs(outdir, exist_ok=True)
        with open(os.path.join(outdir, OUTPUT_MARKER), "w") as f:
            f.write(body + "\n")
    except OSError as e:
        raise UsageError(f"--outdir {outdir}: cannot write there ({e.strerror or e})") from None


def add_output_arguments(p: argparse.ArgumentParser, default: str) -> None:
    """--outdir and --overwrite of ``sample`` and ``demo``."""
    p.add_argument("--outdir", default=default,
                   help=f"output folder: new or empty (default {default}); a folder holding other files is refused")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an earlier output of deis-fast in --outdir (the files its {OUTPUT_MARKER} lists)")


# ----------------------------------------------------------------------------------------- environment
def check_backend_env(device_type: str = "cpu") -> None:
    """A bad ``DEIS_FAST_BACKEND`` (unknown, or unusable on ``device_type``) as a :class:`UsageError`, before any
    work is done."""
    from ..kernels import dispatch
    name = os.environ.get(dispatch.ENV_VAR) or None
    if name is None:
        return
    if name not in dispatch.BACKENDS:
        raise UsageError(f"{dispatch.ENV_VAR}={name!r} is not a backend; use one of {', '.join(dispatch.BACKENDS)} "
                         "or unset it")
    why = dispatch.available(name, device_type)
    if why is not None:
        raise UsageError(f"{dispatch.ENV_VAR}={name}: {why}; unset it or pick another backend")


@contextlib.contextmanager
def quiet_third_party(enabled: bool = True) -> Iterator[None]:
    """``--quiet``: no Python warnings and no diffusers / transformers log lines inside the block (restored after)."""
    if not enabled:
        yield
        return
    import logging
    import warnings
    names = ("diffusers", "transformers", "huggingface_hub")
    env = {f"{n.upper()}_VERBOSITY": os.environ.get(f"{n.upper()}_VERBOSITY") for n in names[:2]}
    levels = {n: logging.getLogger(n).level for n in names}
    os.environ.update({k: "error" for k in env})  # read when diffusers / transformers set up their loggers
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------- models
PREDICTION_CHOICES = ("eps", "epsilon", "x0", "sample", "v", "v_prediction")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", metavar="digits|flow|PATH",
                   help="'digits' (the embedded 8x8 eps model), 'flow' (the embedded 8x8 rectified-flow model; "
                        "a folder named flow: ./flow) or a diffusers UNet2DModel folder (or a pipeline folder with "
                        "unet/ and scheduler/); a folder without a scheduler config needs --schedule")
    p.add_argument("--schedule", choices=MODEL_SCHEDULES, default=None,
                   help="beta schedule of a --model folder (default: read from its scheduler config)")
    p.add_argument("--prediction", choices=PREDICTION_CHOICES, default=None,
                   help="what the model predicts (default: eps for digits, flow (velocity) for flow, the scheduler "
                        "config's prediction_type for a folder, else eps)")


_FLAGS = {"schedule=": "--schedule", "prediction=": "--prediction"}   # load_model's keywords as the CLI names them


def load_model(spec: str, *args: Any, **kw: Any) -> LoadedModel:
    """:func:`deis_fast.zoo.load_model` for the command line: a bad ``--model`` is a :class:`UsageError` that names
    the command's flags, not the function's keywords."""
    try:
        return _zoo.load_model(spec, *args, **kw)
    except ValueError as e:
        msg = str(e)
        for keyword, flag in _FLAGS.items():
            msg = msg.replace(keyword, flag)
        raise UsageError(f"--model {spec!r}: {msg.removeprefix(repr(spec) + ': ')}") from None


# ----------------------------------------------------------------------------------------- noise
def initial_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(noise [len(seeds), *shape], generators): noise is bitwise ``randn_per_sample((n, *shape), seeds)``;
    each generator has drawn its sample's noise and goes on to draw that sample's step noise, so sample i
    depends only on its seed (EDM convention), for deterministic and stochastic methods alike."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in gens])
    return noise.to(device, dtype), gens


# ----------------------------------------------------------------------------------------- images
def png_bytes(img: np.ndarray) -> bytes:
    """A PNG file (8-bit gray / RGB / RGBA) for a uint8 array [C, H, W] (:func:`deis_fast.zoo.digits.png_bytes`); other
    channel counts are a :class:`UsageError`."""
    from ..zoo.digits import png_bytes as encode
    try:
        return encode(img)
    except ValueError as e:
        raise UsageError(f"{e}; use --format npz") from None
