"""The latency suite's configuration, its ratio tables and the prepared GPU check (benchmarks/), as far
as they run without a GPU: option parsing, the no-CUDA exit, the planned commands, budget handling,
result parsing, and (slow) the whole check in its CPU mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402
import harness  # noqa: E402
import ratios  # noqa: E402


def _config(options=None, env=None, cuda=False):
    options = options or {}
    return harness.config_from(lambda name: options.get(name), env or {}, cuda_available=cuda)


# --- suite configuration ----------------------------------------------------------------------------

def test_config_defaults_per_device():
    cpu = _config()
    assert (cpu.device, cpu.dtypes, cpu.batches, cpu.cfgs, cpu.compile_backend) == \
        ("cpu", ("fp32",), (1, 4), (False,), "eager")
    cuda = _config({"device": "cuda"}, cuda=True)
    assert (cuda.dtypes, cuda.batches, cuda.cfgs, cuda.compile_backend) == \
        (("fp16", "bf16"), (1, 8), (False, True), "inductor")
    assert "unet" in cuda.nets and "unet" not in cpu.nets


def test_config_option_beats_env_beats_default():
    env = {"DEIS_FAST_BENCH_DTYPE": "bf16", "DEIS_FAST_BENCH_BATCH": "2", "DEIS_FAST_BENCH_THREADS": "1"}
    assert _config(env=env).dtypes == ("bf16",)
    assert _config({"dtype": "fp16,fp32"}, env).dtypes == ("fp16", "fp32")
    assert _config(env=env).batches == (2,) and _config(env=env).threads == 1


@pytest.mark.parametrize("options,match", [
    ({"device": "tpu"}, "--bench-device"), ({"dtype": "fp64"}, "DEIS_FAST_BENCH_DTYPE"),
    ({"batch": "0"}, "--bench-batch"), ({"nets": "resnet"}, "--bench-nets"), ({"cfg": "yes"}, "--bench-cfg"),
    ({"compile-backend": "tvm"}, "--bench-compile-backend"), ({"threads": "x"}, "--bench-threads"),
    ({"device": "cuda"}, "torch.cuda.is_available"),
])
def test_config_bad_values_say_what_to_fix(options, match):
    with pytest.raises(ValueError, match=match):
        _config(options)


# --- ratio tables -----------------------------------------------------------------------------------

def _bench(group, label, median, role=None, **info):
    return {"group": group, "name": label, "extra_info": {"label": label, "role": role, **info},
            "stats": {"median": median, "min": median * 0.9, "iqr": median * 0.1, "rounds": 5}}


def _doc():
    return {"benchmarks": [
        _bench("combine bandwidth 16 fp32 cuda", "copy", 1.0, "baseline", bytes=8e9),
        _bench("combine bandwidth 16 fp32 cuda", "ops.combine[cuda]", 2.0, bytes=20e9),
        _bench("order-3 step [8, 4, 128, 128] fp16 cuda", "DEISMultistepScheduler.step", 3e-3, "baseline"),
        _bench("order-3 step [8, 4, 128, 128] fp16 cuda", "ops.combine[triton]", 1e-4, dispatched_ops_per_nfe=1),
        _bench("sampler tab3 NFE 10 unet b8 fp16 nocfg cuda", "network calls alone", 0.05, "network"),
        _bench("sampler tab3 NFE 10 unet b8 fp16 nocfg cuda", "Sampler, static workspace", 0.06,
               cuda_kernels_per_nfe=300.0),
        _bench("sampler tab3 NFE 10 unet b8 fp16 nocfg cuda", "CUDA graph replay", 0.04),
    ]}


def test_summarize_ratios_against_the_baseline_and_the_network():
    groups = ratios.summarize(_doc())
    step = groups["order-3 step [8, 4, 128, 128] fp16 cuda"]
    assert step[1]["speedup_vs_baseline"] == pytest.approx(30.0) and step[0]["speedup_vs_baseline"] == 1.0
    bw = groups["combine bandwidth 16 fp32 cuda"]
    assert bw[1]["gbps_median"] == pytest.approx(10.0) and bw[0]["gbps_median"] == pytest.approx(8.0)
    assert bw[1]["bandwidth_vs_baseline"] == pytest.approx(1.25) and "bandwidth_vs_baseline" not in bw[0]
    sampler = groups["sampler tab3 NFE 10 unet b8 fp16 nocfg cuda"]
    assert sampler[1]["x_network"] == pytest.approx(1.2) and "speedup_vs_baseline" not in sampler[1]
    table = ratios.markdown(groups)
    assert "| DEISMultistepScheduler.step (baseline) |" in table and "30.00x" in table
    assert "scheduler share" not in table        # empty columns are left out


def test_ratios_strip_keeps_stats_without_rounds(tmp_path):
    doc = _doc()
    doc["benchmarks"][0]["stats"]["data"] = [1.0] * 1000
    src, out = tmp_path / "run.json", tmp_path / "small.json"
    src.write_text(json.dumps(doc))
    assert ratios.main([str(src), "--strip", str(out)]) == 0
    small = json.loads(out.read_text())
    assert "data" not in small["benchmarks"][0]["stats"] and small["benchmarks"][0]["stats"]["median"] == 1.0


def test_ratios_cli_refuses_a_disabled_run(tmp_path, capsys):
    p = tmp_path / "run.json"
    p.write_text(json.dumps({"benchmarks": []}))
    assert ratios.main([str(p)]) == 1
    assert "--benchmark-disable" in capsys.readouterr().err


def test_headline_digest():
    h = gpu_check.headline(ratios.summarize(_doc()))
    assert h["combine_bandwidth_over_copy"] == {"combine bandwidth 16 fp32 cuda: ops.combine[cuda]": pytest.approx(1.25)}
    assert list(h["order3_step_speedup_vs_diffusers_deis"].values()) == [pytest.approx(30.0)]
    modes = h["sampler"]["sampler tab3 NFE 10 unet b8 fp16 nocfg cuda"]
    assert modes["CUDA graph replay"]["speedup_vs_static_eager"] == pytest.approx(1.5)
    assert modes["Sampler, static workspace"]["cuda_kernels_per_nfe"] == 300.0


# --- the GPU check ----------------------------------------------------------------------------------

def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "device_info", lambda: {"torch": "x", "cuda_available": False})
    assert gpu_check.main([str(tmp_path / "out")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["status"] == "no-cuda"


def test_gpu_check_dry_run_plans_every_stage(tmp_path):
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["build", "extension", "cuda_tests", "benchmarks", "compile_b8_nocfg",
                            "compile_b1_nocfg", "compile_b8_cfg", "compile_b1_cfg"]
    assert stages["build"]["env"]["DEIS_FAST_CUDA"] == "1" and "build_ext" in stages["build"]["cmd"]
    assert stages["cuda_tests"]["cmd"][stages["cuda_tests"]["cmd"].index("-k") + 1] == "cuda or gpu"
    bench = stages["benchmarks"]["cmd"]
    assert bench[bench.index("--bench-device") + 1] == "cuda" and bench[bench.index("--bench-dtype") + 1] == "fp16"
    assert "not compile" in bench[bench.index("-k") + 1] and "--benchmark-json" in bench
    assert report["budget_s"] == 8 * 60


def test_gpu_check_budget_skips_and_times_out():
    late = gpu_check.Stage("late", [sys.executable, "-c", "pass"], min_s=100)
    assert gpu_check.run_stage(late, remaining_s=50)["status"] == "skipped"
    slow = gpu_check.Stage("slow", [sys.executable, "-c", "import time; time.sleep(30)"])
    res = gpu_check.run_stage(slow, remaining_s=gpu_check.RESERVE_S + 1.5)
    assert res["status"] == "timeout" and res["seconds"] < 10
    ok = gpu_check.run_stage(gpu_check.Stage("ok", [sys.executable, "-c", "print('fine')"]), 60)
    assert (ok["status"], ok["stdout_last_line"]) == ("ok", "fine")


def test_parse_junit(tmp_path):
    p = tmp_path / "t.xml"
    p.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                 '<testcase classname="tests.a" name="t1"/><testcase classname="tests.a" name="t2"><failure/></testcase>'
                 '<testcase classname="tests.b" name="t3"><skipped message="no GPU"/></testcase>'
                 '</testsuite></testsuites>')
    res = gpu_check.parse_junit(str(p))
    assert (res["tests"], res["failures"], res["skipped"]) == (3, 1, 1)
    assert res["failed"] == ["tests.a::t2"] and res["skip_reasons"] == {"no GPU": 1}
    assert "error" in gpu_check.parse_junit(str(tmp_path / "missing.xml"))


def test_merge_benchmarks(tmp_path):
    for i in range(2):
        bench = {"name": str(i), "stats": {"median": 1.0, "data": [1.0, 1.0]}}
        (tmp_path / f"{i}.json").write_text(json.dumps({"machine_info": {"i": i}, "benchmarks": [bench]}))
    merged = gpu_check.merge_benchmarks([str(tmp_path / f"{i}.json") for i in range(3)])   # 2.json is missing
    assert merged["machine_info"] == {"i": 0} and [b["name"] for b in merged["benchmarks"]] == ["0", "1"]
    assert merged["benchmarks"][0]["stats"] == {"median": 1.0}       # no per-round timings


@pytest.mark.slow
def test_gpu_check_cpu_mode_end_to_end(tmp_path):
    """Every stage but the build, on the CPU, restricted to the fast groups."""
    r = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), str(tmp_path), "--cpu", "--batch", "1",
                        "--dtype", "fp32", "--nets", "null", "--max-time", "0.01", "--tests-k", "gpu_non_default",
                        "--bench-k", "test_build_plan or test_sampler or test_bandwidth_copy"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DEIS_FAST_BENCH_THREADS": "1", "DEIS_FAST_BENCH_NUMEL": "4096"})
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["status"] == "ok" and report["extension"]["ext_loaded"]
    # the one GPU test skips on a CPU; a test module that skips at import for a missing optional extra (Ray, ...)
    # is one more skipped "test" in pytest's report, selected or not
    t = report["tests"]
    assert t["tests"] >= 1 and t["skipped"] == t["tests"] and t["failures"] == t["errors"] == 0, t
    modes = report["headline"]["sampler"]["sampler tab3 NFE 10 null b1 fp32 nocfg cpu"]
    assert "Sampler, static workspace" in modes and "torch.compile[eager]" in modes
    assert any(g.startswith("plan building") for g in report["summary"])


def test_gpu_check_serving_stage_is_opt_in(tmp_path):
    assert gpu_check.main([str(tmp_path), "--dry-run", "--serving"]) == 0
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert stages[-1]["name"] == "serving"
    cmd = stages[-1]["cmd"]
    assert cmd[1].endswith("serving.py") and cmd[cmd.index("--device") + 1] == "cuda"
