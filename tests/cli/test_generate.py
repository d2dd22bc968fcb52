"""deis_fast.cli.generate: determinism across batch and world sizes, crash + resume, verification, errors.

The 2-process runs use torchrun (torch.distributed.run) with the gloo backend on CPU."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed

import deis_fast
from deis_fast.cli import generate as gen

COMMON = ["-n", "12", "--nfe", "4", "--no-progress"]
STOCH = ["--method", "ddim_eta", "--eta", "1.0"]  # stochastic: exercises the per-sample step-noise generators


def _gen(outdir, *extra, fmt="npz", batch=5):
    return gen.main([*COMMON, "--outdir", str(outdir), "--format", fmt, "--batch-size", str(batch), *extra])


CRASHING = os.path.join(os.path.dirname(__file__), "crashing_generate.py")


def _torchrun(outdir, *extra, fmt="npz", batch=4, nproc=2, timeout=120, crash=None):
    """torchrun of generate; ``crash=(K, rank or None)``: that rank dies mid-batch after K samples."""
    entry = ["-m", "deis_fast.cli.generate"]
    if crash is not None:
        entry = [CRASHING, "--fail-after", str(crash[0])] + (["--fail-rank", str(crash[1])] if crash[1] is not None
                                                             else []) + ["--"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *entry, *COMMON, "--outdir", str(outdir), "--format", fmt, "--batch-size", str(batch), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _load_npz(outdir) -> dict[int, np.ndarray]:
    out = {}
    for f in glob.glob(os.path.join(outdir, "*.npz")):
        with np.load(f) as z:
            for i, s, x in zip(z["indices"], z["seeds"], z["samples"]):
                assert int(i) not in out, f"index {i} twice"
                assert int(s) == int(i)  # seed_offset 0
                out[int(i)] = x
    return out


def _load_png_bytes(outdir) -> dict[int, bytes]:
    return {int(os.path.basename(f)[:8]): open(f, "rb").read() for f in glob.glob(os.path.join(outdir, "*.png"))}


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b) == list(range(12))
    for i in a:
        if isinstance(a[i], bytes):
            assert a[i] == b[i], f"sample {i} differs"
        else:
            assert a[i].dtype == b[i].dtype and np.array_equal(a[i], b[i]), \
                f"sample {i} differs by {np.abs(a[i] - b[i]).max()}"


def _manifest(outdir):
    with open(os.path.join(outdir, gen.MANIFEST_FILE)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Clean single-process runs (npz, stochastic; png, deterministic), batch size 5."""
    d = tmp_path_factory.mktemp("ref")
    assert _gen(d / "npz", *STOCH) == 0
    assert _gen(d / "png", "--method", "tab3", fmt="png") == 0
    return {"npz": _load_npz(d / "npz"), "png": _load_png_bytes(d / "png"), "dir": d}


# ------------------------------------------------------------------------------------ unit pieces
def test_initial_noise_is_randn_per_sample_and_generators_continue():
    seeds = [3, 17, 4]
    noise, gens = gen.initial_noise((1, 8, 8), seeds)
    assert torch.equal(noise, deis_fast.randn_per_sample((3, 1, 8, 8), seeds))
    # the step noise comes from the same generator *after* the initial draw, so it is not a copy of it
    nxt = torch.randn((1, 8, 8), generator=gens[0])
    assert not torch.equal(nxt, noise[0])


def test_fixed_batch_model_is_batch_invariant():
    from deis_fast.zoo.digits import load_digits_model
    model = gen.FixedBatchModel(load_digits_model(), 4)
    x = torch.randn(11, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((11,), 700.0)
    with torch.inference_mode():
        full = model(x, t)
        for b in (1, 3, 5, 11):
            parts = torch.cat([model(x[i:i + b], t[i:i + b]) for i in range(0, 11, b)])
            assert torch.equal(parts, full), b
        perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
        assert torch.equal(model(x[perm], t)[perm.argsort()], full)  # neighbours do not matter


def test_png_encoder_roundtrip():
    PIL = pytest.importorskip("PIL.Image", reason="needs Pillow: pip install -e '.[test]'")
    img = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    import io
    for c in (1, 3, 4):
        data = gen.png_bytes(np.ascontiguousarray(np.resize(img, (c, 5, 7))))
        back = np.asarray(PIL.open(io.BytesIO(data)))
        back = back[None] if back.ndim == 2 else back.transpose(2, 0, 1)
        assert np.array_equal(back, np.resize(img, (c, 5, 7)))
    with pytest.raises(gen.UsageError, match="npz"):
        gen.png_bytes(np.zeros((2, 4, 4), np.uint8))


# ------------------------------------------------------------------------------------ single process
def test_batch_size_does_not_change_a_bit(reference, tmp_path):
    assert _gen(tmp_path / "a", *STOCH, batch=3) == 0
    _assert_same(_load_npz(tmp_path / "a"), reference["npz"])
    assert _gen(tmp_path / "b", "--method", "tab3", fmt="png", batch=12) == 0
    _assert_same(_load_png_bytes(tmp_path / "b"), reference["png"])


def test_outputs_layout_manifest_and_png_content(reference):
    PIL = pytest.importorskip("PIL.Image", reason="needs Pillow: pip install -e '.[test]'")
    from deis_fast.zoo.digits import to_image
    d = reference["dir"]
    rows = _manifest(d / "png")
    assert [r["index"] for r in rows] == list(range(12))
    assert all(r["seed"] == r["index"] and r["file"] == f"{r['index']:08d}.png" for r in rows)
    cfg = json.loads((d / "png" / gen.CONFIG_FILE).read_text())
    assert cfg["method"] == "tab3" and cfg["nfe"] == 4 and cfg["format"] == "png"
    recs, bad = gen.read_records(str(d / "png"))
    assert not bad and all(r["config"] == cfg for r in recs)
    # the png holds to_image of the sample (compare with an npz run of the same config)
    with np.load(glob.glob(str(d / "npz" / "*.npz"))[0]) as z:
        assert z["samples"].shape[1:] == (1, 8, 8) and z["samples"].dtype == np.float32
    # a run of the same deterministic config as npz gives the same pixels
    d2 = d / "png_as_npz"
    assert _gen(d2, "--method", "tab3") == 0
    samples = _load_npz(d2)
    for i in range(12):
        img = np.asarray(PIL.open(d / "png" / f"{i:08d}.png"))
        assert np.array_equal(img, to_image(samples[i])[0])
    assert not [f for f in os.listdir(d / "png") if f.startswith(gen.TMP_PREFIX)]


def test_rerun_is_a_noop_and_num_can_grow(tmp_path):
    assert _gen(tmp_path, *STOCH) == 0
    before = {f: os.stat(f).st_mtime_ns for f in glob.glob(str(tmp_path / "*.npz"))}
    assert _gen(tmp_path, *STOCH) == 0
    assert {f: os.stat(f).st_mtime_ns for f in glob.glob(str(tmp_path / "*.npz"))} == before
    assert gen.main(["-n", "15", "--nfe", "4", "--no-progress", "--outdir", str(tmp_path), "--format", "npz",
                     *STOCH]) == 0
    assert [r["index"] for r in _manifest(tmp_path)] == list(range(15))


def test_config_mismatch_is_a_clear_error(tmp_path, capsys):
    assert _gen(tmp_path, *STOCH) == 0
    capsys.readouterr()
    assert _gen(tmp_path, *STOCH, "--seed-offset", "5") == 2
    err = capsys.readouterr().err
    assert "different config" in err and "seed_offset" in err and "another --outdir" in err
    assert _gen(tmp_path, "--method", "tab3") == 2  # format matches, method does not
    assert "method" in capsys.readouterr().err


def test_verification_detects_duplicates_and_missing(tmp_path, capsys):
    assert _gen(tmp_path, "--method", "tab3", fmt="png") == 0
    rdir = tmp_path / gen.RECORDS_DIR
    first = sorted(os.listdir(rdir))[0]
    shutil.copy(rdir / first, rdir / "shard-00000099.json")  # the same indices recorded twice
    capsys.readouterr()
    assert _gen(tmp_path, "--method", "tab3", fmt="png") == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "more than once" in err
    os.remove(rdir / "shard-00000099.json")
    os.remove(tmp_path / "00000003.png")
    ok, msg, _ = gen.verify_outdir(str(tmp_path), 12)
    assert not ok and "do not exist" in msg
    ok, msg, _ = gen.verify_outdir(str(tmp_path), 13)
    assert not ok and "missing indices" in msg and "12" in msg
    assert _gen(tmp_path, "--method", "tab3", fmt="png") == 0  # the lost sample is regenerated


def test_stale_temp_and_journaled_files_are_cleaned(tmp_path, reference):
    assert _gen(tmp_path, "--method", "tab3", "-n", "1", fmt="png") == 0  # an earlier run of ours (1 sample)
    rdir = tmp_path / gen.RECORDS_DIR
    (tmp_path / ".tmp-00000004.png.123.0123abcd").write_bytes(b"partial")
    (rdir / ".tmp-shard-00000004.json.1.89abcdef").write_text("{")
    (rdir / "shard-00000007.json").write_text("{broken")
    (rdir / "pending-00000004.json").write_text(json.dumps({"files": ["00000004.png", "00000005.png"]}))
    (tmp_path / "00000004.png").write_bytes(b"garbage: journaled, no record")
    (tmp_path / "00000009.png").write_bytes(b"not journaled: the user's")
    (tmp_path / ".tmp-notes").write_text("the user's, not our temp pattern")
    (tmp_path / "notes.txt").write_text("not ours")
    assert _gen(tmp_path, "--method", "tab3", fmt="png") == 0
    names = set(os.listdir(tmp_path)) | set(os.listdir(rdir))
    assert not [n for n in names if gen._TMP_RE.match(n)] and "shard-00000007.json" not in names
    assert "pending-00000004.json" not in names
    assert {"notes.txt", ".tmp-notes"} <= names
    _assert_same(_load_png_bytes(tmp_path), reference["png"])  # 00000009.png: regenerated by its own record


def test_user_folder_is_refused_and_left_untouched(tmp_path, capsys):
    """A folder that is not a generate run (no config.json) is never written to, let alone cleaned."""
    for i in range(10):
        (tmp_path / f"{i:08d}.png").write_bytes(b"the user's own picture %d" % i)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert _gen(tmp_path, "--method", "tab3", "-n", "4", fmt="png") == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "not empty" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_outdir_that_is_a_file_exits_2(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        gen.main(["-n", "2", "--outdir", str(f)])
    assert e.value.code == 2 and f.read_text() == "x"


def test_resume_mismatch_message_is_short(tmp_path, capsys):
    assert _gen(tmp_path, "--method", "tab3", "-n", "2") == 0
    assert _gen(tmp_path, "--method", "tab3", "-n", "2", "--nfe", "5") == 2
    err = capsys.readouterr().err
    assert "nfe" in err and "times" in err and len(err) < 800


@pytest.mark.parametrize("argv", [["-n", "0"], ["-n", "x"], ["-n", "3", "--pfdiff", "2"], ["-n", "3", "--format", "gif"],
                                  ["-n", "3", "--batch-size", "-1"], ["-n", "3", "--eta", "nan"], ["-n", "3"]])
def test_bad_arguments_exit_2(argv, tmp_path):
    if argv != ["-n", "3"]:
        argv = argv + ["--outdir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        gen.main(argv)
    assert e.value.code == 2


@pytest.mark.parametrize("extra, msg", [(["--method", "nope"], "unknown"), (["--nfe", "100001"], "absurd"),
                                        (["--method", "rho_heun", "--nfe", "3"], "multiple"),
                                        (["--pfdiff", "9,9", "--method", "ddim"], "pfdiff"),
                                        (["--model", "/nonexistent/dir"], "directory")])
def test_bad_options_exit_2_before_writing(extra, msg, tmp_path, capsys):
    out = tmp_path / "o"
    try:
        code = _gen(out, *extra)
    except SystemExit as e:  # rejected by the argument parser
        code = e.code
    assert code == 2
    assert msg in capsys.readouterr().err.lower()
    assert not out.exists()


# ------------------------------------------------------------------------------------ torchrun
needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.mark.slow
@needs_gloo
def test_two_process_gloo_run_is_bitwise_equal_to_one_process(reference, tmp_path):
    r = _torchrun(tmp_path, *STOCH)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exactly once" in r.stdout
    _assert_same(_load_npz(tmp_path), reference["npz"])
    recs, _ = gen.read_records(str(tmp_path))
    assert {rec["rank"] for rec in recs} == {0, 1} and {rec["world_size"] for rec in recs} == {2}
    for rec in recs:  # rank r took the indices r, r+2, ...
        assert all(i % 2 == rec["rank"] for i in rec["indices"])


@pytest.mark.slow
@needs_gloo
def test_killed_rank_then_resume_gives_every_index_once_and_clean_bits(reference, tmp_path):
    # rank 1 dies abruptly (os._exit) after 2 samples, leaving a partial temp file and unrecorded pngs
    r = _torchrun(tmp_path, "--method", "tab3", fmt="png", batch=2, crash=(2, None))
    assert r.returncode != 0
    ok, msg, _ = gen.verify_outdir(str(tmp_path), 12)
    assert not ok and "missing" in msg
    leftovers = os.listdir(tmp_path)
    assert any(n.startswith(gen.TMP_PREFIX) for n in leftovers)
    # resume with two processes again (another batch size): only the missing indices are made
    done_before = {i for rec in gen.read_records(str(tmp_path))[0] for i in rec["indices"]}
    r = _torchrun(tmp_path, "--method", "tab3", fmt="png", batch=3)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exactly once" in r.stdout
    recs, bad = gen.read_records(str(tmp_path))
    assert not bad
    indices = [i for rec in recs for i in rec["indices"]]
    assert sorted(indices) == list(range(12))  # none missing, none duplicated
    assert {i for rec in recs if rec["batch_size"] == 3 for i in rec["indices"]} == set(range(12)) - done_before
    assert [row["index"] for row in _manifest(tmp_path)] == list(range(12))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(gen.TMP_PREFIX)]
    _assert_same(_load_png_bytes(tmp_path), reference["png"])


@pytest.mark.slow
@needs_gloo
def test_killed_rank_then_single_process_resume_npz(reference, tmp_path):
    r = _torchrun(tmp_path, *STOCH, batch=1, crash=(1, 0))
    assert r.returncode != 0
    assert _gen(tmp_path, *STOCH, batch=4) == 0
    _assert_same(_load_npz(tmp_path), reference["npz"])
    assert [row["index"] for row in _manifest(tmp_path)] == list(range(12))


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(gen, "sample_images", interrupted)
    assert _gen(tmp_path) == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and str(tmp_path) in err
