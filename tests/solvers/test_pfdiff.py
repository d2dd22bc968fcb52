"""PFDiff-k_h as a plan transformer: NFE accounting, exactness, an independent transcription, guidance."""
import numpy as np
import pytest
import torch

import deis_fast
from deis_fast.core.plan import Combine

VP = deis_fast.VPSchedule.discrete("linear")
KH = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]


@pytest.mark.parametrize("kh", KH)
@pytest.mark.parametrize("base", ["ddim", "dpmpp1", "ddim_eta"])
def test_plan_has_exactly_n_evals(kh, base):
    for n in range(1, 13):
        plan = deis_fast.build_plan(VP, base, n, "time_uniform", pfdiff=kh)
        assert plan.nfe == n
        assert len(plan.times) - 1 == n * (kh[0] + 1) - kh[0]
        assert isinstance(plan.ops[-1], Combine) and plan.ops[-1].dst == 0


def test_preset_name_is_pfdiff_21_on_ddim():
    a = deis_fast.build_plan(VP, "pfdiff", 6, "time_quadratic")
    b = deis_fast.build_plan(VP, "ddim", 6, "time_quadratic", pfdiff=(2, 1))
    assert a.ops == b.ops and a.method.startswith("pfdiff21")
    assert "pfdiff" in deis_fast.METHODS


@pytest.mark.parametrize("kh", KH)
@pytest.mark.parametrize("base,kw", [("ddim", {}), ("ddim_eta", {"eta": 0.0}), ("rho_euler", {})])
def test_constant_model_is_one_ddim_jump(kh, base, kw):
    c = torch.randn(3, 5, dtype=torch.float64)
    x0 = torch.randn(3, 5, dtype=torch.float64)
    x = deis_fast.sample(lambda x, t: c.clone(), x0, schedule=VP, method=base, nfe=5, grid="logsnr", pfdiff=kh, **kw)
    jump = deis_fast.sample(lambda x, t: c.clone(), x0, schedule=VP, method="ddim", nfe=None, grid=[999.0, 0.0])
    torch.testing.assert_close(x, jump, rtol=1e-12, atol=1e-12)


def _transcription(x0, mu, s, t, k, h, n):
    """DESIGN §2 PFDiff-k_h on DDIM, written out directly in float64 numpy for a 1-D Gaussian N(mu, s^2)."""
    alpha, rho = VP.alpha(t), VP.rho(t)

    def eps(x, i):
        xh = x / alpha[i]
        return (xh - mu) * rho[i] / (s * s + rho[i] ** 2)

    def phi(e, x, a, b):
        return alpha[b] * (x / alpha[a] + (rho[b] - rho[a]) * e)

    q = eps(x0, 0)
    x = phi(q, x0, 0, 1)
    i = 1
    nfe = 1
    while i < len(t) - 1:
        xs = phi(q, x, i, i + h)
        f = eps(xs, i + h)
        nfe += 1
        x = phi(f, x, i, i + k + 1)
        q = f
        i += k + 1
    assert nfe == n
    return x


@pytest.mark.parametrize("kh", KH)
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_matches_direct_transcription_on_1d_gaussian(kh, n):
    k, h = kh
    mu, s = 0.7, 0.4
    x0 = torch.randn(64, 1, generator=torch.Generator().manual_seed(n), dtype=torch.float64)

    def model(x, t):
        tt = t.numpy()
        a = torch.as_tensor(VP.alpha(tt)).reshape(-1, 1)
        r = torch.as_tensor(VP.rho(tt)).reshape(-1, 1)
        return (x / a - mu) * r / (s * s + r * r)
    x = deis_fast.sample(model, x0, schedule=VP, method="ddim", nfe=n, grid="time_quadratic", pfdiff=kh)
    t = deis_fast.make_grid(VP, "time_quadratic", n * (k + 1) - k)
    ref = _transcription(x0.numpy(), mu, s, t, k, h, n)
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method,nfe,kw,match", [
    ("ddim", 5, {"pfdiff": (4, 1)}, "k must be"),
    ("ddim", 5, {"pfdiff": (2, 3)}, "h must satisfy"),
    ("ddim", 5, {"pfdiff": (2, 0)}, "h must satisfy"),
    ("tab3", 5, {"pfdiff": (2, 1)}, "first-order base"),
    ("rho_heun", 6, {"pfdiff": (2, 1)}, "first-order base"),
    ("ddim", 0, {"pfdiff": (2, 1)}, "nfe >= 1"),
    ("ddim", 400, {"pfdiff": (3, 1), "integer_timesteps": True}, "integer timesteps"),
    ("ddim", 5, {"pfdiff": "2,1"}, "pair"),
])
def test_bad_input_errors(method, nfe, kw, match):
    with pytest.raises(ValueError, match=match):
        deis_fast.build_plan(VP, method, nfe, **kw)


def test_experimental_multistep_base_keeps_nfe_and_is_exact_for_constant_output():
    c = torch.randn(2, 3, dtype=torch.float64)
    x0 = torch.randn(2, 3, dtype=torch.float64)
    jump = deis_fast.sample(lambda x, t: c.clone(), x0, schedule=VP, method="ddim", nfe=None, grid=[999.0, 0.0])
    for base in ["tab2", "tab3", "rhoab3", "ipndm4"]:
        plan = deis_fast.build_plan(VP, base, 7, pfdiff=(2, 1), pfdiff_experimental=True)
        assert plan.nfe == 7
        x = deis_fast.sample(lambda x, t: c.clone(), x0, schedule=VP, method=base, nfe=7, pfdiff=(2, 1),
                             pfdiff_experimental=True)
        torch.testing.assert_close(x, jump, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("base", ["ddim", "dpmpp1"])
def test_classifier_free_guidance_buffers_the_guided_output(base, small_noise):
    from deis_fast.testing import GaussianMixture
    cm, um = GaussianMixture.random(4, 8, 0.5, seed=1).model(VP), GaussianMixture.random(4, 8, 0.5, seed=2).model(VP)
    w = 4.0
    n = small_noise.shape[0]

    def model(x, t, y):
        return torch.where(y.reshape(-1, 1) > 0, cm(x, t), um(x, t))

    def guided_exact(x, t):
        u = um(x, t)
        return u + w * (cm(x, t) - u)
    x = deis_fast.sample(model, small_noise, schedule=VP, method=base, nfe=6, pfdiff=(2, 1), guidance_scale=w,
                         uncond={"y": torch.zeros(n)}, model_kwargs={"y": torch.ones(n)})
    ref = deis_fast.sample(guided_exact, small_noise, schedule=VP, method=base, nfe=6, pfdiff=(2, 1))
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def yardstick():
    from deis_fast.testing import yardstick_problem
    return yardstick_problem()


@pytest.mark.slow
def test_pfdiff21_beats_ddim_on_yardstick_at_low_nfe(yardstick):
    from deis_fast.testing import relative_errors
    mix, sched, noise, ref = yardstick
    model = mix.model(sched)
    for n in (4, 5, 6):
        d = relative_errors(deis_fast.sample(model, noise, schedule=sched, method="ddim", nfe=n,
                                             grid="time_quadratic"), ref).median()
        p = relative_errors(deis_fast.sample(model, noise, schedule=sched, method="pfdiff", nfe=n,
                                             grid="time_quadratic"), ref).median()
        assert p < d, (n, float(p), float(d))
    p5 = relative_errors(deis_fast.sample(model, noise, schedule=sched, method="pfdiff", nfe=5,
                                          grid="time_quadratic"), ref).median()
    assert float(p5) == pytest.approx(0.0145, rel=0.1), "DESIGN §7 reference value"
