"""The prepared GPU check: everything worth knowing from a short window on one H100/H200, in one JSON.

    python benchmarks/gpu_check.py OUTDIR [--budget 480]      # on the GPU machine, from the repository root

In at most ``--budget`` seconds (default 8 minutes) it
1. builds the extension with the CUDA kernel (``setup.py build_ext --inplace``, DEIS_FAST_CUDA=1) and
   records which combine backends can run CUDA tensors;
2. runs the CUDA-only tests (``pytest tests -k "cuda or gpu"``);
3. runs the latency suite on CUDA (fp16, batch 1 and 8, with and without CFG): combine bandwidth against
   a device-to-device copy, the order-3 step against DEISMultistepScheduler.step, the sampler around a
   UNet2DModel (eager, static workspace, whole-loop CUDA graph; CUDA kernels per NFE), the diffusers
   pipeline and plan building;
4. runs the torch.compile (inductor, reduce-overhead) cases one configuration at a time while the
   budget lasts;
5. with ``--serving``, runs ``benchmarks/serving.py --device cuda`` (the step-level engine against one request at
   a time and whole-request batching; ``OUTDIR/serving.json``);
and writes ``OUTDIR/gpu_check.json`` after every stage: stage status and output tails, test counts, the
merged pytest-benchmark JSON (statistics, without per-round timings), ratio tables (benchmarks/ratios.py)
and a ``headline`` digest.

On a machine without CUDA it says so and exits 0. ``--cpu`` runs the same stages on the CPU (no build;
a check of the script itself), ``--dry-run`` only writes the planned commands.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import ratios  # noqa: E402

RESERVE_S = 10.0          # kept back for writing the JSON
COMPILE_MIN_S = 75.0      # a compile configuration is not started with less than this left
COMPILE_CASES = [(8, False), (1, False), (8, True), (1, True)]   # (batch, CFG), most informative first


@dataclass
class Stage:
    """One subprocess of the check."""
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cap_s: float = 600.0          # never longer than this
    min_s: float = 0.0            # not started with less budget than this
    bench_json: str | None = None  # the pytest-benchmark JSON it writes
    junit: str | None = None       # the JUnit XML it writes


def plan_stages(args: argparse.Namespace, out: str, scratch: str) -> list[Stage]:
    """The commands of the check, in order (pure: nothing runs). Reports go to ``out``; the raw
    pytest-benchmark JSONs (every round's time: megabytes) to ``scratch``."""
    py = sys.executable
    device = "cpu" if args.cpu else "cuda"
    stages = []
    if not (args.cpu or args.skip_build):
        stages.append(Stage("build", [py, "setup.py", "build_ext", "--inplace"],
                            {"DEIS_FAST_CUDA": "1", "DEIS_FAST_REQUIRE_EXT": "1"}, cap_s=240))
    stages.append(Stage("extension", [py, "-c", EXTENSION_PROBE], cap_s=60))
    junit = os.path.join(out, "cuda_tests.xml")
    stages.append(Stage("cuda_tests", [py, "-m", "pytest", "tests", "-q", "-rs", "-p", "no:cacheprovider",
                                       "-k", args.tests_k, "--junitxml", junit],
                        {} if args.cpu else {"DEIS_FAST_REQUIRE_EXT": "1"}, cap_s=180, junit=junit))
    bench = [py, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-only",
             "--benchmark-min-rounds", "5", "--benchmark-max-time", str(args.max_time), "--bench-device", device,
             "--bench-dtype", args.dtype, "--bench-nets", args.nets]
    main_json = os.path.join(scratch, "bench_main.json")
    stages.append(Stage("benchmarks", bench + ["--bench-batch", args.batch, "--bench-cfg", "off,on", "-k",
                                               f"({args.bench_k}) and not compile", "--benchmark-json", main_json],
                        cap_s=300, bench_json=main_json))
    for batch, guided in COMPILE_CASES:
        if str(batch) not in args.batch.split(","):
            continue
        name = f"compile_b{batch}_{'cfg' if guided else 'nocfg'}"
        path = os.path.join(scratch, f"bench_{name}.json")
        stages.append(Stage(name, bench + ["--bench-batch", str(batch), "--bench-cfg", "on" if guided else "off",
                                           "-k", f"({args.bench_k}) and test_sampler and compile",
                                           "--benchmark-json", path], cap_s=240, min_s=COMPILE_MIN_S, bench_json=path))
    if args.serving:
        stages.append(serving_stage(device, out))
    return stages


def serving_stage(device: str, out: str) -> Stage:
    """benchmarks/serving.py on ``device``: (a) one request at a time, (b) whole-request batching, (c) the step-level
    engine, Poisson arrivals on the digits U-Net; its JSON goes to ``out/serving.json`` (opt in: ``--serving``)."""
    return Stage("serving", [sys.executable, os.path.join(HERE, "serving.py"), "--device", device, "--requests", "400",
                             "--loads", "0.5,0.8", "--json", os.path.join(out, "serving.json")], cap_s=180, min_s=60)


EXTENSION_PROBE = """
import json, torch
from deis_fast.kernels import dispatch
ext = dispatch.load_ext()
dev = "cuda" if torch.cuda.is_available() else "cpu"
print(json.dumps({"ext_loaded": ext is not None, "ext_error": repr(dispatch.ext_error()) if ext is None else None,
                  "ext_has_cuda": bool(ext is not None and ext.has_cuda()),
                  "backends": {b: dispatch.available(b, dev) or "ok" for b in dispatch.BACKENDS},
                  "auto_fp16": dispatch.select(dev, torch.float16, None)}))
"""


def run_stage(stage: Stage, remaining_s: float) -> dict[str, Any]:
    """Run one stage within ``remaining_s``; its status, exit code, seconds and output tail."""
    res: dict[str, Any] = {"name": stage.name, "cmd": stage.argv, "env": stage.env}
    limit = min(stage.cap_s, remaining_s - RESERVE_S)
    if limit < max(stage.min_s, 1.0):
        return {**res, "status": "skipped", "reason": f"budget: {remaining_s:.0f} s left"}
    t0 = time.monotonic()
    try:
        p = subprocess.run(stage.argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": _pythonpath(), **stage.env},
                           capture_output=True, text=True, timeout=limit)
        rc, stdout, output = p.returncode, p.stdout, p.stdout + p.stderr
        status = {0: "ok", 5: "no tests selected"}.get(rc, "failed")
    except subprocess.TimeoutExpired as e:
        status, rc, stdout = "timeout", None, _text(e.stdout)
        output = stdout + _text(e.stderr) + f"\n[killed after {limit:.0f} s]"
    return {**res, "status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "tail": output[-3000:],
            "stdout_last_line": stdout.strip().splitlines()[-1] if stdout.strip() else ""}


def _json_or_text(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return {"unparsed": line}


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


def parse_junit(path: str) -> dict[str, Any]:
    """Counts, failed test ids and skip reasons from a pytest JUnit XML file."""
    if not os.path.isfile(path):
        return {"error": f"{path} was not written"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    res: dict[str, Any] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    res["failed"], res["skip_reasons"] = [], {}
    for case in suite.iter("testcase"):
        cid = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            res["failed"].append(cid)
        skip = case.find("skipped")
        if skip is not None:
            reason = skip.get("message", "")
            res["skip_reasons"][reason] = res["skip_reasons"].get(reason, 0) + 1
    return res


def merge_benchmarks(paths: list[str]) -> dict[str, Any]:
    """One pytest-benchmark document from several (machine_info of the first, all benchmarks, without the
    per-round timings)."""
    merged: dict[str, Any] = {"benchmarks": []}
    for p in paths:
        if not os.path.isfile(p):
            continue
        with open(p) as f:
            d = json.load(f)
        for k in ("machine_info", "commit_info", "version"):
            merged.setdefault(k, d.get(k))
        merged["benchmarks"] += d.get("benchmarks", [])
    return ratios.strip_rounds(merged)


def headline(groups: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The numbers the check is for, from ``ratios.summarize``: combine bandwidth over copy bandwidth,
    the order-3 step against DEISMultistepScheduler.step, and per sampler configuration the latency of
    each mode, its speedup over the static eager sampler and its CUDA kernels per NFE."""
    out: dict[str, Any] = {"combine_bandwidth_over_copy": {}, "order3_step_speedup_vs_diffusers_deis": {},
                           "sampler": {}}
    for group, rows in groups.items():
        if group.startswith("combine bandwidth"):
            copy = next((r for r in rows if r["role"] == "baseline"), None)
            for r in rows:
                if copy and r is not copy and "gbps_median" in r:
                    out["combine_bandwidth_over_copy"][f"{group}: {r['label']}"] = r["gbps_median"] / copy["gbps_median"]
        elif group.startswith("order-3 step"):
            for r in rows:
                if "speedup_vs_baseline" in r and r["role"] != "baseline":
                    out["order3_step_speedup_vs_diffusers_deis"][f"{group}: {r['label']}"] = r["speedup_vs_baseline"]
        elif group.startswith("sampler"):
            static = next((r for r in rows if r["label"].startswith("Sampler, static")), None)
            out["sampler"][group] = {
                r["label"]: {"median_ms": 1e3 * r["median_s"],
                             "speedup_vs_static_eager": static["median_s"] / r["median_s"] if static else None,
                             "cuda_kernels_per_nfe": r.get("cuda_kernels_per_nfe"),
                             "dispatched_ops_per_nfe": r.get("dispatched_ops_per_nfe")} for r in rows}
    return out


def device_info() -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                            "torch_cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if info["cuda_available"]:
        info["device_name"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="folder for gpu_check.json (created)")
    ap.add_argument("--budget", type=float, default=480.0, help="total seconds (default 480)")
    ap.add_argument("--cpu", action="store_true", help="run the stages on the CPU (checks the script; no build)")
    ap.add_argument("--dry-run", action="store_true", help="write the planned commands, run nothing")
    ap.add_argument("--skip-build", action="store_true", help="use the extension as built")
    ap.add_argument("--dtype", default="fp16", help="latency-suite dtypes (default fp16)")
    ap.add_argument("--batch", default="1,8", help="latency-suite batch sizes (default 1,8)")
    ap.add_argument("--nets", default="null,unet", help="sampler-group networks (default null,unet)")
    ap.add_argument("--max-time", type=float, default=0.25, help="pytest-benchmark --benchmark-max-time per case")
    ap.add_argument("--tests-k", default="cuda or gpu", help="pytest -k selecting the CUDA-only tests")
    ap.add_argument("--bench-k", default="test_", help="pytest -k restricting the latency suite")
    ap.add_argument("--serving", action="store_true", help="also run benchmarks/serving.py (last stage)")
    args = ap.parse_args(argv)
    if args.budget <= RESERVE_S:
        ap.error(f"--budget must be more than {RESERVE_S:.0f} seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    out = os.path.abspath(args.outdir)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "gpu_check.json")
    report: dict[str, Any] = {"script": "benchmarks/gpu_check.py", "argv": sys.argv[1:] if argv is None else argv,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget,
                              "device": device_info(), "stages": []}
    if not (report["device"]["cuda_available"] or args.cpu or args.dry_run):
        report["status"] = "no-cuda"
        _write(path, report)
        print(f"gpu_check: no CUDA device here (torch {report['device']['torch']}, torch.cuda.is_available() is "
              f"False): nothing to check on a CPU-only machine. Wrote {path}.")
        return 0
    stages = plan_stages(args, out, tempfile.mkdtemp(prefix="gpu_check_"))
    if args.dry_run:
        report.update(status="dry-run", stages=[{"name": s.name, "cmd": s.argv, "env": s.env, "cap_s": s.cap_s}
                                                for s in stages])
        _write(path, report)
        print(f"gpu_check: dry run, {len(stages)} stages planned; wrote {path}")
        return 0
    for stage in stages:
        res = run_stage(stage, args.budget - (time.monotonic() - t0))
        report["stages"].append(res)
        print(f"gpu_check: {stage.name}: {res['status']}" + (f" ({res['seconds']} s)" if "seconds" in res else ""),
              flush=True)
        if stage.name == "extension" and res["status"] == "ok":
            report["extension"] = _json_or_text(res["stdout_last_line"])
        if stage.junit:
            report["tests"] = parse_junit(stage.junit)
        report["benchmarks"] = merge_benchmarks([s.bench_json for s in stages if s.bench_json])
        groups = ratios.summarize(report["benchmarks"])
        report["summary"], report["headline"] = groups, headline(groups)
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
        _write(path, report)
    report["status"] = "ok" if all(s["status"] in ("ok", "no tests selected") for s in report["stages"]) else "incomplete"
    _write(path, report)
    print(f"gpu_check: {report['status']} in {report['elapsed_s']} s; wrote {path}")
    return 0 if report["status"] == "ok" else 1


def _write(path: str, report: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
