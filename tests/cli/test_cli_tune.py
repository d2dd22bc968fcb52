"""deis-fast tune / sample --tuned / generate --tuned on the embedded models (small sizes: the real measurement is
benchmarks/tuned_cli.py)."""
import json
import re

import pytest

from deis_fast.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tuned_digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    out = d / "d5.json"
    rc = cli.main(["tune", "--model", "digits", "--nfe", "5", "--method", "ipndm4", "--out", str(out),
                   "--calibration", "12", "--held-out", "6", "--time-budget", "2", "--reference-nfe", "40",
                   "--cache", str(d / "cache"), "--quiet"])
    assert rc == 0
    return out


def test_tune_writes_a_file_that_sample_and_generate_load(tuned_digits, tmp_path, capsys):
    d = json.loads(tuned_digits.read_text())["payload"]
    assert d["method"] == "ipndm4" and d["nfe"] == 5 and d["meta"]["model"] == "digits"
    assert d["errors"]["held_out_tuned"] <= d["errors"]["held_out_untuned"]
    capsys.readouterr()
    assert cli.main(["sample", "--tuned", str(tuned_digits), "--num", "2", "--outdir", str(tmp_path / "s"),
                     "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "ipndm4" and info["nfe"] == 5
    assert cli.main(["generate", "--tuned", str(tuned_digits), "--num", "2", "--outdir", str(tmp_path / "g"),
                     "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["times"] == pytest.approx(d["grid"]) and cfg["tuned"]


@pytest.mark.parametrize("extra, message", [(["--nfe", "7"], "NFE 5, not 7"),
                                            (["--model", "flow"], "schedule"),
                                            (["--method", "tab3", "--grid", "logsnr"], "drop --grid"),
                                            (["--method", "dpmpp2"], "method 'ipndm4'")])
def test_sample_refuses_a_mismatched_tuned_file(tuned_digits, tmp_path, capsys, extra, message):
    rc = cli.main(["sample", "--tuned", str(tuned_digits), "--num", "1", "--outdir", str(tmp_path / "s")] + extra)
    assert rc == 2 and message in capsys.readouterr().err


def test_sample_refuses_an_edited_tuned_file(tuned_digits, tmp_path, capsys):
    d = json.loads(tuned_digits.read_text())
    d["payload"]["grid"][1] += 1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    rc = cli.main(["sample", "--tuned", str(bad), "--num", "1", "--outdir", str(tmp_path / "s")])
    assert rc == 2 and "checksum" in capsys.readouterr().err


def test_tune_prints_the_table(tmp_path, capsys):
    """No --method: the method search (its table), the file's method then runs `sample --tuned` without --method."""
    out_file = tmp_path / "f.json"
    rc = cli.main(["tune", "--model", "flow", "--nfe", "3", "--out", str(out_file), "--calibration", "8",
                   "--held-out", "4", "--time-budget", "1", "--reference-nfe", "20", "--cache", ""])
    out = capsys.readouterr().out
    assert rc == 0 and "method search" in out and "| tab2+corrector |" in out and "wrote" in out
    assert "| untuned (tab3, default grid) |" in out and re.search(r"\| tab[23](\+corrector)?, (tuned|default) grid \|", out)
    d = json.loads(out_file.read_text())["payload"]
    assert cli.main(["sample", "--model", "flow", "--tuned", str(out_file), "--num", "1", "--outdir",
                     str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == d["method"]
    rc = cli.main(["tune", "--model", "flow", "--corrector", "--out", str(tmp_path / "g.json")])
    assert rc == 2 and "--corrector needs --method" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["flow_tab3_nfe5.json", "digits_tab2_nfe5.json", "digits_pfdiff_nfe7.json",
                                  "digits_nfe5.json", "flow_nfe7.json"])
def test_committed_tuned_files_load_for_their_model(name):
    import os

    from deis_fast.cli.common import load_model
    from deis_fast.tuning import load_tuned
    t = load_tuned(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "tuned", name))
    if name.count("_") == 1:   # a method search's file: the method it chose
        from deis_fast.tuning.files import _label
        assert t.meta["chosen"] == _label(t.method, t.options)
    plan = t.make_plan(load_model(name.split("_")[0]).schedule)
    assert plan.nfe == t.nfe and t.errors["held_out_tuned"] <= t.errors["held_out_untuned"]


TINY = ["--model", "digits", "--nfe", "3", "--method", "tab3", "--calibration", "4", "--held-out", "1",
        "--time-budget", "0.5", "--reference-nfe", "8", "--cache", "", "--quiet"]


@pytest.fixture
def no_tuning(monkeypatch):
    """tune() must not run: the --out checks come first."""
    import deis_fast.tuning

    def boom(*a, **k):
        raise AssertionError("the tuning run started before --out was checked")
    monkeypatch.setattr(deis_fast.tuning, "tune", boom)


def test_tune_refuses_to_overwrite_a_users_file(tmp_path, capsys, no_tuning):
    """Issue 33 item 3: an existing file that is not a tuned file is kept (exit 2) unless --overwrite."""
    mine = tmp_path / "my_tuned.json"
    mine.write_text("my notes")
    assert cli.main(["tune", "--out", str(mine)] + TINY) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "not a tuned file" in err and "Traceback" not in err
    assert mine.read_text() == "my notes"


def test_tune_overwrites_its_own_file_and_a_users_with_overwrite(tmp_path, capsys):
    mine = tmp_path / "my_tuned.json"
    mine.write_text("my notes")
    assert cli.main(["tune", "--out", str(mine), "--overwrite"] + TINY) == 0
    assert json.loads(mine.read_text())["format"] == "deis_fast.tuned"
    assert cli.main(["tune", "--out", str(mine)] + TINY) == 0          # a tuned file: replaced without --overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_tuned.json"]   # no temporary file left


def test_tune_checks_out_before_the_run(tmp_path, capsys, no_tuning):
    """Issue 33 item 4: --out DIR, or a path that cannot be written (below a file: root ignores chmod), exits 2 with
    one line before any tuning, and leaves nothing behind."""
    folder = tmp_path / "dir"
    folder.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, needle in ((folder, "is a folder"), (blocker / "t.json", "does not exist")):
        assert cli.main(["tune", "--out", str(out)] + TINY) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"] and not list(folder.iterdir())


def test_save_tuned_leaves_no_temporary_file(tmp_path, tuned_digits):
    from deis_fast.tuning import load_tuned
    t = load_tuned(tuned_digits)
    folder = tmp_path / "dir"
    folder.mkdir()
    with pytest.raises(OSError):
        t.save(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["dir"] and not list(folder.iterdir())


def test_summary_says_default_grid_when_the_grid_was_not_tuned(tmp_path, capsys, monkeypatch):
    """Issue 33 item 6: when the search keeps the method's default grid (here: the optimizer returns it), the summary
    says so; it does not call the corrector's gain a "tuned grid"."""
    import deis_fast.tuning.grids as go
    real = go.optimize_grid

    def keeps_default(model, schedule, method, nfe, *a, **k):
        g = real(model, schedule, method, nfe, *a, **dict(k, time_budget=0.2))
        g.times = list(deis_fast.build_plan(schedule, method, nfe).times)
        return g
    import deis_fast
    monkeypatch.setattr(go, "optimize_grid", keeps_default)
    out_file = tmp_path / "f.json"
    argv = ["tune", "--model", "digits", "--nfe", "3", "--method", "tab3,tab3+corrector", "--out", str(out_file),
            "--calibration", "6", "--held-out", "3", "--reference-nfe", "20", "--cache", ""]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    t = json.loads(out_file.read_text())["payload"]
    assert t["meta"]["grid_tuned"] is False
    assert "tuned grid" not in out and "| untuned (tab3, default grid) |" in out
    assert f"| {t['meta']['chosen']}, default grid |" in out


def test_sample_tuned_prints_the_corrector(tmp_path, capsys):
    """Issue 33 item 6: `sample --tuned` names the file's method with its options (tab3+corrector), not bare tab3."""
    import os
    f = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "tuned", "digits_nfe5.json")
    assert cli.main(["sample", "--tuned", f, "--num", "1", "--outdir", str(tmp_path / "s")]) == 0
    assert "(tab3+corrector, 5 NFE" in capsys.readouterr().out
