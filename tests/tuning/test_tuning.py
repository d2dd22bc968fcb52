"""Tuning: tune() never worse than untuned on its held-out set, the tuned file round-trips and refuses another
schedule / method / NFE / prediction, warns on another guidance scale / resolution, and refuses corrupt files."""
import json
import warnings

import pytest
import torch

import deis_fast
from deis_fast import tuning
from deis_fast.testing import GaussianMixture, relative_errors

VP = deis_fast.VPSchedule.discrete("linear")


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(8, 16, 0.3, seed=11)


@pytest.fixture(scope="module")
def tuned(mixture, tmp_path_factory):
    cache = tmp_path_factory.mktemp("refcache")
    t = tuning.tune(mixture.model(VP), VP, "ipndm4", 5, shape=(16,), calibration=24, held_out=12, time_budget=4,
                    reference_nfe=100, cache_dir=cache, cache_key="mix11", guidance_scale=3.0, resolution=(8, 8))
    return t, cache


def test_tune_beats_untuned_on_held_out_and_round_trips(tuned, tmp_path, mixture):
    t, _ = tuned
    e = t.errors
    assert t.kind == "grid" and e["held_out_tuned"] < e["held_out_untuned"]
    assert t.schedule_fingerprint == deis_fast.schedule_fingerprint(VP) and t.nfe == 5 and t.method == "ipndm4"
    path = tmp_path / "t.json"
    t.save(path)
    back = tuning.load_tuned(path)
    assert back.grid == t.grid and back.errors == t.errors and back.deis_fast_version == deis_fast.__version__
    plan = back.make_plan(VP)
    assert plan.nfe == 5 and plan.times == tuple(t.grid)
    # the loaded plan reproduces the held-out error the file reports
    z = deis_fast.randn_per_sample((12, 16), range(24, 36), dtype=torch.float64)
    ref = deis_fast.Sampler(mixture.model(VP), VP, "rho_rk4", 100, "logsnr")(z)
    x = deis_fast.Sampler(mixture.model(VP), VP, plan=plan)(z)
    assert float(relative_errors(x, ref).median()) == pytest.approx(e["held_out_tuned"], rel=1e-4)


def test_reference_cache_is_reused(tuned, mixture):
    t, cache = tuned
    files = list(cache.glob("reference-*.safetensors"))
    assert len(files) == 1
    calls = [0]
    base = mixture.model(VP)

    def counting(x, tt, **kw):
        calls[0] += 1
        return base(x, tt, **kw)
    z = deis_fast.randn_per_sample((36, 16), range(36))   # what tune drew (float32 for a plain callable)
    # the same noise under the same key: read from the cache, no model call; without the key: computed
    ref = tuning.reference_solutions(counting, VP, z, nfe=100, cache_dir=cache, cache_key="mix11")
    assert calls[0] == 0
    ref2 = tuning.reference_solutions(counting, VP, z, nfe=100, cache_dir=cache)
    assert calls[0] == 100 and torch.allclose(ref, ref2)
    assert len(list(cache.glob("reference-*.safetensors"))) == 1   # a plain function without a key is not cached


def test_mismatches_are_refused_and_soft_ones_warn(tuned):
    t, _ = tuned
    with pytest.raises(tuning.TunedMismatchError, match="schedule"):
        t.check(schedule=deis_fast.VPSchedule.discrete("scaled_linear"))
    with pytest.raises(tuning.TunedMismatchError, match="NFE 5, not 7"):
        t.check(schedule=VP, nfe=7)
    with pytest.raises(tuning.TunedMismatchError, match="method 'ipndm4', not 'tab3'"):
        t.check(method="tab3")
    with pytest.raises(tuning.TunedMismatchError, match="predicting"):
        t.check(prediction="v")
    with pytest.warns(UserWarning, match="guidance scale 3"):
        t.check(guidance_scale=7.5)
    with pytest.warns(UserWarning, match="resolution"):
        t.check(resolution=(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.check(schedule=VP, method="ipndm4", nfe=5, guidance_scale=3.0, resolution=[8, 8], prediction="epsilon")
    with pytest.raises(tuning.TunedMismatchError, match="schedule"):
        tuning.tuned_plan(t, deis_fast.FlowSchedule())


def _write(path, d):
    path.write_text(json.dumps(d))
    return path


def test_corrupt_or_edited_files_are_refused(tuned, tmp_path):
    t, _ = tuned
    good = t.to_json()
    edited = json.loads(json.dumps(good))
    edited["payload"]["grid"][2] *= 1.01                        # a hand edit: the checksum no longer matches
    with pytest.raises(tuning.TunedFileError, match="checksum"):
        tuning.load_tuned(_write(tmp_path / "a.json", edited))
    schema = json.loads(json.dumps(good))
    schema["payload"]["nfe"] = "5"                              # consistent checksum, wrong schema
    schema["checksum"] = tuning.files._checksum(schema["payload"])
    with pytest.raises(tuning.TunedFileError, match="'nfe' has type str"):
        tuning.load_tuned(_write(tmp_path / "b.json", schema))
    order = json.loads(json.dumps(good))
    order["payload"]["grid"] = order["payload"]["grid"][::-1]
    order["checksum"] = tuning.files._checksum(order["payload"])
    with pytest.raises(tuning.TunedFileError, match="decreasing"):
        tuning.load_tuned(_write(tmp_path / "c.json", order))
    (tmp_path / "d.json").write_text(json.dumps(good)[:-40])
    with pytest.raises(tuning.TunedFileError, match="cannot read"):
        tuning.load_tuned(tmp_path / "d.json")
    with pytest.raises(tuning.TunedFileError, match="format"):
        tuning.load_tuned(_write(tmp_path / "e.json", {"grid": [1.0, 0.0]}))
    with pytest.raises(tuning.TunedFileError, match="does not exist"):
        tuning.load_tuned(tmp_path / "missing.json")


def test_never_worse_than_untuned(mixture, monkeypatch):
    """A fit that does worse on the held-out set (here: a deliberately bad grid) is not returned."""
    import deis_fast.tuning.grids as go
    real = go.optimize_grid

    def bad(*a, **k):
        g = real(*a, **dict(k, time_budget=0.5))
        g.times = [999.0, 998.0, 997.0, 996.0, 995.0, 0.0]
        return g
    monkeypatch.setattr(go, "optimize_grid", bad)
    t = tuning.tune(mixture.model(VP), VP, "tab3", 5, shape=(16,), calibration=8, held_out=4, reference_nfe=40)
    assert t.kind == "untuned" and t.errors["held_out_tuned"] == t.errors["held_out_untuned"]
    assert t.make_plan(VP).times == deis_fast.build_plan(VP, "tab3", 5).times


def test_plan_fit_with_checkpointing_and_a_plain_memory_message(mixture, monkeypatch, tmp_path):
    t = tuning.tune(mixture.model(VP), VP, "tab3", 5, shape=(16,), calibration=16, held_out=8, time_budget=2,
                    reference_nfe=40, plan=True, plan_iters=30, checkpoint=True)
    assert t.errors["held_out_plan"] is not None and t.errors["held_out_tuned"] <= t.errors["held_out_untuned"]
    t.save(tmp_path / "p.json")
    back = tuning.load_tuned(tmp_path / "p.json")
    assert back.kind == t.kind and (back.plan is None) == (t.plan is None)
    if back.plan is not None:
        assert back.plan == t.plan

    import deis_fast.tuning.plans as lm

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB")
    monkeypatch.setattr(lm, "learn_plan", oom)
    with pytest.raises(MemoryError, match="checkpoint=True"):
        tuning.tune(mixture.model(VP), VP, "tab3", 5, shape=(16,), calibration=8, held_out=4, time_budget=0.5,
                    reference_nfe=40, plan=True)


def test_k_diffusion_sampler_loads_a_tuned_file(mixture, tmp_path):
    from deis_fast.integrations import k_diffusion as dk
    ve = deis_fast.VESchedule(0.002, 80.0)
    denoiser = mixture.model(ve, "x0")            # k-diffusion's view: model(x, sigma) -> x0
    t = tuning.tune(denoiser, ve, "ipndm4", 5, prediction="x0", shape=(16,), calibration=16, held_out=8,
                    time_budget=3, reference_nfe=80)
    path = tmp_path / "ve.json"
    t.save(path)
    sigmas = dk.get_sigmas_karras(5, 0.002, 80.0)   # float32, as k-diffusion makes them
    x = deis_fast.randn_per_sample((8, 16), range(500, 508), dtype=torch.float64) * 80.0
    seen = []
    out = dk.sample_deis_fast(denoiser, x, sigmas, method="ipndm4", tuned=str(path),
                              callback=lambda d: seen.append(d["sigma"]))
    same = deis_fast.Sampler(denoiser, ve, plan=t.make_plan(ve), prediction="x0")(x)
    assert torch.allclose(out, same, rtol=1e-12, atol=1e-12) and seen == pytest.approx(t.grid[:-1])
    # without method= the file's own method runs (the default, tab3, would be refused for this ipndm4 file)
    assert torch.equal(dk.sample_deis_fast(denoiser, x, sigmas, tuned=str(path)), out)
    with pytest.raises(tuning.TunedMismatchError, match="method"):
        dk.sample_deis_fast(denoiser, x, sigmas, method="tab3", tuned=str(path))
    with pytest.raises(tuning.TunedMismatchError, match="schedule"):
        dk.sample_deis_fast(denoiser, x, dk.get_sigmas_karras(5, 0.002, 14.6), method="ipndm4", tuned=str(path))
    with pytest.raises(tuning.TunedMismatchError, match="NFE 5, not 7"):
        dk.sample_deis_fast(denoiser, x, dk.get_sigmas_karras(7, 0.002, 80.0), method="ipndm4", tuned=str(path))


def test_method_search_picks_on_calibration_and_loads_without_a_method(tuned, mixture, tmp_path):
    """tune(method=None) tries AUTO_METHODS, chooses on the calibration noises, guards against the untuned default
    (tab3 on its grid) on the held-out ones; the file loads through Sampler and the scheduler without method=."""
    from deis_fast.integrations.diffusers import DEISFastScheduler
    _, cache = tuned
    model = mixture.model(VP)
    t = tuning.tune(model, VP, None, 5, shape=(16,), calibration=24, held_out=12, time_budget=4, reference_nfe=100,
                    cache_dir=cache, cache_key="mix11")
    cands = t.meta["candidates"]
    assert [c["method"] for c in cands] == list(tuning.AUTO_METHODS)
    assert t.meta["chosen"] == min(cands, key=lambda c: c["calibration_error"])["method"]
    e = t.errors
    assert e["held_out_tuned"] <= e["held_out_untuned"]
    assert e["held_out_untuned"] == pytest.approx(tuning.tune(model, VP, "tab3", 5, shape=(16,), calibration=24,
                                                              held_out=12, time_budget=0.2, reference_nfe=100,
                                                              cache_dir=cache, cache_key="mix11")
                                                  .errors["held_out_untuned"])
    if t.kind == "grid":   # the file records the chosen method and its options
        assert tuning.files._label(t.method, t.options) == t.meta["chosen"]
    path = tmp_path / "auto.json"
    t.save(path)
    back = tuning.load_tuned(path)
    x0 = torch.randn(12, 16, generator=torch.Generator().manual_seed(5))
    plan = back.make_plan(VP)
    x = deis_fast.Sampler(model, VP, plan=plan, check_finite=False)(x0)
    assert torch.isfinite(x).all() and plan.times == tuple(t.grid)
    for sch in (DEISFastScheduler(tuned=str(path)),
                DEISFastScheduler.from_config(DEISFastScheduler().config, tuned=str(path))):
        assert sch.config.method == t.method
        sch.set_timesteps(5)
        assert sch.plan.times == plan.times and sch.plan == plan
    with pytest.raises(tuning.TunedMismatchError, match=f"for method '{t.method}', not 'ipndm4'"):
        DEISFastScheduler(method="ipndm4", tuned=str(path))
    with pytest.raises(tuning.TunedMismatchError, match="not 'ipndm4'"):
        DEISFastScheduler.from_config(DEISFastScheduler().config, method="ipndm4", tuned=str(path))
    with pytest.raises(ValueError, match="need a method"):
        tuning.tune(model, VP, None, 5, shape=(16,), corrector=True)


def test_k_diffusion_sampler_loads_a_vp_tuned_file_with_the_models_schedule(tuned, mixture, tmp_path):
    """A file tuned on a VP model (its own eps, ``tune(model, VP)``) loads through the k-diffusion path with
    ``schedule=`` the model's VP schedule (ComfyUI's convention) and runs the tuned plan exactly."""
    from deis_fast.integrations import k_diffusion as dk
    t, _ = tuned
    path = tmp_path / "vp.json"
    t.save(path)

    def denoiser(x, sigma, **_):                   # the k-diffusion view: x = x0 + sigma eps -> x0
        return mixture.predict(x, 1.0, sigma.double())[1].to(x.dtype)
    smax = float(VP.rho(VP.t_max))
    z = deis_fast.randn_per_sample((8, 16), range(500, 508), dtype=torch.float64)
    seen = []
    sigmas = dk.get_sigmas_karras(5, 0.03, smax, dtype=torch.float64)   # only its ends and its steps matter
    out = dk.sample_deis_fast(denoiser, z * (1 + smax ** 2) ** 0.5, sigmas, method="ipndm4", schedule=VP,
                              tuned=str(path), callback=lambda d: seen.append(d["sigma"]))
    same = deis_fast.Sampler(mixture.model(VP), VP, plan=t.make_plan(VP), time_dtype=torch.float64)(z)
    # k-diffusion's x is x_vp / alpha
    assert torch.allclose(out * float(VP.alpha(t.grid[-1])), same, rtol=1e-10, atol=1e-10)
    assert seen == pytest.approx([float(VP.rho(g)) for g in t.grid[:-1]], rel=1e-12)
    with pytest.raises(tuning.TunedMismatchError, match="NFE 5, not 7"):
        dk.sample_deis_fast(denoiser, z, dk.get_sigmas_karras(7, 0.03, smax), method="ipndm4", schedule=VP,
                            tuned=str(path))
    sl = deis_fast.VPSchedule.discrete("scaled_linear")
    with pytest.raises(tuning.TunedMismatchError, match="schedule"):
        dk.sample_deis_fast(denoiser, z, dk.get_sigmas_karras(5, 0.03, float(sl.rho(sl.t_max))), method="ipndm4",
                            schedule=sl, tuned=str(path))
    with pytest.raises(tuning.TunedMismatchError, match="whole grid"):   # denoise < 1: starts below the plan
        dk.sample_deis_fast(denoiser, z, dk.get_sigmas_karras(5, 0.03, 20.0), method="ipndm4", schedule=VP,
                            tuned=str(path))


def _active_bars():
    from tqdm import tqdm as std_tqdm
    return [b for b in list(std_tqdm._instances) if not b.disable]


def test_reference_bar_moves_inside_a_batch(mixture):
    """Issue 33 item 5: the reference bar counts network calls, so it moves during the first batch (it sat at 0/96
    for minutes: it counted finished batches of samples)."""
    seen = []
    base = mixture.model(VP)

    def model(x, t, **kw):
        seen.append([(b.n, b.total, b.desc) for b in _active_bars()])
        return base(x, t, **kw)
    noise = torch.randn(10, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tuning.reference_solutions(model, VP, noise, nfe=40, batch=8, progress=True)
    bars = [s[0] for s in seen if s]
    assert len(bars) == len(seen) == 80 and "10 samples" in bars[0][2]   # two batches of 40 calls
    assert bars[20][0] == 21 and bars[-1] == (80, 80, bars[0][2])        # inside the first batch: 21 calls counted


def test_learn_plan_shows_progress(mixture, capsys):
    """Issue 33 item 7: learn_plan with progress=True (and tune(plan=True, progress=True)) shows a bar over its Adam
    steps on stderr, from the first step (it printed nothing for minutes)."""
    from deis_fast.tuning.plans import learn_plan
    model = mixture.model(VP)
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = tuning.reference_solutions(model, VP, noise, nfe=40)
    steps = []

    def counting(x, t, **kw):
        steps.extend(b.n for b in _active_bars() if b.desc.startswith("learn_plan"))
        return model(x, t, **kw)
    learn_plan(counting, VP, deis_fast.build_plan(VP, "tab3", 4), noise, ref, iters=6, batch=4, check_every=3,
               progress=True)
    assert steps and steps[0] == 0 and max(steps) == 5      # the bar was up during the fit and moved every step
    err = capsys.readouterr().err
    assert "learn_plan tab3" in err and "6/6" in err and "best validation" in err


@pytest.mark.parametrize("case", ["flow const", "vp eps"])
def test_k_diffusion_runs_a_learned_plan_with_moved_network_times_as_tuned(mixture, tmp_path, case):
    """A learned plan moves its network times off its solver times (learn_plan's learn_times); its output was
    converted to the solver's target at the solver's time when it was fitted. A k-diffusion denoiser (ComfyUI's
    nodes) runs the network at the moved time too: its x0 is converted back to the file's prediction there, so the
    k-diffusion run equals deis_fast.Sampler with the file's plan and prediction."""
    import dataclasses
    from deis_fast.core.plan import Eval
    from deis_fast.integrations import k_diffusion as dk
    if case == "flow const":
        sched, pred, method = deis_fast.FlowSchedule(3.0, time_scale=1.0), "flow", "rhoabm2"
        denoiser = mixture.model(sched, "x0")                 # ComfyUI's CONST view: sigma = t
        to_sig = lambda t: t                                 # noqa: E731
        scale = 1.0
        kw = {"model_type": "const", "schedule": sched}
    else:
        sched, pred, method = VP, "eps", "tab3"
        ve = mixture.model(sched, "x0")
        # k-diffusion's VE view of the VP model: x_ve = x_vp / alpha, sigma = rho
        denoiser = lambda x, s: ve(x / (1 + s.double().reshape(-1, 1) ** 2).sqrt(),   # noqa: E731
                                   torch.as_tensor(sched.model_time(sched.t_from_rho(s.double().numpy()))))
        to_sig = lambda t: float(sched.rho(t))               # noqa: E731
        scale = None
        kw = {"schedule": sched}
    plan = deis_fast.build_plan(sched, method, 6, grid="time_uniform" if pred == "flow" else "time_quadratic")
    k = iter([0.97, 1.02, 0.99, 1.01, 0.98, 1.0])
    moved = tuple(dataclasses.replace(op, model_t=op.model_t * next(k)) if isinstance(op, Eval) and op.index > 0
                  else op for op in plan.ops)
    plan = dataclasses.replace(plan, ops=moved, method="learned:" + method)
    t = tuning.Tuned(method=method, nfe=6, grid=[float(v) for v in plan.times], kind="plan", plan=plan,
                     schedule_fingerprint=deis_fast.schedule_fingerprint(sched), prediction=pred, schedule=repr(sched))
    path = tmp_path / "learned.json"
    t.save(path)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sig = torch.tensor([to_sig(v) for v in plan.times] + ([] if plan.times[-1] == 0 else [0.0]), dtype=torch.float64)
    x_kd = x if scale is not None else x * float(sig[0])
    out = dk.sample_deis_fast(denoiser, x_kd, sig, tuned=str(path), **kw)
    want = deis_fast.Sampler(mixture.model(sched, pred), sched, plan=tuning.load_tuned(path).make_plan(sched),
                             prediction=pred)(x if scale is not None else x_kd * float(sched.alpha(plan.times[0])))
    if scale is None:
        want = want / float(sched.alpha(plan.times[-1]))
    assert torch.allclose(out, want, rtol=1e-9, atol=1e-9), float((out - want).abs().max())
