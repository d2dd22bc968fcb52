"""Learned plans (deis_fast.tuning.plans): the differentiable unroll matches the executor, the fit improves held-out error
on the digits model, the result runs as an ordinary plan, and bad input is refused."""
import pytest
import torch

import deis_fast
from deis_fast import Sampler, build_plan
from deis_fast.zoo.digits import load_digits_model
from deis_fast.tuning.plans import _with, learn_plan, load_plan, save_plan, unroll
from deis_fast.core.adapters import ModelAdapter
from deis_fast.testing import relative_errors

SCHED = deis_fast.VPSchedule.discrete("linear")


@pytest.fixture(scope="module")
def model():
    return load_digits_model(dtype=torch.float64)


def _noise(n, seed):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("method, opts", [("tab3", {"corrector": True}), ("dpmpp2", {}), ("ipndm3", {})])
def test_unroll_with_random_scales_matches_the_executor_on_the_baked_plan(model, method, opts):
    """unroll(scales) and Sampler(plan=_with(plan, scales)) are the same computation (float64, random scales)."""
    plan = build_plan(SCHED, method, 6, "time_quadratic", **opts)
    g = torch.Generator().manual_seed(3)
    cs = [1 + 0.05 * torch.randn(len(op.coefs), generator=g, dtype=torch.float64) for op in plan.combines]
    ts = torch.exp(0.05 * torch.randn(plan.nfe, generator=g, dtype=torch.float64)).clamp(max=1.0)
    x = _noise(8, 1)
    got = unroll(plan, ModelAdapter(model), x, cs, ts, {})
    want = Sampler(model, SCHED, plan=_with(plan, cs, ts), check_finite=False)(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # unit scales: the plan as built
    ones = [torch.ones(len(op.coefs), dtype=torch.float64) for op in plan.combines]
    plain = unroll(plan, ModelAdapter(model), x, ones, torch.ones(plan.nfe, dtype=torch.float64), {})
    torch.testing.assert_close(plain, Sampler(model, SCHED, plan=plan, check_finite=False)(x), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_learned_plan_beats_its_start_on_fresh_noise(model):
    """NFE 4 tab2: a short fit (40 steps) lowers the median error on noises neither the fit nor its validation saw."""
    plan = build_plan(SCHED, "tab2", 4, "time_quadratic")
    z = _noise(96, 11)
    ref = Sampler(model, SCHED, "rho_rk4", 40, "logsnr", check_finite=False)(z)
    lp = learn_plan(model, SCHED, plan, z, ref, iters=40, batch=16, lr=1e-2, check_every=10)
    assert lp.iteration > 0 and lp.validation_error < 0.97 * lp.start_validation_error
    assert lp.plan.method == "learned:tab2" and lp.plan.nfe == 4
    test = _noise(64, 12)
    test_ref = Sampler(model, SCHED, "rho_rk4", 40, "logsnr", check_finite=False)(test)
    before = float(relative_errors(Sampler(model, SCHED, plan=plan)(test), test_ref).median())
    after = float(relative_errors(Sampler(model, SCHED, plan=lp.plan)(test), test_ref).median())
    assert after < 0.9 * before, (before, after)


def test_save_load_round_trip(model, tmp_path):
    plan = build_plan(SCHED, "tab3", 5, "time_quadratic", corrector=True)
    g = torch.Generator().manual_seed(5)
    plan = _with(plan, [1 + 0.1 * torch.rand(len(op.coefs), generator=g, dtype=torch.float64) for op in plan.combines],
                 torch.full((plan.nfe,), 0.97, dtype=torch.float64))
    save_plan(plan, tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json") == plan


def test_learn_plan_refuses_bad_input(model):
    plan = build_plan(SCHED, "tab2", 4, "time_quadratic")
    z = _noise(8, 1)
    with pytest.raises(ValueError, match="same shape"):
        learn_plan(model, SCHED, plan, z, z[:4])
    with pytest.raises(ValueError, match="validation_fraction"):
        learn_plan(model, SCHED, plan, z[:1], z[:1])
    with pytest.raises(ValueError, match="lr > 0"):
        learn_plan(model, SCHED, plan, z, z, lr=0.0)
    with pytest.raises(ValueError, match="draws noise"):
        learn_plan(model, SCHED, build_plan(SCHED, "ddim_eta", 4, "time_quadratic", eta=1.0), z, z)


@pytest.mark.slow
def test_shipped_digits_plan_reaches_one_percent_at_nfe7_on_fresh_noise(model):
    """benchmarks/plans: the NFE-7 plan learned for the digits U-Net (Gaussian start to t = 800), on a noise seed
    used neither by its fit nor by the benchmark: about 1 % median error, where tab3 + corrector gives 2 %."""
    from pathlib import Path

    from deis_fast.zoo.digits import load_digits_data
    plan = load_plan(Path(__file__).parents[2] / "benchmarks" / "plans" / "digits_tab3c_nfe7_tskip800.json")
    assert plan.nfe == 7 and plan.times[0] == 800
    z = _noise(64, 31)
    ref = Sampler(model, SCHED, "rho_rk4", 200, "logsnr", check_finite=False)(z)
    x = deis_fast.GaussianStart.from_samples(load_digits_data())(z, SCHED, SCHED.t_max, 800)
    learned = float(relative_errors(Sampler(model, SCHED, plan=plan)(x), ref).median())
    base = build_plan(SCHED, "tab3", 7, "time_quadratic", t_start=800, corrector=True)
    fixed = float(relative_errors(Sampler(model, SCHED, plan=base)(x), ref).median())
    assert learned < 0.0125 and learned < 0.6 * fixed, (learned, fixed)


def test_load_plan_names_a_missing_or_corrupt_file(tmp_path):
    """Issue 33 item 18: load_plan on a missing, non-JSON or non-plan file names the file."""
    from deis_fast.tuning.plans import load_plan
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_plan(missing)
    for name, text in (("junk.json", "{not json"), ("other.json", '{"a": 1}'), ("list.json", "[1, 2]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*save_plan"):
            load_plan(tmp_path / name)
