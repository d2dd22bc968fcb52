"""The deis-fast command line, run in-process through main([...])."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from deis_fast import cli
from deis_fast.cli import demo_grid_size, main


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--outdir", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    with Image.open(out / "samples.png") as im:
        assert im.size == demo_grid_size(cols=16)
    with Image.open(out / "error_vs_nfe.png") as im:
        assert im.size == (600, 450)
    errors = report["errors"]
    assert set(errors) == set(cli.DEMO_METHODS)
    for m in ("tab3", "logrho3", "dpmpp2", "ipndm4"):
        e = errors[m]
        assert e["5"] > e["10"] > e["20"], (m, e)
    assert errors["tab3"]["20"] < 0.01
    assert json.loads((out / "results.json").read_text())["errors"] == errors


def test_demo_table_output(tmp_path, capsys):
    assert main(["demo", "--quick", "--outdir", str(tmp_path), "--methods", "ddim", "tab3", "--nfe", "5", "10",
                 "--samples", "4"]) == 0
    text = capsys.readouterr().out
    assert "| method | NFE 5 | NFE 10 |" in text and "| tab3 |" in text


def test_plan_text_and_json(capsys):
    assert main(["plan", "--method", "pfdiff", "--nfe", "4"]) == 0
    assert "springboard" in capsys.readouterr().out
    assert main(["plan", "--method", "tab3", "--nfe", "5", "--schedule", "ve", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["nfe"] == 5 and sum(op["op"] == "eval" for op in d["ops"]) == 5
    comb = [op for op in d["ops"] if op["op"] == "combine"]
    assert all(len(op["coefs"]) == len(op["srcs"]) for op in comb)
    assert main(["plan", "--method", "logrho3", "--grid", "999,500,100,0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 3


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--method", "nope"], "unknown method"),
    (["plan", "--grid", "wiggly"], "--grid"),
    (["plan", "--method", "rho_heun", "--nfe", "5"], "multiple of 2"),
    (["sample", "--model", "/nonexistent/dir"], "not a directory"),
    (["plan", "--schedule", "bogus"], "invalid choice"),
])
def test_bad_input_exits_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err


def test_no_command_and_help(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_sample_embedded(tmp_path, capsys):
    assert main(["sample", "--num", "3", "--batch-size", "2", "--nfe", "4", "--outdir", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["files"]) == 3 and info["nfe"] == 4
    with Image.open(info["files"][0]) as im:
        assert im.size == (32, 32)
    # a sample depends only on its seed, not on the batch it was drawn in
    assert main(["sample", "--num", "1", "--nfe", "4", "--outdir", str(tmp_path / "b"), "--quiet"]) == 0
    a = Image.open(info["files"][0]).tobytes()
    b = Image.open(tmp_path / "b" / "000000.png").tobytes()
    assert a == b


def test_sample_diffusers_model_dir(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.save_pretrained(tmp_path / "m")
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_config(tmp_path / "m")
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tmp_path / "m"), "--method", "dpmpp2", "--nfe", "3", "--num", "2",
                 "--outdir", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with Image.open(info["files"][1]) as im:
        assert im.size == (8, 8) and im.mode == "RGB"


def test_bench_dispatch(capsys, monkeypatch):
    from deis_fast import benchmarking
    monkeypatch.delattr(benchmarking, "quality_main", raising=False)
    assert main(["bench", "quality"]) == 2
    assert "not available" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(benchmarking, "quality_main", lambda argv: seen.setdefault("argv", argv) and 0, raising=False)
    assert main(["bench", "quality", "--x", "1"]) == 0 and seen["argv"] == ["--x", "1"]
    assert main(["bench", "yardstick", "--samples", "4", "--nfe", "5", "--methods", "ddim", "--grids",
                 "time_quadratic", "--no-diffusers"]) == 0
    assert "deis_fast ddim / time_quadratic" in capsys.readouterr().out


def test_generate_registered_when_available():
    gen = cli._generate_module()
    names = cli.build_parser()._subparsers._group_actions[0].choices
    assert ("generate" in names) == (gen is not None)


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "deis_fast", "plan", "--method", "ddim", "--nfe", "2", "--json"],
                       capture_output=True, text=True, cwd=os.path.dirname(__file__), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "ddim"
