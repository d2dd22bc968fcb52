import numpy as np
import pytest
import torch
from _inputs import FUZZ, assert_ok_or_documented, eps_model, make_noise
from hypothesis import given
from hypothesis import strategies as st

import deis_fast
from deis_fast.core.schedules import VESchedule, VPSchedule, schedule_from_diffusers_config

ALL = [VPSchedule.discrete("linear"), VPSchedule.discrete("scaled_linear"), VPSchedule.discrete("squaredcos_cap_v2"),
       VPSchedule.linear(), VPSchedule.cosine(), VESchedule(0.002, 80.0), VESchedule.smld(0.01, 50.0)]


@pytest.mark.parametrize("s", ALL, ids=repr)
def test_inverses_round_trip(s):
    t = np.linspace(s.t_min, s.t_max, 101)
    np.testing.assert_allclose(s.t_from_rho(s.rho(t)), t, rtol=1e-9, atol=1e-9 * s.t_max)
    np.testing.assert_allclose(s.t_from_lambda(s.lam(t)), t, rtol=1e-9, atol=1e-9 * s.t_max)
    np.testing.assert_allclose(s.rho(t), s.sigma(t) / s.alpha(t), rtol=1e-12)
    np.testing.assert_allclose(s.t_from_model_time(s.model_time(t)), t, rtol=1e-9, atol=1e-12)
    assert np.all(np.diff(s.rho(t)) > 0), "rho must increase with t"
    if s.variance_preserving:
        np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, rtol=1e-12)


@pytest.mark.parametrize("s", [x for x in ALL if x.variance_preserving], ids=repr)
def test_rho_zero_end_is_exactly_zero_not_nan(s):
    # inverting rho = 0 may land a rounding error past alpha = 1 (log alpha = +1e-20 with numpy 2.4); that is
    # the denoised endpoint, rho = sigma = 0; a point really past it stays NaN
    t0 = s.t_from_rho(np.array([0.0]))
    assert 0.0 <= s.rho(t0)[0] < 1e-9 and 0.0 <= s.sigma(t0)[0] < 1e-9
    if s.kind == "discrete":  # extrapolated linearly in log alpha: far past the end alpha > 1
        with np.errstate(invalid="ignore"):
            assert np.isnan(s.rho(np.array([t0[0] - 0.5 * (s.t_max - s.t_min)]))[0])


@pytest.mark.parametrize("preset", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_matches_diffusers_alphas_cumprod(preset):
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if preset == "scaled_linear" else {}
    d = diffusers.DDPMScheduler(beta_schedule=preset, **kw)
    s = VPSchedule.discrete(preset)
    np.testing.assert_allclose(s.alpha(np.arange(1000.0)) ** 2, d.alphas_cumprod.double().numpy(), rtol=2e-5)
    s2 = schedule_from_diffusers_config(d.config)
    np.testing.assert_allclose(s2.alphas_cumprod, s.alphas_cumprod, rtol=1e-6)


def test_discrete_interpolates_log_alpha_linearly():
    s = VPSchedule.discrete("linear")
    la = s.log_alpha(np.array([10.0, 11.0, 10.25]))
    assert la[2] == pytest.approx(0.75 * la[0] + 0.25 * la[1], rel=1e-14)
    assert s.model_time(412.37) == pytest.approx(412.37)


def test_continuous_linear_closed_form():
    s = VPSchedule.linear()
    t = 0.37
    assert s.alpha(t) == pytest.approx(np.exp(-0.25 * t * t * 19.9 - 0.5 * t * 0.1), rel=1e-14)


def test_ve_edm_time_is_sigma():
    s = VESchedule(0.002, 80.0)
    assert float(s.rho(3.5)) == 3.5 and float(s.alpha(3.5)) == 1.0 and float(s.model_time(3.5)) == 3.5


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        VPSchedule.discrete("nope")
    with pytest.raises(ValueError, match="betas"):
        VPSchedule.from_betas([0.1, 1.5])
    with pytest.raises(ValueError, match="sigma_min"):
        VESchedule(5.0, 1.0)


def test_public_api_names():
    s = deis_fast.VPSchedule.discrete("linear")
    assert s.t_min == 0.0 and s.t_max == 999.0
    assert {"tab3", "deis", "ddim", "logrho3", "dpmpp2", "ipndm_v", "rho_rk4", "ddim_eta"} <= set(deis_fast.METHODS)


# ---------------------------------------------------------------- fuzzing
floats_any = st.floats(allow_nan=True, allow_infinity=True)


@FUZZ
@given(kind=st.sampled_from(["betas", "alphas_cumprod", "ve", "ve_geo", "linear", "cosine", "preset"]),
       values=st.lists(st.one_of(st.floats(-0.5, 1.5), floats_any, st.floats(1e-6, 0.05)), min_size=0, max_size=40),
       a=st.one_of(floats_any, st.floats(0, 100)), b=st.one_of(floats_any, st.floats(0, 100)),
       n=st.integers(-2, 50), preset=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "nope"]),
       method=st.sampled_from(["ddim", "tab3", "dpmpp2", "rho_heun", "ddim_eta"]), nfe=st.integers(1, 8),
       grid=st.sampled_from(deis_fast.GRIDS))
def test_fuzz_schedules(kind, values, a, b, n, preset, method, nfe, grid):
    V, E = deis_fast.VPSchedule, deis_fast.VESchedule

    def make():
        if kind == "betas":
            return V.from_betas(values)
        if kind == "alphas_cumprod":
            return V.from_alphas_cumprod(values)
        if kind == "ve":
            return E(a, b)
        if kind == "ve_geo":
            return E.smld(a, b)
        if kind == "linear":
            return V.linear(beta_min=a, beta_max=b)
        if kind == "cosine":
            return V.cosine(s=min(a, 1.0) if a == a else a)
        return V.discrete(preset, n)

    sched = assert_ok_or_documented(make)
    if sched is None:
        return

    def use():
        plan = deis_fast.build_plan(sched, method, nfe if method != "rho_heun" else 2 * nfe, grid)
        assert np.all(np.isfinite(np.asarray(plan.times, dtype=np.float64)))
        # degenerate-but-valid schedules (e.g. beta_max=1e-300) can give non-finite coefficients; running such
        # a plan must then fail with a documented error (combine rejects non-finite coefficients)
        x = deis_fast.Sampler(eps_model, sched, method, plan=plan)(make_noise((2, 3), dtype=torch.float64),
                                                                   generator=torch.Generator().manual_seed(0))
        return x

    assert_ok_or_documented(use)
