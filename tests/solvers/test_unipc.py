"""UniPC: parity with diffusers' UniPCMultistepScheduler (predict_x0=True, bh1/bh2, disable_corrector,
lower_order_final), plan structure, its relation to the lambda-Adams-Moulton corrector, the generic
corrector=True on other multistep methods, bad input."""
import numpy as np
import pytest
import torch

import deis_fast
from deis_fast.testing import reference_solution, relative_errors

SCHED = deis_fast.VPSchedule.discrete("linear")


@pytest.fixture(scope="module")
def problem(discrete_vp_problem):
    return discrete_vp_problem


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _diffusers_unipc(model, noise, n, **cfg):
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
    sch = diffusers.UniPCMultistepScheduler(predict_x0=True, **cfg)
    sch.set_timesteps(n)
    sch.sigmas = sch.sigmas.double()  # its float32 sigmas would cap agreement at ~1e-5
    x = noise.clone()
    for t in sch.timesteps:
        x = sch.step(model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64)), t, x).prev_sample
    return x, {"rho": [float(v) for v in sch.sigmas]}   # the same noise levels (its timesteps, final sigma)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("lower_order_final,disable_corrector", [(True, []), (False, []), (True, [0, 2])])
def test_unipc_matches_diffusers(problem, order, variant, lower_order_final, disable_corrector):
    """Same timesteps, final sigma = sigma_min (diffusers' bh1 is NaN on a final step to sigma = 0)."""
    model, noise = problem
    ref, grid = _diffusers_unipc(model, noise, 8, solver_order=order, solver_type=variant,
                               lower_order_final=lower_order_final, disable_corrector=disable_corrector,
                               final_sigmas_type="sigma_min")
    x = deis_fast.sample(model, noise, schedule=SCHED, method=f"unipc{order}", nfe=None, grid=grid,
                         variant=variant, lower_order_final=lower_order_final, disable_corrector=disable_corrector)
    assert _rel(x, ref) <= 1e-5, _rel(x, ref)
    if order > 1 or disable_corrector:
        other = "bh2" if variant == "bh1" else "bh1"
        y = deis_fast.sample(model, noise, schedule=SCHED, method=f"unipc{order}", nfe=None, grid=grid,
                             variant=other, lower_order_final=lower_order_final, disable_corrector=disable_corrector)
        assert _rel(y, ref) > 10 * _rel(x, ref)


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_final_sigma_zero_and_predictor_alone_match_diffusers(problem, order):
    model, noise = problem
    ref, grid = _diffusers_unipc(model, noise, 10, solver_order=order, final_sigmas_type="zero")
    assert grid["rho"][-1] == 0.0
    x = deis_fast.sample(model, noise, schedule=SCHED, method=f"unipc{order}", nfe=None, grid=grid,
                         lower_order_final=True)
    assert _rel(x, ref) <= 1e-5, _rel(x, ref)
    ref_p, _ = _diffusers_unipc(model, noise, 10, solver_order=order, disable_corrector=list(range(10)),
                                final_sigmas_type="zero")
    p = deis_fast.sample(model, noise, schedule=SCHED, method=f"unipc{order}", nfe=None, grid=grid,
                         corrector=False, lower_order_final=True)
    assert _rel(p, ref_p) <= 1e-5 and _rel(p, ref) > 1e-3


def test_corrector_is_one_combine_after_each_eval():
    n = 7
    plan = deis_fast.build_plan(SCHED, "unipc3", n)
    assert plan.nfe == n and len(plan.combines) == n + (n - 1) and plan.max_arity <= 6
    kinds = ["E" if isinstance(op, deis_fast.Eval) else "C" for op in plan.ops]
    assert "".join(kinds) == "EC" + "ECC" * (n - 1)
    # corrections are in place on x and use the output just evaluated
    for k, op in enumerate(plan.ops):
        if isinstance(op, deis_fast.Eval) and k > 0:
            corr = plan.ops[k + 1]
            assert corr.dst == 0 and corr.srcs[0] == 0 and corr.coefs[0] == 1.0 and op.dst in corr.srcs
    plain = deis_fast.build_plan(SCHED, "unipc3", n, corrector=False)
    assert "".join("E" if isinstance(op, deis_fast.Eval) else "C" for op in plain.ops) == "EC" * n


def _combine_coefs(plan):
    return [np.array(op.coefs) for op in plan.combines]


def test_unic_equals_lambda_adams_moulton_beyond_order_one():
    """UniC-p (p >= 2) solves the same order conditions as the lambda-Adams-Moulton corrector of dpmpp*
    (corrector=True), so the coefficients agree; they differ only where UniPC fixes rho = 1/2 (UniC-1 on the
    first correction, UniP-2 on the warm-up step)."""
    a = _combine_coefs(deis_fast.build_plan(SCHED, "unipc3", 10))
    b = _combine_coefs(deis_fast.build_plan(SCHED, "dpmpp3", 10, corrector=True))
    differ = [k for k, (p, q) in enumerate(zip(a, b)) if len(p) != len(q) or np.max(np.abs(p - q)) > 1e-12]
    # combine 1 = UniC-1 at point 1, 2 = UniP-2 from point 1, 3 = the correction at point 2 (stored as
    # corrected minus predicted state, so it inherits the UniP-2 difference); everything later agrees
    assert differ == [1, 2, 3], differ


VP = deis_fast.VPSchedule.linear()


@pytest.fixture(scope="module")
def vp_reference(small_mixture, small_noise):
    return reference_solution(small_mixture, VP, small_noise, VP.t_max, VP.t_min)


@pytest.mark.parametrize("method", ["ddim", "tab3", "rhoab2", "logrho3", "dpmpp3", "dpmpp_2m", "ipndm4", "ipndm_v"])
def test_corrector_on_multistep_methods_improves_accuracy(method, small_mixture, small_noise, vp_reference):
    """corrector=True on every multistep family: same NFE, a smaller error at NFE 20 (measured ratios
    0.3-0.85; at NFE 10 the gain is smaller and ipndm4 gets worse, see benchmarks/RESULTS.md)."""
    s, ref = VP, vp_reference
    model = small_mixture.model(s)
    errs = [float(relative_errors(deis_fast.sample(model, small_noise, schedule=s, method=method, nfe=20,
                                                   grid="logsnr", corrector=c), ref).mean()) for c in (False, True)]
    assert errs[1] < 0.9 * errs[0], errs


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rho_heun", corrector=True), "is a Runge-Kutta method"),
    (dict(method="ddim_eta", corrector=True), "stochastic one-step"),
    (dict(method="unipc2", variant="bh3"), "unknown variant 'bh3'.*bh2, bh1"),
    (dict(method="tab3", variant="bh1"), "has no variants.*unipc1"),
    (dict(method="unipc2", disable_corrector=[-1]), "0-based step indices"),
    (dict(method="pfdiff", corrector=True), "pfdiff wraps"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deis_fast.build_plan(SCHED, nfe=8, **kwargs)


def test_cli_plan_with_solver_options(capsys):
    import json

    from deis_fast.cli.main import main
    assert main(["plan", "--method", "unipc3", "--nfe", "5", "--variant", "bh1", "--grid", "ays", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["nfe"] == 5 and sum(op["op"] == "combine" for op in d["ops"]) == 9
    assert main(["plan", "--method", "dpmpp_2m_sde", "--nfe", "4", "--s-noise", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_noise"] == 4


@pytest.mark.parametrize("method", ["unipc3", "dpmpp_2m_sde", "tab3"])
def test_diffusers_scheduler_runs_the_same_plan(problem, method):
    """DEISFastScheduler(method=...) steps through the same plan as deis_fast.sample (corrector Combines and
    SDE noise included: the noise is drawn from the step() generator)."""
    pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
    from deis_fast.integrations.diffusers import DEISFastScheduler
    model, noise = problem
    sch = DEISFastScheduler(method=method, timestep_type="float")
    sch.set_timesteps(6)
    gen = torch.Generator().manual_seed(0)
    x = noise.clone()
    for t in sch.timesteps:
        x = sch.step(model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64)), t, x, generator=gen).prev_sample
    z = torch.randn((sch.plan.num_noise,) + tuple(noise.shape), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64) if sch.plan.num_noise else None
    ref = deis_fast.Sampler(model, SCHED, plan=sch.plan)(noise, step_noise=z)
    assert _rel(x, ref) < 1e-12


@pytest.mark.parametrize("method,keys", [
    ("unipc2", dict(variant="bh1")),
    ("unipc3", dict(variant="bh2", corrector=False)),
    ("unipc3", dict(disable_corrector=[1, 3])),
    ("tab3", dict(corrector=True)),
    ("dpmpp_2m_sde", dict(variant="heun", s_noise=0.5, eta=0.7)),
])
def test_diffusers_scheduler_solver_keys_reach_the_plan(problem, method, keys):
    """variant / corrector / disable_corrector / s_noise given to the scheduler (also through from_config and a
    saved config) build the same plan as the same options in the core API, and that plan differs from the
    default one."""
    pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
    from deis_fast.integrations.diffusers import DEISFastScheduler
    sch = DEISFastScheduler(method=method, timestep_type="float", **keys)
    sch.set_timesteps(6)
    again = DEISFastScheduler.from_config(sch.config)
    again.set_timesteps(6)
    plain = DEISFastScheduler(method=method, timestep_type="float")
    plain.set_timesteps(6)
    core = dict(keys)
    core.setdefault("eta", 1.0) if method == "dpmpp_2m_sde" else None
    ref = deis_fast.build_plan(SCHED, method, None, list(sch.plan.times), **core)
    assert sch.plan.ops == ref.ops and again.plan.ops == ref.ops
    assert plain.plan.ops != ref.ops


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rho_heun", corrector=True), "corrector=True"),
    (dict(method="unipc2", variant="bh3"), "unknown variant 'bh3'"),
    (dict(method="tab3", variant="bh1"), "has no variants"),
    (dict(method="dpmpp_2m_sde", s_noise=-1.0), "must be >= 0"),
    (dict(method="tab3", s_noise=0.5), "s_noise applies to the SDE methods"),
    (dict(method="pfdiff", corrector=True), "PFDiff wraps a plain first-order step"),
])
def test_diffusers_scheduler_refuses_bad_solver_keys_at_construction(kwargs, match):
    pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
    from deis_fast.integrations.diffusers import DEISFastScheduler
    with pytest.raises(ValueError, match=match):
        DEISFastScheduler(**kwargs)


@pytest.mark.slow
def test_corrector_helps_tab3_on_the_digits_model():
    """The eps-form corrector refreshes eps from the corrected state; with a stale eps it made tab3 100x
    worse on this trained network at NFE 20 (the mixture does not show it). With 32 samples and an 800-NFE
    reference: 0.0158 -> 0.0109 at NFE 10."""
    from deis_fast.zoo.digits import load_digits_model
    net = load_digits_model(dtype=torch.float64)

    def model(x, t):
        return net(x, t)
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = deis_fast.sample(model, noise, schedule=SCHED, method="tab3", nfe=60, corrector=True)  # ~1e-4
    errs = [float(relative_errors(deis_fast.sample(model, noise, schedule=SCHED, method="tab3", nfe=10,
                                                   corrector=c), ref).median()) for c in (False, True)]
    assert errs[1] < 0.95 * errs[0], errs   # measured 0.0121 -> 0.0105 here; the stale-eps bug gave 0.5+
