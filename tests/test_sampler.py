"""Public API behaviour: plans, NFE accounting, model adapters, guidance, noise, and errors users can act on."""
import json
import math

import numpy as np
import pytest
import torch
from _inputs import DOCUMENTED, FUZZ, assert_ok_or_documented, eps_model, make_noise
from hypothesis import given
from hypothesis import strategies as st

import deis_fast
from deis_fast import NonFiniteError
from deis_fast.core.plan import Combine, Eval
from deis_fast.core.schedules import VESchedule, VPSchedule
from deis_fast.solvers import METHOD_SPECS

VP = VPSchedule.discrete("linear")


def _eps_model(x, t):
    return 0.5 * x + 0.01 * t.reshape(-1, *([1] * (x.ndim - 1))) / 1000


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_every_method_builds_a_plan_with_the_requested_nfe(method):
    spec = METHOD_SPECS[method]
    nfe = 4 * spec.stages
    plan = deis_fast.build_plan(VP, method, nfe)
    assert plan.nfe == nfe
    assert plan.max_arity <= 6
    evals_dst = {op.dst for op in plan.ops if isinstance(op, Eval)}
    combine_dst = {op.dst for op in plan.ops if isinstance(op, Combine)}
    if not method.startswith("rhoabm"):   # eps-form correctors refresh eps_j in its Eval slot (as tab3 corrector=True)
        assert not evals_dst & combine_dst, "Eval outputs and Combine destinations must use distinct slots"
    assert isinstance(plan.ops[-1], Combine) and plan.ops[-1].dst == 0
    text = repr(plan)
    assert f"nfe={nfe}" in text and "Eval" in text and "Combine" in text


def test_plan_repr_is_readable():
    text = repr(deis_fast.build_plan(VP, "tab2", 3, "time_uniform"))
    assert text.splitlines()[0].startswith("Plan('tab2', nfe=3")
    assert "eps(x, t=999)" in text


def test_aliases_and_equivalent_methods_agree(small_mixture, small_noise):
    m = small_mixture.model(VP)
    outs = {name: deis_fast.sample(m, small_noise, schedule=VP, method=name, nfe=8, grid="logsnr")
            for name in ["ddim", "tab0", "rhoab0", "ipndm1", "logrho1", "dpmpp1", "rho_euler"]}
    for name, x in outs.items():
        torch.testing.assert_close(x, outs["ddim"], rtol=1e-10, atol=1e-10, msg=name)
    a = deis_fast.sample(m, small_noise, schedule=VP, method="deis", nfe=8)
    b = deis_fast.sample(m, small_noise, schedule=VP, method="tab3", nfe=8)
    assert torch.equal(a, b)


@pytest.mark.parametrize("schedule", [VP, VPSchedule.cosine()], ids=repr)
@pytest.mark.parametrize("method", ["tab3", "dpmpp3", "rho_heun"])
def test_prediction_types_give_the_same_samples(schedule, method, small_mixture, small_noise):
    # float64 time input: near the cosine schedule's end d(log alpha)/dt ~ -185, so a float32 t alone
    # moves x0 <-> eps conversions by ~1e-5
    outs = [deis_fast.sample(small_mixture.model(schedule, p), small_noise, schedule=schedule, method=method, nfe=8,
                             prediction=p, time_dtype=torch.float64) for p in ["eps", "x0", "v", "score"]]
    for x in outs[1:]:
        torch.testing.assert_close(x, outs[0], rtol=1e-8, atol=1e-8)


def test_diffusers_prediction_names_accepted(small_mixture, small_noise):
    a = deis_fast.sample(small_mixture.model(VP, "x0"), small_noise, schedule=VP, prediction="sample", nfe=5,
                         time_dtype=torch.float64)
    b = deis_fast.sample(small_mixture.model(VP, "v"), small_noise, schedule=VP, prediction="v_prediction", nfe=5,
                         time_dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_classifier_free_guidance_is_the_guided_combination(small_noise):
    from deis_fast.testing import GaussianMixture
    cond_mix, uncond_mix = GaussianMixture.random(4, 8, 0.5, seed=1), GaussianMixture.random(4, 8, 0.5, seed=2)
    mc, mu = cond_mix.model(VP), uncond_mix.model(VP)
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return torch.where(y.reshape(-1, 1) > 0, mc(x, t), mu(x, t))

    w = 3.0
    n = small_noise.shape[0]

    def guided(x, t):
        return mu(x, t) + w * (mc(x, t) - mu(x, t))

    for method in ["tab3", "dpmpp2"]:
        calls.clear()
        x = deis_fast.sample(model, small_noise, schedule=VP, method=method, nfe=6, guidance_scale=w,
                             uncond={"y": torch.zeros(n)}, model_kwargs={"y": torch.ones(n)})
        ref = deis_fast.sample(guided, small_noise, schedule=VP, method=method, nfe=6)
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
        assert calls == [2 * n] * 6, "one batched network call per NFE"


def test_classifier_guidance_shifts_eps(small_mixture, small_noise):
    base = small_mixture.model(VP)
    g = torch.randn(small_noise.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scale = 0.7

    def shifted(x, t):
        sig = torch.as_tensor(VP.sigma(t.numpy()), dtype=torch.float64).reshape(-1, 1)
        return base(x, t) - scale * sig * g

    for method in ["tab2", "dpmpp2"]:
        x = deis_fast.sample(base, small_noise, schedule=VP, method=method, nfe=5,
                             classifier_grad=lambda x, t: g, classifier_scale=scale, time_dtype=torch.float64)
        ref = deis_fast.sample(shifted, small_noise, schedule=VP, method=method, nfe=5, time_dtype=torch.float64)
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)


def test_denoiser_adapter_on_ve(small_mixture, small_noise):
    ve = VESchedule(0.02, 20.0)
    x0_model = small_mixture.model(ve, "x0")
    den = deis_fast.denoiser_to_model(lambda x, sigma: x0_model(x, sigma))
    a = deis_fast.sample(den, small_noise * 20, schedule=ve, method="tab2", nfe=6, prediction="x0")
    b = deis_fast.sample(small_mixture.model(ve), small_noise * 20, schedule=ve, method="tab2", nfe=6)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_model_is_called_with_its_own_time_as_float_tensor():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x) + 0.1
    deis_fast.sample(model, torch.randn(3, 2), schedule=VP, method="ddim", nfe=None, grid=[999, 412.37, 0])
    assert seen[0].dtype == torch.float32 and seen[0].shape == (3,)
    assert seen[1][0].item() == pytest.approx(412.37, rel=1e-6)
    seen.clear()
    ve = VESchedule(0.002, 80.0)
    deis_fast.sample(model, torch.randn(3, 2), schedule=ve, method="ddim", nfe=2, grid="karras")
    assert seen[0][0].item() == pytest.approx(80.0)


def test_constant_model_ddim_is_exact_and_multistep_agrees():
    c = torch.randn(4, 3, dtype=torch.float64)

    def model(x, t):
        return c.clone()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    rho = VP.rho(np.array([999.0, 0.0]))
    a = VP.alpha(np.array([999.0, 0.0]))
    exact = a[1] * (x0 / a[0] + (rho[1] - rho[0]) * c)
    for method in ["ddim", "tab3", "rhoab2", "logrho3", "ipndm4", "rho_rk4", "dpmpp1"]:
        x = deis_fast.sample(model, x0, schedule=VP, method=method, nfe=4 if method != "rho_rk4" else 8)
        torch.testing.assert_close(x, exact, rtol=1e-10, atol=1e-10, msg=method)


def test_stochastic_ddim_per_sample_seeds_independent_of_batch():
    def model(x, t):
        return 0.3 * x
    seeds = [11, 12, 13, 14]
    noise = deis_fast.randn_per_sample((4, 5), seeds, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(s + 1000) for s in seeds]
    full = deis_fast.sample(model, noise, schedule=VP, method="ddim_eta", nfe=6, eta=1.0, generator=gens)
    part = deis_fast.sample(model, noise[2:], schedule=VP, method="ddim_eta", nfe=6, eta=1.0,
                            generator=[torch.Generator().manual_seed(s + 1000) for s in seeds[2:]])
    assert torch.equal(full[2:], part)
    det = deis_fast.sample(model, noise, schedule=VP, method="ddim_eta", nfe=6, eta=0.0, generator=gens)
    torch.testing.assert_close(det, deis_fast.sample(model, noise, schedule=VP, method="ddim", nfe=6))
    assert not torch.allclose(full, det)


def test_stochastic_ddim_matches_diffusers_variance():
    """eta = 1 noise std equals DDPM posterior std: sigma_t(eta) of DDIM (Song et al. eq. 16)."""
    from deis_fast.solvers.stochastic import ancestral_split
    t = np.array([999.0, 500.0, 100.0, 0.0])
    rho = VP.rho(t)
    a = VP.alpha(t)
    s = VP.sigma(t)
    _, up = ancestral_split(rho, 0.6)
    expected = 0.6 * (s[1:] / s[:-1]) * np.sqrt(1 - a[:-1] ** 2 / a[1:] ** 2)
    np.testing.assert_allclose(a[1:] * up, expected, rtol=1e-12)


def test_sampler_reuse_and_workspace():
    def model(x, t):
        return 0.3 * x
    s = deis_fast.Sampler(model, VP, "tab3", 6)
    x1 = s(torch.randn(2, 3))
    x2 = s(torch.randn(2, 3))
    x3 = s(torch.randn(5, 3))
    assert x1.shape == (2, 3) and x3.shape == (5, 3)
    assert x1.data_ptr() != x2.data_ptr(), "results must not alias the reusable workspace"
    assert s.nfe == 6 and s.plan.nfe == 6


def test_model_that_reuses_its_output_buffer_is_safe(small_mixture, small_noise):
    base = small_mixture.model(VP)
    buf = torch.empty_like(small_noise)

    def static_out_model(x, t):
        return buf.copy_(base(x, t))
    a = deis_fast.sample(static_out_model, small_noise, schedule=VP, method="tab3", nfe=6)
    b = deis_fast.sample(base, small_noise, schedule=VP, method="tab3", nfe=6)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- errors ---------------------------------------------------------------------------------------------

def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid methods: .*tab3"):
        deis_fast.build_plan(VP, "tab9", 5)
    with pytest.raises(ValueError, match="valid grids"):
        deis_fast.build_plan(VP, "tab3", 5, "weird")
    with pytest.raises(ValueError, match="prediction"):
        deis_fast.Sampler(_eps_model, VP, prediction="noise_pred")


@pytest.mark.parametrize("nfe,match", [(0, ">= 1"), (-3, ">= 1"), (10 ** 9, "absurd")])
def test_bad_nfe(nfe, match):
    with pytest.raises(ValueError, match=match):
        deis_fast.build_plan(VP, "tab3", nfe)


def test_nfe_too_small_or_not_multiple_for_rk():
    with pytest.raises(ValueError, match=">= 4"):
        deis_fast.build_plan(VP, "rho_rk4", 3)
    with pytest.raises(ValueError, match="multiple of 2"):
        deis_fast.build_plan(VP, "rho_heun", 5)
    with pytest.raises(TypeError, match="int"):
        deis_fast.build_plan(VP, "tab3", 5.5)


def test_wrong_model_output_raises_with_step():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="shape"):
        deis_fast.sample(lambda x, t: x[:1] * 1, x, schedule=VP, nfe=3)
    with pytest.raises(TypeError, match="dtype"):
        deis_fast.sample(lambda x, t: x.double(), x, schedule=VP, nfe=3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        deis_fast.sample(lambda x, t: 3.0, x, schedule=VP, nfe=3)


def test_non_finite_model_output_names_step_and_time():
    def model(x, t):
        out = 0.1 * x
        if float(t[0]) < 500:
            out = out + float("nan")
        return out
    with pytest.raises(deis_fast.NonFiniteError, match=r"step 3 .*t=399.6"):
        deis_fast.sample(model, torch.randn(2, 3), schedule=VP, method="tab3", nfe=5, grid="time_uniform")
    x = deis_fast.sample(model, torch.randn(2, 3), schedule=VP, method="tab3", nfe=5, grid="time_uniform",
                         check_finite=False)
    assert torch.isnan(x).any()


def test_bad_noise_raises():
    with pytest.raises(ValueError, match="batch"):
        deis_fast.sample(_eps_model, torch.randn(0, 3), schedule=VP, nfe=3)
    with pytest.raises(TypeError, match="floating"):
        deis_fast.sample(_eps_model, torch.ones(2, 3, dtype=torch.long), schedule=VP, nfe=3)
    with pytest.raises(deis_fast.NonFiniteError, match="input noise"):
        deis_fast.sample(_eps_model, torch.full((2, 3), float("inf")), schedule=VP, nfe=3)


def test_cfg_without_uncond_raises():
    with pytest.raises(ValueError, match="uncond"):
        deis_fast.Sampler(_eps_model, VP, guidance_scale=5.0)


# ------------------------------------------------------------------------------------- grad mode
class _Net(torch.nn.Module):
    """A plain nn.Module with trainable parameters (requires_grad=True, the default)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, t):
        return self.lin(x) * 0.1 + 0.01 * t.reshape(-1, 1) / 1000


@pytest.mark.parametrize("method", ["tab3", "ddim_eta", "rho_heun", "pfdiff"])
def test_grad_requiring_module_samples_outside_no_grad(method):
    torch.manual_seed(0)
    net, noise = _Net(), torch.randn(4, 8)
    nfe = 4
    x = deis_fast.sample(net, noise, method=method, nfe=nfe, generator=torch.Generator().manual_seed(1))
    assert not x.requires_grad and torch.isfinite(x).all()
    with torch.no_grad():
        y = deis_fast.sample(net, noise, method=method, nfe=nfe, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["tab3", "ddim_eta", "rho_heun"])
def test_grad_true_backpropagates_through_sampling(method):
    torch.manual_seed(0)
    net, noise = _Net(), torch.randn(4, 8)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    s = deis_fast.Sampler(net, method=method, nfe=4, grad=True)
    x = s(noise, generator=gen())
    assert x.requires_grad
    with torch.no_grad():
        ref = deis_fast.Sampler(net, method=method, nfe=4)(noise, generator=gen())
    torch.testing.assert_close(x.detach(), ref, rtol=1e-5, atol=1e-5)
    x.square().sum().backward()
    g = net.lin.weight.grad.clone()
    # the same gradient from an independent torch computation: finite differences on one weight
    eps = 1e-3
    with torch.no_grad():
        w = net.lin.weight
        w[0, 0] += eps
        fp = deis_fast.Sampler(net, method=method, nfe=4)(noise, generator=gen()).square().sum()
        w[0, 0] -= 2 * eps
        fm = deis_fast.Sampler(net, method=method, nfe=4)(noise, generator=gen()).square().sum()
        w[0, 0] += eps
    assert abs(float((fp - fm) / (2 * eps)) - float(g[0, 0])) <= 2e-2 * max(1.0, abs(float(g[0, 0])))


def test_classifier_grad_gets_autograd_while_sampling_runs_under_no_grad():
    def classifier_grad(x, t):
        x = x.detach().requires_grad_(True)
        logp = -(x - 1.0).square().sum()
        return torch.autograd.grad(logp, x)[0]

    net, noise = _Net(), torch.randn(3, 8)
    out = deis_fast.sample(net, noise, method="tab2", nfe=3, classifier_grad=classifier_grad, classifier_scale=2.0)
    plain = deis_fast.sample(net, noise, method="tab2", nfe=3)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)


def test_eta_on_a_deterministic_method_is_an_error():
    with pytest.raises(ValueError, match="eta applies to stochastic"):
        deis_fast.build_plan(VP, "tab3", 5, eta=0.5)
    with pytest.raises(ValueError, match="eta applies to a stochastic PFDiff base"):
        deis_fast.build_plan(VP, "ddim", 5, pfdiff=(2, 1), eta=0.5)
    assert deis_fast.build_plan(VP, "ddim_eta", 5, eta=0.5).num_noise == 5


def test_unknown_method_suggests_the_close_name():
    with pytest.raises(ValueError, match="did you mean 'dpmpp_2m'"):
        deis_fast.build_plan(VP, "dpm++2m", 5)


def test_unit_noise_on_a_ve_schedule_warns():
    ve = VESchedule(0.002, 80.0)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.warns(UserWarning, match="scale unit noise"):
        deis_fast.sample(model, torch.randn(4, 16), schedule=ve, method="ddim", nfe=3, prediction="x0")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deis_fast.sample(model, torch.randn(4, 16) * 80.0, schedule=ve, method="ddim", nfe=3, prediction="x0")


# ---------------------------------------------------------------- bad input, non-finite values, layouts, fuzzing
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_noise(bad):
    x = make_noise()
    x[1, 0, 2, 3] = bad
    with pytest.raises(NonFiniteError, match="input noise"):
        deis_fast.sample(eps_model, x, nfe=4)


@pytest.mark.parametrize("method", ["ddim", "tab3", "dpmpp2", "rho_heun", "ddim_eta", "pfdiff"])
def test_non_finite_model_output_names_step_for_every_method(method):
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        out = 0.5 * x
        if len(calls) == 3:
            out = out.clone()
            out[0, 0, 0, 0] = float("nan")
        return out

    s = deis_fast.Sampler(model, method=method, nfe=6)
    with pytest.raises(NonFiniteError) as e:
        s(make_noise(), generator=torch.Generator().manual_seed(0))
    msg = str(e.value)
    assert "step 2" in msg and "NFE 3 of 6" in msg and f"model time {calls[2]:.6g}" in msg


def test_check_finite_off_is_explicit():
    out = deis_fast.sample(lambda x, t: x * float("nan"), make_noise(), nfe=2, check_finite=False)
    assert torch.isnan(out).all()  # the user asked for no check


def test_fp16_model_overflow_is_a_clear_error():
    def model(x, t):  # computes in fp32 and returns fp16, as an autocast model would: 1e5 -> inf
        return (x.float() * 0 + 1e5).to(x.dtype)

    with pytest.raises(NonFiniteError, match="fp16"):
        deis_fast.sample(model, make_noise(dtype=torch.float16), nfe=3)


def test_fp16_result_overflow_is_a_clear_error():
    # every model output is finite (6e4 < 65504) but the update overflows fp16
    with pytest.raises(NonFiniteError, match="fp16 overflow"):
        deis_fast.sample(lambda x, t: torch.full_like(x, 6e4), make_noise(dtype=torch.float16), nfe=3)


def test_fp16_and_bf16_normal_runs_are_close_to_fp32():
    ref = deis_fast.sample(eps_model, make_noise(), nfe=5)
    for dt in (torch.float16, torch.bfloat16):
        out = deis_fast.sample(eps_model, make_noise(dtype=dt), nfe=5)
        assert out.dtype == dt
        torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("fn, err, match", [
    (lambda x, t: x.double(), TypeError, "dtype"),
    (lambda x, t: x.half(), TypeError, "dtype"),
    (lambda x, t: x[:, :1], ValueError, "shape"),
    (lambda x, t: x.reshape(x.shape[0], -1), ValueError, "shape"),
    (lambda x, t: x[:1], ValueError, "shape"),
    (lambda x, t: 1.0, TypeError, "torch.Tensor"),
    (lambda x, t: x.numpy(), TypeError, "torch.Tensor"),
    (lambda x, t: torch.empty(x.shape, device="meta"), ValueError, "meta"),
])
def test_bad_model_output(fn, err, match):
    with pytest.raises(err, match=match):
        deis_fast.sample(fn, make_noise(), nfe=3)


@pytest.mark.parametrize("noise, err, match", [
    (np.zeros((2, 3), np.float32), TypeError, "torch.Tensor"),
    (torch.ones(2, 3, dtype=torch.int64), TypeError, "floating"),
    (torch.ones(2, 3, dtype=torch.bool), TypeError, "floating"),
    (torch.empty(2, 3, device="meta"), ValueError, "meta"),
    (torch.empty(0, 3), ValueError, "empty|non-empty"),
    (torch.empty(2, 0), ValueError, "no elements"),
    (torch.tensor(1.0), ValueError, "batch"),
])
def test_bad_noise(noise, err, match):
    with pytest.raises(err, match=match):
        deis_fast.sample(eps_model, noise, nfe=3)


@pytest.mark.parametrize("nfe, err", [(0, ValueError), (-3, ValueError), (10 ** 9, ValueError), (3.5, TypeError),
                                      ("10", TypeError), (True, TypeError)])
def test_bad_nfe_values_and_types_through_sample(nfe, err):
    with pytest.raises(err):
        deis_fast.sample(eps_model, make_noise(), nfe=nfe)


@pytest.mark.parametrize("kwargs", [
    dict(method="rho_rk4", nfe=6), dict(method="nope"), dict(grid="nope"), dict(grid=[999.0], nfe=None),
    dict(grid=[999.0, 500.0, 500.0, 0.0], nfe=None), dict(grid=[0.0, 999.0], nfe=None), dict(t_start=1.0, t_end=5.0),
    dict(t_start=float("nan")), dict(t_start=1e6), dict(method="ddim_eta", eta=-1.0), dict(pfdiff=(4, 1), method="ddim"),
    dict(prediction="nope"), dict(schedule="linear"), dict(karras_rho=0.0, grid="karras"),
    dict(method="ddim_eta", generator=[torch.Generator()]),
])
def test_bad_sampler_options(kwargs):
    with pytest.raises(DOCUMENTED):
        deis_fast.sample(eps_model, make_noise(), **kwargs)


class _ConvEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1).requires_grad_(False)
        torch.nn.init.normal_(self.conv.weight, std=0.1, generator=torch.Generator().manual_seed(0))

    def forward(self, x, t):
        # torch's conv itself rounds differently on channels_last input on some CPUs (AVX2), which is not what the
        # test is about: convolve the standard layout, hand back the caller's layout
        y = self.conv(x.contiguous())
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return y.contiguous(memory_format=torch.channels_last) if cl else y


@pytest.fixture(scope="module")
def conv_model():
    return _ConvEps()


@pytest.mark.parametrize("method", ["tab3", "dpmpp3", "rho_heun", "ddim_eta"])
def test_channels_last_noise_gives_the_contiguous_result(conv_model, method):
    x = make_noise((2, 3, 8, 8))
    a = deis_fast.sample(conv_model, x, method=method, nfe=6, generator=torch.Generator().manual_seed(1))
    cl = x.contiguous(memory_format=torch.channels_last)
    b = deis_fast.sample(conv_model, cl, method=method, nfe=6, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(b).all()
    if method == "ddim_eta":
        # the step noise buffer is standard-contiguous, so the noisy combine takes the torch path for the
        # mixed layouts: the same values up to float32 rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(a, b)


def test_digits_model_channels_last_is_bitwise_equal():
    from deis_fast.zoo.digits import load_digits_model
    m = load_digits_model()
    x = make_noise((4, 1, 8, 8))
    with torch.inference_mode():
        a = deis_fast.sample(m, x, nfe=5)
        b = deis_fast.sample(m, x.contiguous(memory_format=torch.channels_last), nfe=5)
    assert torch.equal(a, b)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def test_non_contiguous_noise_and_outputs_are_correct(conv_model):
    """Other layouts make the conv pick other float32 algorithms, whose rounding the solver then carries
    through every step (a plan amplifies an early output error by up to alpha_end/alpha_start ~ 160). So
    no fixed absolute tolerance is right. The rule instead: a layout's result is as close to the float64
    solve as the contiguous float32 result, within 2x (the project's reduced-precision rule), measured as
    a relative L2 error over all elements so that it is not one element's rounding luck."""
    import copy
    m64 = copy.deepcopy(conv_model).double()

    def check(model, noise, method="tab3"):
        ref64 = deis_fast.sample(m64, noise.double().contiguous(), method=method, nfe=5)
        base = _rel_err(deis_fast.sample(conv_model, noise.contiguous(), method=method, nfe=5), ref64)
        got = _rel_err(deis_fast.sample(model, noise, method=method, nfe=5), ref64)
        assert base < 1e-5  # float32 is float32 (rounding, not a bug)
        assert got <= 2 * base + 4 * torch.finfo(torch.float32).eps, (got, base)

    x = make_noise((8, 8, 3, 2)).permute(3, 2, 1, 0)  # [2, 3, 8, 8], no dense standard layout
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    check(conv_model, x)
    # a model that returns a non-contiguous output
    check(lambda x, t: conv_model(x, t).transpose(2, 3).contiguous().transpose(2, 3), x.contiguous(), "dpmpp3")
    check(conv_model, make_noise((4, 3, 8, 8))[::2])  # a strided batch
    assert x.shape == (2, 3, 8, 8)  # the input is not modified
    torch.testing.assert_close(x, make_noise((8, 8, 3, 2)).permute(3, 2, 1, 0), rtol=0, atol=0)


methods = st.one_of(st.sampled_from(deis_fast.METHODS), st.text(max_size=8), st.integers(), st.none())


nfes = st.one_of(st.integers(-3, 12), st.sampled_from([0, -10 ** 9, 10 ** 6, 10 ** 12, 100_001]),
                 st.floats(allow_nan=True), st.none(), st.booleans())


grid_lists = st.lists(st.one_of(st.floats(-10, 2000), st.sampled_from([math.nan, math.inf, -math.inf])),
                      min_size=0, max_size=6)


grids = st.one_of(st.none(), st.sampled_from(deis_fast.GRIDS + ("nope",)), grid_lists,
                  grid_lists.map(lambda g: sorted(g, reverse=True)))


times = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1000))


dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


schedules = st.sampled_from(["vp", "ve", "vp_linear", "vp_cosine"])


def _schedule(kind):
    return {"vp": deis_fast.VPSchedule.discrete("linear"), "ve": deis_fast.VESchedule(0.002, 80.0),
            "vp_linear": deis_fast.VPSchedule.linear(), "vp_cosine": deis_fast.VPSchedule.cosine()}[kind]


@FUZZ
@given(method=methods, nfe=nfes, grid=grids, t_start=times, t_end=times, dtype=dtypes, sched=schedules,
       eta=st.floats(-1, 2), pfdiff=st.one_of(st.none(), st.tuples(st.integers(-1, 4), st.integers(-1, 4))),
       use_sampler=st.booleans())
def test_fuzz_sample(method, nfe, grid, t_start, t_end, dtype, sched, eta, pfdiff, use_sampler):
    if isinstance(nfe, int) and not isinstance(nfe, bool) and 12 < nfe <= 100_000:
        nfe = 12  # valid but slow: keep the fuzzing fast
    schedule = _schedule(sched)
    noise = make_noise((2, 3), dtype=dtype)
    if sched == "ve":
        noise = noise * 80 if dtype != torch.float16 else noise
    kw = dict(schedule=schedule, method=method, nfe=nfe, grid=grid, t_start=t_start, t_end=t_end, eta=eta,
              pfdiff=pfdiff)

    def run():
        if use_sampler:
            s = deis_fast.Sampler(eps_model, **kw)
            assert s.nfe == len(s.plan.evals)
            return s(noise, generator=torch.Generator().manual_seed(0))
        return deis_fast.sample(eps_model, noise, generator=torch.Generator().manual_seed(0), **kw)

    assert_ok_or_documented(run)


# ---------------------------------------------------------------- explicit grids, mismatches, input dtype (issue 27)
def _zero_model(x, t):
    return torch.zeros_like(x)


def test_explicit_grid_sets_the_nfe_in_the_python_api():
    """Item 2: a list grid= sets the NFE (as the CLI does); the README's img2img form works; a disagreeing nfe raises."""
    flow = deis_fast.FlowSchedule()
    grid = [1.0, 0.75, 0.5, 0.25, 0.0]
    x = torch.randn(2, 3)
    assert deis_fast.Sampler(_zero_model, flow, grid=grid, prediction="flow").nfe == 4
    assert deis_fast.sample(_zero_model, x, flow, grid=grid, prediction="flow").shape == x.shape
    vp = deis_fast.VPSchedule.discrete("linear")
    times = [999.0, 700.0, 400.0, 150.0, 0.0]
    assert deis_fast.sample(_zero_model, x, vp, grid=times, t_start=400.0).shape == x.shape   # img2img
    pf = deis_fast.make_grid(vp, "time_quadratic", 4 * 3 - 2)                                # PFDiff-2,1: N(k+1)-k
    assert deis_fast.Sampler(_zero_model, vp, "pfdiff", grid=list(pf)).nfe == 4
    assert deis_fast.Sampler(_zero_model, vp).nfe == deis_fast.sampler.DEFAULT_NFE == 10
    with pytest.raises(ValueError, match="4 steps but 10 steps"):
        deis_fast.Sampler(_zero_model, flow, nfe=10, grid=grid, prediction="flow")


def test_loaded_plan_for_another_schedule_method_or_nfe_is_refused(tmp_path):
    """Item 5: save_plan stores the schedule fingerprint; a Sampler for another schedule, method or NFE refuses it,
    naming both; a plan file from before the fingerprint still loads."""
    vp = deis_fast.VPSchedule.discrete("linear")
    deis_fast.save_plan(deis_fast.build_plan(vp, "dpmpp3", 5), tmp_path / "p.json")
    plan = deis_fast.load_plan(tmp_path / "p.json")
    assert plan.schedule_id == deis_fast.schedule_fingerprint(vp)
    assert deis_fast.Sampler(_zero_model, vp, "dpmpp3", 5, plan=plan).nfe == 5
    cos = deis_fast.VPSchedule.cosine()
    with pytest.raises(ValueError, match=f"{plan.schedule_id}.*{deis_fast.schedule_fingerprint(cos)}"):
        deis_fast.Sampler(_zero_model, cos, plan=plan)
    with pytest.raises(ValueError, match="'dpmpp3' plan but method='tab3'"):
        deis_fast.Sampler(_zero_model, vp, "tab3", plan=plan)
    with pytest.raises(ValueError, match="5 network calls but nfe=6"):
        deis_fast.Sampler(_zero_model, vp, nfe=6, plan=plan)
    old = json.loads((tmp_path / "p.json").read_text())
    old.pop("schedule_id")
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert deis_fast.Sampler(_zero_model, cos, plan=deis_fast.load_plan(tmp_path / "old.json")).nfe == 5


def test_optimized_grid_for_another_method_schedule_or_nfe_is_refused(tmp_path):
    """Item 5: a grid optimized for dpmpp3 is not silently taken by a tab3 Sampler (nor another schedule / NFE)."""
    vp = deis_fast.VPSchedule.discrete("linear")
    g = deis_fast.OptimizedGrid([float(t) for t in deis_fast.make_grid(vp, "logsnr", 4)], "dpmpp3", 4,
                                schedule=deis_fast.schedule_fingerprint(vp))
    deis_fast.save_grid(tmp_path / "g.json", g)
    g = deis_fast.load_grid(tmp_path / "g.json", "", "dpmpp3", 4)
    assert deis_fast.Sampler(_zero_model, vp, "dpmpp3", grid=g).nfe == 4
    with pytest.raises(ValueError, match="optimized for method='dpmpp3'.*not 'tab3'"):
        deis_fast.Sampler(_zero_model, vp, "tab3", grid=g)
    with pytest.raises(ValueError, match="another schedule"):
        deis_fast.Sampler(_zero_model, deis_fast.VPSchedule.cosine(), "dpmpp3", grid=g)
    with pytest.raises(ValueError, match="nfe=4, not nfe=5"):
        deis_fast.Sampler(_zero_model, vp, "dpmpp3", 5, grid=g)


def test_noise_dtype_other_than_the_models_gets_one_clear_message():
    """Item 5: fp16 noise with an fp32 nn.Module: a TypeError naming both dtypes, not torch's 'c10::Half ... bias'."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x, t):
            return self.conv(x)
    with pytest.raises(TypeError, match=r"noise is torch.float16 on cpu but the model's parameters are torch.float32"):
        deis_fast.sample(Net(), torch.randn(2, 1, 4, 4, dtype=torch.float16), nfe=2)
    assert deis_fast.sample(Net(), torch.randn(2, 1, 4, 4), nfe=2).dtype == torch.float32


def test_embedded_models_are_public():
    """Item 3: deis_fast.load_model gives the embedded models with their schedule, prediction and shape."""
    for kind, pred, sched in (("digits", "eps", deis_fast.VPSchedule), ("flow", "flow", deis_fast.FlowSchedule)):
        m = deis_fast.load_model(kind)
        assert m.prediction == pred and isinstance(m.schedule, sched) and m.shape == (1, 8, 8)
        x = deis_fast.sample(m.model, torch.randn(2, *m.shape), m.schedule, nfe=2, prediction=m.prediction)
        assert torch.isfinite(x).all()
    assert "load_model" in deis_fast.__all__


def test_noise_with_the_wrong_channel_count_is_named_before_the_conv_error():
    """Issue 33 item 18: a model that declares in_channels refuses noise with another channel count before any call;
    any other model's input convolution error is re-raised naming the noise's shape and the one to draw."""
    m = deis_fast.load_model("digits")
    calls = []

    def counted(x, t):
        calls.append(1)
        return m.model(x, t)
    bad = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\) \(3 channels\).*takes 1 channels.*\(2, 1, 8, 8\)"):
        deis_fast.sample(m.model, bad, m.schedule, nfe=3)
    with pytest.raises(ValueError, match=r"\(3 channels\).*input convolution takes 1 channels.*\(2, 1, 8, 8\)"):
        deis_fast.sample(counted, bad, m.schedule, nfe=3)
    assert len(calls) == 1

    def inner(x, t):   # an error deeper in the network is not the noise's: passed on as it is
        return torch.nn.functional.conv2d(x.repeat(1, 2, 1, 1), torch.zeros(1, 3, 1, 1))
    with pytest.raises(RuntimeError, match="channels"):
        deis_fast.sample(inner, torch.randn(2, 1, 8, 8), m.schedule, nfe=3)
