"""The deis-fast command line, run in-process through main([...])."""
import io
import json
import os
import re
import subprocess
import sys

import pytest
from _inputs import FUZZ
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from deis_fast.cli import main as cli
from deis_fast.cli.main import main


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
    assert real("deis_fast.cli.main").main(["bench", "yardstick", "--nfe", "5"]) == 2
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
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
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
    from deis_fast.cli import bench as benchmarking
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
    from deis_fast.cli import generate
    out.append(("generate", generate.build_parser()))
    try:
        from deis_fast.cli import main as cli
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


# ---------------------------------------------------------------- what a new user hits (issue 27)
USER_FILES = {"grid.png": b"my own grid", "000000.png": b"my own image", "results.json": b"{}",
              "samples.png": b"mine"}


def _user_folder(path):
    path.mkdir(exist_ok=True)
    for name, data in USER_FILES.items():
        (path / name).write_bytes(data)
    return path


def _assert_untouched(path):
    assert sorted(os.listdir(path)) == sorted(USER_FILES)
    for name, data in USER_FILES.items():
        assert (path / name).read_bytes() == data, name


def _one_line_error(err: str) -> str:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", [["sample", "--nfe", "2", "--num", "1"],
                                     ["demo", "--quick", "--methods", "ddim", "--nfe", "2", "--samples", "2"]])
def test_sample_and_demo_never_touch_a_users_files(command, tmp_path, capsys, monkeypatch):
    """Item 1: the user's grid.png / 000000.png / results.json / samples.png stay byte-identical, --outdir . too."""
    folder = _user_folder(tmp_path / "mine")
    for outdir in (str(folder), "."):
        monkeypatch.chdir(folder)
        for extra in ([], ["--overwrite"]):
            assert main(command + ["--outdir", outdir] + extra) == 2
            err = _one_line_error(capsys.readouterr().err)
            assert "did not write" in err and any(repr(n) in err for n in USER_FILES), err
            _assert_untouched(folder)


def test_sample_overwrites_only_its_own_marked_output(tmp_path, capsys):
    """Item 1: an earlier output is recognised by the marker, not by the names; --overwrite replaces only that."""
    out = tmp_path / "o"
    argv = ["sample", "--nfe", "2", "--num", "2", "--outdir", str(out), "--quiet"]
    assert main(argv) == 0
    marker = json.loads((out / ".deis-fast-output.json").read_text())
    assert sorted(marker["files"]) == ["000000.png", "000001.png", "grid.png"]
    assert main(argv) == 2                               # the same command again: refused without --overwrite
    assert "--overwrite" in _one_line_error(capsys.readouterr().err)
    assert main(argv + ["--overwrite"]) == 0
    (out / "notes.txt").write_text("mine")                 # a user's file next to our output: refused again
    assert main(argv + ["--overwrite"]) == 2
    assert "'notes.txt'" in _one_line_error(capsys.readouterr().err)
    assert (out / "notes.txt").read_text() == "mine"


def test_outdir_that_is_a_file_or_cannot_be_written_exits_2(tmp_path, capsys):
    """Item 4: --outdir FILE, and a read-only --outdir, exit 2 with one line (sample, demo, generate). We run as
    root, which chmod does not stop, so "cannot be written" is a path below a file: creating it fails with
    ENOTDIR, as a read-only or missing mount would."""
    f = tmp_path / "file"
    f.write_text("keep me")
    for outdir in (str(f), str(f / "sub")):
        for argv in (["sample", "--nfe", "2", "--num", "1"], ["demo", "--quick", "--nfe", "2", "--samples", "2"],
                     ["generate", "-n", "1", "--nfe", "2", "--no-progress"]):
            assert main(argv + ["--outdir", outdir]) == 2, (argv, outdir)
            _one_line_error(capsys.readouterr().err)
    assert f.read_text() == "keep me"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into a chmod 0555 folder")
def test_chmod_read_only_outdir_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["sample", "--nfe", "2", "--num", "1", "--outdir", str(ro)]) == 2
        assert "cannot write" in _one_line_error(capsys.readouterr().err)
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("value", ["bogus", "cuda"])
def test_bad_backend_env_exits_2_and_generate_leaves_nothing(value, tmp_path, capsys, monkeypatch):
    """Item 4: DEIS_FAST_BACKEND=bogus (and =cuda on a CPU run) is bad input: exit 2, one line, no files."""
    monkeypatch.setenv("DEIS_FAST_BACKEND", value)
    for argv in (["sample", "--nfe", "2", "--num", "1", "--outdir", str(tmp_path / "s")],
                 ["generate", "-n", "1", "--nfe", "2", "--no-progress", "--device", "cpu",
                  "--outdir", str(tmp_path / "g")]):
        assert main(argv) == 2
        assert "DEIS_FAST_BACKEND" in _one_line_error(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_generate_failed_start_leaves_the_folder_as_it_was(tmp_path, capsys, monkeypatch):
    """Item 4: a failure inside the first batch removes the config.json and records/ generate made."""
    from deis_fast.cli import generate as gen
    def boom(*a, **k):
        raise RuntimeError("model exploded")
    monkeypatch.setattr(gen, "sample_images", boom)
    empty = tmp_path / "empty"
    empty.mkdir()
    for outdir in (tmp_path / "new", empty):
        with pytest.raises(RuntimeError):
            gen.main(["-n", "2", "--nfe", "2", "--no-progress", "--outdir", str(outdir)])
    assert sorted(os.listdir(tmp_path)) == ["empty"] and os.listdir(empty) == []


def test_top_level_help_lists_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "130 interrupted" in out and "2 bad usage" in out and "1 internal failure" in out


def test_help_has_no_doubled_defaults_and_documents_every_option(capsys):
    """Item 6: no '(default 64) (default: None)'; --dtype and --lower-order-final have help; beta is listed."""
    for cmd in ("sample", "demo", "generate", "plan"):
        assert main([cmd, "--help"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in out and "(default: False)" not in out, cmd
        assert not re.search(r"\(default [^)]*\) \(default: ", out), cmd
        if cmd != "demo":
            assert "beta |" in out or "| beta" in out, cmd
    from deis_fast.cli import generate as gen
    helps = {a.dest: a.help for p in (gen.build_parser(), cli.build_parser()._subparsers._group_actions[0].choices["plan"])
             for a in p._actions}
    assert helps["dtype"] and helps["lower_order_final"]


def test_grid_typo_gets_did_you_mean(capsys):
    """Item 5: a misspelt grid name gets a suggestion (CLI and Python)."""
    assert main(["plan", "--grid", "logsrn"]) == 2
    assert "did you mean 'logsnr'" in _one_line_error(capsys.readouterr().err)
    import deis_fast
    with pytest.raises(ValueError, match="did you mean 'karras'"):
        deis_fast.build_plan(deis_fast.VPSchedule.discrete("linear"), "tab3", 4, "karas")


def test_quiet_silences_diffusers(tmp_path):
    """Item 5: --quiet: no diffusers log lines (here: an unexpected key in the UNet's config). Read with a handler
    on diffusers' logger: its own stream handler may hold a stream an earlier test captured."""
    import logging
    diffusers = _save_tiny_unet(tmp_path / "m", 1)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(cfg, some_unknown_key=1)))
    diffusers.DDPMScheduler().save_config(tmp_path / "m")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        argv = ["sample", "--model", str(tmp_path / "m"), "--nfe", "2", "--num", "1"]
        assert main(argv + ["--outdir", str(tmp_path / "loud")]) == 0
        assert any("some_unknown_key" in m for m in seen), seen    # the check can see the warning at all
        seen.clear()
        assert main(argv + ["--outdir", str(tmp_path / "quiet"), "--quiet"]) == 0
        assert seen == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_demo_runs_twice_in_a_row_and_still_refuses_a_users_file(tmp_path, capsys, monkeypatch):
    """Issue 33 item 2: the main command run again replaces its own marked output (exit 0 both times, default
    --outdir); a user's file in that folder is still refused, and kept."""
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--quick", "--methods", "ddim", "--nfe", "2", "--samples", "2"]
    assert main(argv) == 0
    first = (tmp_path / "deis_fast_demo" / "results.json").read_text()
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(first)["errors"] == json.loads((tmp_path / "deis_fast_demo" / "results.json").read_text())["errors"]
    (tmp_path / "deis_fast_demo" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(argv) == 2
    assert "'notes.txt'" in _one_line_error(capsys.readouterr().err)
    assert (tmp_path / "deis_fast_demo" / "notes.txt").read_text() == "mine"
    # another command's output is not the demo's: sample's folder still needs --overwrite for the demo
    assert main(["sample", "--nfe", "2", "--num", "1", "--outdir", "s", "--quiet"]) == 0
    assert main(argv + ["--outdir", "s"]) == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, python_name", [
    (["plan", "--method", "tab3", "--nfe", "5", "--grid", "999,500,0"], "drop --nfe", "nfe="),
    (["plan", "--t-start", "2000"], "pass --t-start/--t-end", "t_start"),
    (["plan", "--method", "tab3", "--pfdiff", "2,1"], "--method ddim", "pfdiff_experimental"),
    (["sample", "--grid", "2000,500,0", "--nfe", "2"], "--grid times", "t_start"),
    (["plan", "--method", "rho_heun", "--nfe", "5"], "--nfe 4 or 6", "nfe=")])
def test_cli_errors_name_flags_not_python_keywords(argv, flag, python_name, tmp_path, capsys):
    """Issue 33 item 18: the command line's messages name its flags (--nfe, --t-start), never the library's keywords
    (nfe=, t_start, pfdiff_experimental=True, which no flag sets)."""
    if argv[0] == "sample":
        argv = argv + ["--outdir", str(tmp_path / "s")]
    assert main(argv) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert flag in err and python_name not in err, err
