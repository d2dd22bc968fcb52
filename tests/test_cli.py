"""The deis-fast command line, run in-process through main([...])."""
import io
import json
import os
import subprocess
import sys

import pytest
from _inputs import FUZZ
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from deis_fast import cli
from deis_fast.cli import main


def demo_grid_size(cols: int) -> tuple[int, int]:
    """(width, height) of the demo's samples.png: a label column, then 8x8 digits upscaled, padded."""
    cell = 8 * cli.DEMO_SCALE + cli.DEMO_PAD
    rows = 1 + len(cli.DEMO_METHODS) * len(cli.DEMO_NFES)
    return cli.DEMO_LABEL_W + cols * cell + cli.DEMO_PAD, rows * cell + cli.DEMO_PAD


@pytest.mark.slow
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


def test_demo_flow_model(tmp_path, capsys):
    """--model flow: the embedded rectified-flow model, sampled from t = 1; errors fall with NFE."""
    assert main(["demo", "--model", "flow", "--quick", "--outdir", str(tmp_path), "--methods", "ddim", "tab3",
                 "--nfe", "4", "8", "--samples", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "flow"
    for m in ("ddim", "tab3"):
        assert report["errors"][m]["4"] > report["errors"][m]["8"], report["errors"]
    assert report["errors"]["tab3"]["8"] < report["errors"]["ddim"]["8"]


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
    (["plan", "--method", "dpm++2m"], "did you mean 'dpmpp_2m'"),
    (["plan", "--grid", "wiggly"], "--grid"),
    (["plan", "--method", "rho_heun", "--nfe", "5"], "multiple of 2"),
    (["plan", "--nfe", "0"], "--nfe: expected a positive integer"),
    (["plan", "--method", "tab3", "--eta", "0.5"], "eta applies to stochastic"),
    (["plan", "--schedule", "bogus"], "invalid choice"),
    (["sample", "--model", "/nonexistent/dir"], "not a directory"),
    (["sample", "--num", "0"], "--num: expected a positive integer"),
    (["sample", "--upscale", "0"], "--upscale: expected a positive integer"),
    (["sample", "--eta", "-1"], "--eta: expected a number >= 0"),
    (["demo", "--samples", "0"], "--samples: expected a positive integer"),
    (["demo", "--methods", "nope"], "unknown method"),
    (["demo", "--nfe", "0"], "--nfe: expected a positive integer"),
    (["bench", "yardstick", "--nfe", "0"], "--nfe: expected a positive integer"),
    (["bench", "yardstick", "--samples", "0"], "--samples: expected a positive integer"),
    (["bench", "yardstick", "--methods", "nope"], "unknown method"),
    (["generate", "-n", "0", "--outdir", "x"], "-n/--num"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err


def test_generate_outdir_that_is_a_file_exits_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["generate", "-n", "2", "--outdir", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err and f.read_text() == "keep me"


def test_bench_without_diffusers_suggests_no_diffusers(capsys, monkeypatch):
    import importlib
    real = importlib.import_module
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    assert real("deis_fast.cli").main(["bench", "yardstick", "--nfe", "5"]) == 2
    assert "--no-diffusers" in capsys.readouterr().err


def test_demo_without_plot_dependencies_fails_before_computing(capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a))
    monkeypatch.setattr(cli, "load_digits_model", None, raising=False)
    assert main(["demo", "--quick", "--outdir", "unused"]) == 2
    assert "pip install 'deis_fast[demo]'" in capsys.readouterr().err
    assert not os.path.exists("unused")


def test_help_shows_defaults_and_methods_command(capsys):
    assert main(["sample", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: tab3)" in out and "deis-fast methods" in out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "dpmpp_2m" in out and "pfdiff" in out and "tab3" in out


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


def _save_tiny_unet(path, channels: int):
    """A tiny random-weight diffusers UNet2DModel (8x8) saved to ``path``; returns the diffusers module."""
    diffusers = pytest.importorskip("diffusers")
    diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                          layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).save_pretrained(path)
    return diffusers


def test_sample_diffusers_model_dir(tmp_path, capsys):
    diffusers = _save_tiny_unet(tmp_path / "m", 3)
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_config(tmp_path / "m")
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tmp_path / "m"), "--method", "dpmpp2", "--nfe", "3", "--num", "2",
                 "--outdir", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with Image.open(info["files"][1]) as im:
        assert im.size == (8, 8) and im.mode == "RGB"


def test_bench_dispatch(capsys, monkeypatch):
    from deis_fast import benchmarking
    seen = {}
    monkeypatch.setattr(benchmarking, "quality_main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert main(["bench", "quality", "--x", "1"]) == 0 and seen["argv"] == ["--x", "1"]
    assert main(["bench", "yardstick", "--samples", "4", "--nfe", "5", "--methods", "ddim", "--grids",
                 "time_quadratic", "--no-diffusers"]) == 0
    assert "deis_fast ddim / time_quadratic" in capsys.readouterr().out


@pytest.mark.parametrize("method,model", [("tab3", "digits"), ("ddim_eta", "digits"), ("tab3", "flow")])
def test_sample_and_generate_give_the_same_image_for_a_seed(method, model, tmp_path, capsys):
    """One seeding scheme, one model batch, one PNG writer: image i of both commands is the same file."""
    assert main(["sample", "--model", model, "--method", method, "--nfe", "4", "--num", "3", "--seed", "5",
                 "--upscale", "1", "--threads", "1", "--outdir", str(tmp_path / "s"), "--quiet"]) == 0
    assert main(["generate", "--model", model, "-n", "3", "--seed-offset", "5", "--method", method, "--nfe", "4",
                 "--no-progress", "--outdir", str(tmp_path / "g")]) == 0
    for i in range(3):
        assert (tmp_path / "s" / f"{5 + i:06d}.png").read_bytes() == (tmp_path / "g" / f"{i:08d}.png").read_bytes()
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["model"] == model and config["prediction"] == {"digits": "eps", "flow": "flow"}[model]
    if model == "flow":   # sampling starts at t = 1 (the FlowMatch grid), not at a VP t_max
        assert config["times"][0] == 1.0 and config["times"][-1] == 0.0


def test_sample_flow_model_images_differ_from_the_eps_model(tmp_path, capsys):
    for model in ("digits", "flow"):
        assert main(["sample", "--model", model, "--nfe", "4", "--num", "2", "--outdir", str(tmp_path / model),
                     "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["model"] == f"embedded {model} model" and len(info["files"]) == 2
    with Image.open(tmp_path / "flow" / "000000.png") as a, Image.open(tmp_path / "digits" / "000000.png") as b:
        assert a.size == b.size == (32, 32) and a.tobytes() != b.tobytes()


def test_flow_model_rejects_a_vp_schedule(tmp_path, capsys):
    assert main(["sample", "--model", "flow", "--schedule", "linear", "--nfe", "2", "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rectified-flow" in err and "drop --schedule" in err and err.count("\n") == 1


def test_sample_list_grid_without_nfe(tmp_path, capsys):
    assert main(["sample", "--grid", "999,500,0", "--num", "2", "--outdir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 2


def test_sample_bare_unet_folder_needs_and_takes_schedule(tmp_path, capsys):
    _save_tiny_unet(tmp_path / "m", 1)
    argv = ["sample", "--model", str(tmp_path / "m"), "--nfe", "2", "--num", "1", "--outdir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--schedule" in capsys.readouterr().err
    assert main(argv + ["--schedule", "scaled_linear", "--prediction", "v", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num"] == 1


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "deis_fast", "plan", "--method", "ddim", "--nfe", "2", "--json"],
                       capture_output=True, text=True, cwd=os.path.dirname(__file__), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "ddim"


# ---------------------------------------------------------------- fuzzing the argument parsers
def _parsers():
    out = []
    from deis_fast import generate
    out.append(("generate", generate.build_parser()))
    try:
        from deis_fast import cli
    except ImportError:
        return out
    for name in ("build_parser", "make_parser", "get_parser", "create_parser", "parser"):
        f = getattr(cli, name, None)
        if callable(f):
            try:
                out.append(("cli", f()))
            except TypeError:
                pass
            break
    return out


TOKENS = ["-n", "--num", "--outdir", "/tmp/x", "--batch-size", "--method", "tab3", "nope", "--nfe", "--grid",
          "karras", "999,500,0", "--eta", "nan", "--pfdiff", "2,1", "2", "a,b", "--seed-offset", "--format", "png",
          "gif", "--model", "digits", "--dtype", "float16", "half", "--device", "cpu", "--threads", "--model-batch",
          "0", "-1", "10", "1e9", "--no-progress", "--bogus", "sample", "generate", "demo", "--", "", "=",
          "--_fail-after", "x"]


@FUZZ
@given(tokens=st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=6)), max_size=12))
def test_fuzz_argument_parsers(tokens):
    if "-h" in tokens or "--help" in tokens:
        return
    import contextlib
    for _, parser in _parsers():
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(tokens)
            except SystemExit as e:
                assert e.code == 2, (tokens, e.code)
