"""``deis-fast generate``: sharded, resumable, seed-deterministic bulk sample generation.

    deis-fast generate --num 50000 --outdir out --batch-size 64 --method tab3 --nfe 10
    torchrun --nproc_per_node 4 -m deis_fast.cli.generate --num 50000 --outdir out ...

* Runs as one process, or under ``torchrun`` (``torch.distributed`` is initialised only when the
  ``WORLD_SIZE`` environment variable is > 1; backend nccl on CUDA, gloo on CPU). Rank r of K takes the
  indices r, r+K, r+2K, ...
* Sample ``i`` depends only on its seed ``seed_offset + i``: a per-sample ``torch.Generator`` seeded with
  it draws the initial noise (exactly :func:`deis_fast.randn_per_sample`) and then, passed to the sampler as
  the list ``generator=``, the step noise of stochastic methods.
* Batch invariance. On CPU (and with cuDNN) a convolution's low bits depend on the batch size and on the
  number of intra-op threads. So the network is always called on chunks of exactly ``--model-batch``
  samples (the last chunk is zero-padded; a sample never depends on its neighbours), and on CPU the
  intra-op thread count is pinned (``--threads``, default 1, also torchrun's default). The solver's
  updates are elementwise. Together: a sample's bits do not depend on ``--batch-size``, on the world
  size or on which rank made it (for a fixed ``--model-batch``, thread count, device type and torch build).
* Output: ``--format png`` writes one ``{index:08d}.png`` per sample; ``npz`` one
  ``batch-{first:08d}-{n}.npz`` per batch with ``indices``, ``seeds`` and ``samples`` (float32; float64
  for float64 runs). Every file is written to a temporary file in the same directory, then ``os.replace``\\ d.
  Before a batch's files, a journal ``records/pending-{first:08d}.json`` names them; after them, a per-shard
  record ``records/shard-{first:08d}.json`` (index, seed, file, the sampler config) is written the same way
  and the journal is removed: a sample counts as done only once its record exists.
* The outdir must be new, empty, or an earlier run (it has ``config.json``); any other folder is refused
  (exit 2), so generate never deletes or overwrites a file it did not write. Re-running into an outdir made
  with another config fails with a message naming the differing keys. ``--num`` may grow between runs.
* Restart: completed indices are read from the records and skipped; our temporary files and the data files
  a journal names without a record (a crash between the data file and its record) are removed by rank 0.
  Ctrl-C keeps what is written; the same command resumes.
* At the end rank 0 (after a barrier) checks that each index 0..N-1 is recorded exactly once with its
  file present, writes ``manifest.jsonl`` (one line per index: index, seed, file) and the process exits
  with 0; otherwise it prints what is missing or duplicated and every rank exits with 1. Usage and config
  errors exit with 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import uuid
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .common import (ArgumentParser, HelpFormatter, UsageError, add_model_arguments, add_solver_arguments, cli_terms,
                         check_backend_env, initial_noise, load_model, nonneg_int, png_bytes, positive_int, resolve_nfe,
                         solver_options)
from ..sampler import NonFiniteError

__all__ = ["add_arguments", "run", "main", "build_parser", "FixedBatchModel", "initial_noise", "make_sampler",
           "sample_images", "GenerateError", "verify_outdir", "write_png", "read_records", "MODEL_BATCH"]

FORMATS = ("png", "npz")
CONFIG_FILE = "config.json"
RECORDS_DIR = "records"
MANIFEST_FILE = "manifest.jsonl"
TMP_PREFIX = ".tmp-"
_PNG_RE = re.compile(r"^\d{8}\.png$")
_NPZ_RE = re.compile(r"^batch-\d{8}-\d+\.npz$")
_REC_RE = re.compile(r"^shard-\d{8}\.json$")
_PENDING_RE = re.compile(r"^pending-\d{8}\.json$")
_TMP_RE = re.compile(r"^\.tmp-.+\.\d+\.[0-9a-f]{8}$")   # exactly what _atomic_write names its temp files
MODEL_BATCH = 8
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
MAX_SEED = 2 ** 63 - 1


class GenerateError(UsageError):
    """A usage or configuration error (exit code 2)."""


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` options to ``parser`` (used by ``deis-fast generate`` and by :func:`main`)."""
    parser.add_argument("-n", "--num", "--num-samples", dest="num", type=positive_int, required=True,
                        help="number of samples N (indices 0..N-1); under torchrun put '--' before the options "
                             "or use -n (torchrun's own parser takes --num for an abbreviation of --numa-binding)")
    parser.add_argument("--outdir", type=_outdir_arg, required=True,
                        help="output directory: new, empty, or an earlier run of generate (which is resumed)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="samples per sampler call and shard")
    add_solver_arguments(parser)
    parser.add_argument("--seed-offset", type=nonneg_int, default=0, help="sample i uses seed seed_offset + i")
    parser.add_argument("--format", choices=FORMATS, default="png", help="png (one file per sample) or npz")
    add_model_arguments(parser)
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32",
                        help="precision of the model weights, the noise and the samples")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--model-batch", type=positive_int, default=MODEL_BATCH,
                        help="the network always sees exactly this many samples per call (batch invariance)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU intra-op threads per process (default 1 on CPU: results depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .tune import add_tuned_argument
    add_tuned_argument(parser)


def _outdir_arg(s: str) -> str:
    if os.path.exists(s) and not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s!r} exists and is not a directory; pick a new folder")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="deis-fast generate", description=(__doc__ or "").split("\n\n")[0],
                       formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


# ---------------------------------------------------------------------------------------- model & noise
class FixedBatchModel:
    """Calls ``model`` on chunks of exactly ``chunk`` samples (zero-padding the last one), so that a
    sample's output does not depend on how many samples the caller batched together."""

    def __init__(self, model: Callable[..., Any], chunk: int):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model = model
        self.chunk = int(chunk)

    @staticmethod
    def _unwrap(out: Any) -> Any:
        if hasattr(out, "sample") and not isinstance(out, torch.Tensor):
            return out.sample
        if isinstance(out, (tuple, list)):
            return out[0]
        return out

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        b, c = x.shape[0], self.chunk
        if not torch.is_tensor(t):
            t = torch.tensor(float(t), device=x.device)
        t = t.reshape(-1)
        if t.numel() == 1 and b != 1:
            t = t.expand(b)
        if b == c:
            return self._unwrap(self.model(x, t, **cond))
        outs = []
        for i in range(0, b, c):
            xi, ti = x[i:i + c], t[i:i + c]
            n = xi.shape[0]
            if n < c:
                xi = torch.cat([xi, xi.new_zeros((c - n,) + tuple(xi.shape[1:]))])
                ti = torch.cat([ti, ti[:1].expand(c - n)])
            outs.append(self._unwrap(self.model(xi, ti, **cond))[:n])
        return torch.cat(outs)


# ---------------------------------------------------------------------------------------------- files
def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    d, name = os.path.split(path)
    tmp = os.path.join(d, f"{TMP_PREFIX}{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_png(path: str, img: np.ndarray) -> None:
    data = png_bytes(img)
    _atomic_write(path, lambda f: f.write(data))


def _config_sha(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def read_records(outdir: str) -> tuple[list[dict], list[str]]:
    """(valid records, names of unreadable record files)."""
    rdir = os.path.join(outdir, RECORDS_DIR)
    recs, bad = [], []
    if not os.path.isdir(rdir):
        return recs, bad
    for name in sorted(os.listdir(rdir)):
        if not _REC_RE.match(name):
            continue
        try:
            with open(os.path.join(rdir, name)) as f:
                r = json.load(f)
            if not (isinstance(r, dict) and len(r["indices"]) == len(r["seeds"]) == len(r["files"])):
                raise ValueError("malformed")
        except (OSError, ValueError, KeyError, TypeError):
            bad.append(name)
            continue
        r["_name"] = name
        recs.append(r)
    return recs, bad


def _completed(recs: list[dict], outdir: str) -> set[int]:
    done = set()
    for r in recs:
        for i, f in zip(r["indices"], r["files"]):
            if os.path.exists(os.path.join(outdir, f)):
                done.add(int(i))
    return done


def _cleanup(outdir: str, recs: list[dict], bad: list[str]) -> int:
    """Undo what an interrupted run of ours left: our temporary files, unreadable records in our records
    folder, and data files that a pending journal says we were writing but no record covers. A file that no
    journal of ours names is never touched. Returns the number of files removed."""
    removed = 0
    rdir = os.path.join(outdir, RECORDS_DIR)
    for r in recs:  # a record whose files were lost (deleted by hand): drop those entries so they are redone
        keep = [k for k, f in enumerate(r["files"]) if os.path.exists(os.path.join(outdir, f))]
        if len(keep) < len(r["files"]):
            for key in ("indices", "seeds", "files"):
                r[key] = [r[key][k] for k in keep]
            path = os.path.join(rdir, r["_name"])
            if keep:
                body = json.dumps({k: v for k, v in r.items() if k != "_name"})
                _atomic_write(path, lambda f, body=body: f.write(body), "w")
            else:
                os.remove(path)
            removed += 1
    referenced = {f for r in recs for f in r["files"]}

    def remove(path: str) -> None:
        nonlocal removed
        if os.path.isfile(path):
            os.remove(path)
            removed += 1

    for name in sorted(os.listdir(rdir)):
        path = os.path.join(rdir, name)
        if _PENDING_RE.match(name):
            try:
                with open(path) as f:
                    files = json.load(f)["files"]
            except (OSError, ValueError, KeyError, TypeError):
                files = []
            for fname in files:
                if isinstance(fname, str) and (_PNG_RE.match(fname) or _NPZ_RE.match(fname)) \
                        and fname not in referenced:
                    remove(os.path.join(outdir, fname))
            remove(path)
        elif name in bad or _TMP_RE.match(name):
            remove(path)
    for name in os.listdir(outdir):
        if _TMP_RE.match(name):
            remove(os.path.join(outdir, name))
    return removed


def verify_outdir(outdir: str, num: int, config: dict | None = None) -> tuple[bool, str, list[dict]]:
    """Check that each index 0..num-1 is recorded exactly once (with its file present, and the
    record's config equal to ``config`` when given). Returns (ok, message, manifest rows)."""
    recs, bad = read_records(outdir)
    count = np.zeros(num, dtype=np.int64)
    rows: dict[int, dict] = {}
    missing_files, wrong_cfg, extra = [], [], 0
    sha = _config_sha(config) if config is not None else None
    for r in recs:
        if sha is not None and r.get("config_sha") != sha:
            wrong_cfg.append(r["_name"])
            continue
        for i, s, f in zip(r["indices"], r["seeds"], r["files"]):
            i = int(i)
            if not os.path.exists(os.path.join(outdir, f)):
                missing_files.append(f)
                continue
            if 0 <= i < num:
                count[i] += 1
                rows[i] = {"index": i, "seed": int(s), "file": f}
            else:
                extra += 1
    missing = np.flatnonzero(count == 0).tolist()
    dup = np.flatnonzero(count > 1).tolist()
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing indices (first: {missing[:10]})")
    if dup:
        problems.append(f"{len(dup)} indices recorded more than once (first: {dup[:10]})")
    if missing_files:
        problems.append(f"{len(missing_files)} recorded files do not exist (first: {missing_files[:5]})")
    if wrong_cfg:
        problems.append(f"{len(wrong_cfg)} records were made with another config (first: {wrong_cfg[:5]})")
    if bad:
        problems.append(f"{len(bad)} unreadable records (first: {bad[:5]})")
    if problems:
        return False, f"verification of {outdir} FAILED: " + "; ".join(problems), []
    note = f" ({extra} samples with index >= {num} are also present)" if extra else ""
    return True, f"verified {num} samples in {outdir}: each index 0..{num - 1} exactly once{note}", \
        [rows[i] for i in range(num)]


# ----------------------------------------------------------------------------------------------- run
def _dist_env() -> tuple[int, int, int]:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise GenerateError("WORLD_SIZE / RANK / LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise GenerateError(f"bad distributed environment: RANK={rank}, WORLD_SIZE={world}")
    return world, rank, local


def _print(rank: int, msg: str, err: bool = False) -> None:
    print(f"[rank {rank}] {msg}" if rank else msg, file=sys.stderr if err else sys.stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run ``generate`` with parsed ``args``; returns the exit code (0 ok, 1 verification failed, 2 usage)."""
    try:
        world, rank, local = _dist_env()
    except GenerateError as e:
        _print(0, f"deis-fast generate: error: {e}", err=True)
        return 2
    old_threads = torch.get_num_threads()
    try:
        return _run(args, world, rank, local)
    except UsageError as e:
        _print(rank, f"deis-fast generate: error: {e}", err=True)
        return 2
    finally:
        torch.set_num_threads(old_threads)


def make_sampler(loaded: Any, args: argparse.Namespace, model_batch: int = MODEL_BATCH):
    """The sampler both ``sample`` and ``generate`` run: the model called on fixed chunks of ``model_batch``."""
    from ..sampler import Sampler
    from .tune import tuned_plan_for
    opts = solver_options(args)
    plan = tuned_plan_for(args, loaded) if getattr(args, "tuned", None) else None
    try:
        what = {"plan": plan} if plan is not None else {"method": args.method, "nfe": resolve_nfe(args),
                                                        "grid": args.grid}
        return Sampler(FixedBatchModel(loaded.model, model_batch), loaded.schedule,
                                 prediction=loaded.prediction, **what, **opts)
    except (ValueError, TypeError) as e:
        raise GenerateError(f"invalid sampler options: {cli_terms(str(e))}") from None


def sample_images(sampler: Any, shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The samples of ``seeds`` (sample i depends only on seeds[i]: its initial and its step noise)."""
    noise, gens = initial_noise(shape, seeds, device, dtype)
    with torch.inference_mode():
        try:
            return sampler(noise, generator=gens if sampler.plan.num_noise else None)
        except NonFiniteError as e:
            raise GenerateError(f"samples with seeds {seeds[0]}..{seeds[-1]}: {e}") from None


def _run(args: argparse.Namespace, world: int, rank: int, local: int) -> int:
    # ---- validate everything before touching the filesystem or the process group
    if args.num - 1 + args.seed_offset > MAX_SEED:
        raise GenerateError(f"seed_offset + num exceeds {MAX_SEED}")
    dtype = _DTYPES[args.dtype]
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(dev)
    except RuntimeError as e:
        raise GenerateError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerateError("--device cuda but CUDA is not available")
        if world > 1 and device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type != "cpu":
        raise GenerateError(f"--device {args.device!r}: use cpu or cuda")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    check_backend_env(device.type)
    outdir = os.path.abspath(args.outdir)
    _check_outdir(outdir)

    loaded = load_model(args.model, device, dtype, args.prediction, args.schedule)
    sampler = make_sampler(loaded, args, args.model_batch)
    plan = sampler.plan
    config = {"model": loaded.model_id, "shape": list(loaded.shape), "prediction": loaded.prediction,
              "method": args.method, "plan_method": plan.method, "nfe": plan.nfe, "grid": args.grid,
              "options": {k: list(v) if isinstance(v, tuple) else v for k, v in solver_options(args).items()},
              "seed_offset": args.seed_offset, "format": args.format, "dtype": args.dtype,
              "model_batch": args.model_batch, "times": [float(t) for t in plan.times],
              **({"tuned": _tuned_id(args.tuned)} if getattr(args, "tuned", None) else {})}
    sha = _config_sha(config)

    # ---- process group
    dist = None
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        return _generate(args, config, sha, outdir, sampler, loaded.shape, device, dtype, world, rank, dist)
    except KeyboardInterrupt:
        _print(rank, f"interrupted: what is written is kept; run the same command again to resume into {outdir}",
               err=True)
        return 130
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def _tuned_id(path: str) -> str:
    """The checksum of a tuned file's payload: two tuned plans on the same grid differ in the config."""
    with open(path) as f:
        return str(json.load(f).get("checksum", ""))[:16]


def _check_outdir(outdir: str) -> None:
    """generate writes into a new or empty folder, or resumes one of its own runs; never into a user's folder."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise GenerateError(f"--outdir {outdir} exists and is not a directory; pick a new folder")
    if os.path.isdir(outdir) and os.listdir(outdir) and not os.path.isfile(os.path.join(outdir, CONFIG_FILE)):
        raise GenerateError(f"--outdir {outdir} is not empty and is not a folder made by deis-fast generate (no "
                            f"{CONFIG_FILE}); pick a new or empty folder")


def _setup_outdir(outdir: str, config: dict) -> list[str]:
    """Create the folder, its config (when new) and records/; returns what was created, innermost last."""
    created = [] if os.path.isdir(outdir) else [outdir]
    os.makedirs(outdir, exist_ok=True)
    cfg_path = os.path.join(outdir, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        _atomic_write(cfg_path, lambda f: f.write(json.dumps(config, indent=1, sort_keys=True) + "\n"), "w")
        created.append(cfg_path)
    rdir = os.path.join(outdir, RECORDS_DIR)
    if not os.path.isdir(rdir):
        os.makedirs(rdir)
        created.append(rdir)
    return created


def _undo(created: list[str]) -> None:
    """Remove what :func:`_setup_outdir` created (a failed start leaves the folder as it was); never a folder
    that has since got other files."""
    for path in reversed(created):
        try:
            os.rmdir(path) if os.path.isdir(path) else os.remove(path)
        except OSError:
            pass


def _barrier(dist) -> None:
    if dist is not None:
        dist.barrier()


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _write_batch(outdir: str, fmt: str, idx: list[int], seeds: list[int], x: torch.Tensor, common: dict) -> None:
    """Write one batch: a pending journal naming its data files, the files, their record, then drop the journal.
    A crash at any point leaves only files that the journal or the record names (see :func:`_cleanup`)."""
    from ..zoo.digits import to_image
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    arr = x.detach().cpu().numpy()
    if fmt == "png":
        files = [f"{i:08d}.png" for i in idx]
    else:
        files = [f"batch-{idx[0]:08d}-{len(idx)}.npz"] * len(idx)
    rdir = os.path.join(outdir, RECORDS_DIR)
    pending = os.path.join(rdir, f"pending-{idx[0]:08d}.json")
    journal = json.dumps({"files": sorted(set(files))})
    _atomic_write(pending, lambda f: f.write(journal), "w")
    if fmt == "png":
        for f, img in zip(files, to_image(arr)):
            write_png(os.path.join(outdir, f), img)
    else:
        def w(fh):
            np.savez(fh, indices=np.asarray(idx, np.int64), seeds=np.asarray(seeds, np.int64), samples=arr)
        _atomic_write(os.path.join(outdir, files[0]), w)
    rec = json.dumps({"indices": idx, "seeds": seeds, "files": files, **common})
    _atomic_write(os.path.join(rdir, f"shard-{idx[0]:08d}.json"), lambda f: f.write(rec), "w")
    os.remove(pending)


def _generate_batches(args, config, sha, outdir, sampler, shape, device, dtype, world, rank, dist, load_cfg,
                      created: list[str]) -> None:
    """Check the folder's config, then sample and write this rank's missing indices (``created`` is emptied once the
    first batch is written: from then on the folder is a resumable run)."""
    cfg_path = os.path.join(outdir, CONFIG_FILE)
    _barrier(dist)
    old = load_cfg()
    if old != config:
        if old is None:
            raise GenerateError(f"{cfg_path} is missing")
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        detail = "; ".join(f"{k}: {_short(old.get(k))} there vs {_short(config.get(k))} now" for k in diff[:6])
        raise GenerateError(f"{outdir} was generated with a different config ({detail}); "
                            "use the same options to resume, or another --outdir")

    recs, _ = read_records(outdir)
    done = _completed([r for r in recs if r.get("config_sha") == sha], outdir)
    todo = [i for i in range(rank, args.num, world) if i not in done]
    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    n_done_total = sum(1 for i in done if i < args.num)

    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=args.num, initial=n_done_total, desc="generate", unit="sample")
    made = 0
    progress = n_done_total
    common = {"config_sha": sha, "config": config, "rank": rank, "world_size": world,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(), "device": str(device),
              "torch": torch.__version__}
    for idx in batches:
        seeds = [args.seed_offset + i for i in idx]
        x = sample_images(sampler, shape, seeds, device, dtype)
        _write_batch(outdir, args.format, idx, seeds, x, common)
        created.clear()
        made += len(idx)
        if bar is not None:
            new = min(args.num, n_done_total + made * world)
            bar.update(new - progress)
            progress = new
    if bar is not None:
        bar.update(args.num - progress)
        bar.close()


def _generate(args, config, sha, outdir, sampler, shape, device, dtype, world, rank, dist) -> int:
    cfg_path = os.path.join(outdir, CONFIG_FILE)

    def load_cfg() -> dict | None:
        try:
            with open(cfg_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise GenerateError(f"cannot read {cfg_path}: {e}") from None

    # ---- rank 0 sets the directory up (only when the config matches); everyone then checks the config
    created: list[str] = []   # what this run made before its first sample: undone if the start fails
    if rank == 0:
        try:
            created = _setup_outdir(outdir, config)
        except OSError as e:
            raise GenerateError(f"--outdir {outdir}: cannot write there ({e.strerror or e})") from None
        try:
            old = load_cfg()
        except GenerateError:
            old = {"unreadable": True}
        if old == config:
            recs, bad = read_records(outdir)
            recs = [r for r in recs if r.get("config_sha") == sha]
            n = _cleanup(outdir, recs, bad)
            if n:
                _print(rank, f"removed {n} temporary/unrecorded files of an interrupted run of this folder")
    try:
        _generate_batches(args, config, sha, outdir, sampler, shape, device, dtype, world, rank, dist, load_cfg, created)
    except BaseException:
        _undo(created)
        raise
    # ---- verification on rank 0 after everyone has finished
    _barrier(dist)
    code = 0
    if rank == 0:
        ok, msg, rows = verify_outdir(outdir, args.num, config)
        if ok:
            data = "".join(json.dumps(r) + "\n" for r in rows)
            _atomic_write(os.path.join(outdir, MANIFEST_FILE), lambda f: f.write(data), "w")
            _print(rank, msg)
        else:
            _print(rank, msg, err=True)
            code = 1
    if dist is not None:
        t = torch.tensor([code], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
        dist.broadcast(t, src=0)
        code = int(t.item())
    return code


if __name__ == "__main__":
    sys.exit(main())
