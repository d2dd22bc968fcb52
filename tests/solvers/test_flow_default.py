"""The default on flow schedules (rhoabm2: rhoAB-2 + the rho-Adams-Moulton corrector) is never worse than the
scheduler it replaces (Euler on the shifted FlowMatch grid = diffusers' FlowMatchEuler), through ``sample`` and
``DEISFastScheduler.from_config``, at shift 1, 3 and FLUX's mu for 256^2 .. 1024^2, NFE 4-20, on the flow mixture
(float64, 32 noises, exact reference); rhoABM's plan, convergence and parity; FlowSchedule.with_time_scale."""
import math
import warnings

import numpy as np
import pytest
import torch

import deis_fast
from deis_fast.core.schedules import FlowSchedule, flux_mu
from deis_fast.testing import GaussianMixture, reference_solution, relative_errors

SHIFTS = {"shift 1": 1.0, "flux 256^2 (mu 0.5)": math.exp(0.5), "shift 3": 3.0, "flux 1024^2 (mu 1.15)": math.exp(1.15)}


@pytest.fixture(scope="module")
def flow_mix():
    mix = GaussianMixture.random(8, 64, 0.3, 1234)
    z = torch.randn(32, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return mix, z, reference_solution(mix, FlowSchedule(), z, 1.0, 0.0)


def _err(x, ref):
    return float(relative_errors(x, ref).median())


def test_flow_default_method_is_rhoabm2_elsewhere_tab3():
    assert deis_fast.solvers.default_method(FlowSchedule(shift=3.0)) == "rhoabm2"
    assert deis_fast.solvers.default_method(deis_fast.VPSchedule.discrete("linear")) == "tab3"
    s = deis_fast.Sampler(lambda x, t: x, FlowSchedule(mu=1.15), nfe=5, prediction="flow")
    assert s.plan.method == "rhoabm2" and s.nfe == 5


@pytest.mark.parametrize("label", list(SHIFTS))
def test_sample_default_never_worse_than_euler_on_the_flowmatch_grid(flow_mix, label):
    """Measured worst ratio (default / Euler) over NFE 4-20: 0.85 (shift 1), 0.94, 0.98 (shift 3), 0.99."""
    mix, z, ref = flow_mix
    s = FlowSchedule(SHIFTS[label])
    model = mix.model(s, "flow")
    for n in range(4, 21):
        ours = _err(deis_fast.sample(model, z, schedule=s, nfe=n, prediction="flow"), ref)
        euler = _err(deis_fast.sample(model, z, schedule=s, nfe=n, prediction="flow", method="ddim"), ref)
        assert ours <= euler, (label, n, ours, euler)


@pytest.mark.parametrize("case", ["sd3 shift 3", "sd3 shift 1", "flux mu 0.5", "flux mu 1.15"])
def test_scheduler_default_never_worse_than_flowmatch_euler(flow_mix, case):
    """DEISFastScheduler.from_config(<FlowMatchEuler config>) with no method against FlowMatchEulerDiscreteScheduler
    itself, as SD3 (set_timesteps(n)) and FLUX (sigmas + mu) pipelines drive them."""
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
    from deis_fast.integrations.diffusers import DEISFastScheduler
    from _diffusers_common import scheduler_loop
    mix, z, ref = flow_mix
    flux = case.startswith("flux")
    cfg = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
               max_image_seq_len=4096, shift=3.0) if flux else dict(shift=float(case.split()[-1]))
    mu = float(case.split()[-1]) if flux else None
    model = mix.model(FlowSchedule(), "flow")
    for n in (4, 5, 6, 8, 10, 15, 20):
        errs = []
        for make in (lambda c: diffusers.FlowMatchEulerDiscreteScheduler(**c), None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sch = make(cfg) if make else DEISFastScheduler.from_config(
                    diffusers.FlowMatchEulerDiscreteScheduler(**cfg).config)
            if flux:
                sch.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
            else:
                sch.set_timesteps(n)
            errs.append(_err(scheduler_loop(sch, model, z.clone()), ref))
        assert sch.config.method == "rhoabm2" and sch.plan.nfe == n
        assert errs[1] <= errs[0], (case, n, errs)


def test_rhoabm_plan_parity_and_first_step():
    s = FlowSchedule(shift=3.0)
    off = deis_fast.build_plan(s, "rhoabm2", 6, corrector=False)
    ref = deis_fast.build_plan(s, "rhoab2", 6)
    assert [op for op in off.ops] == [op for op in ref.ops]   # corrector=False: rhoAB-3 itself
    one = deis_fast.build_plan(s, "rhoabm2", 1)
    ddim = deis_fast.build_plan(s, "ddim", 1)
    # one step out of t = 1 is DDIM's data-form jump x <- D_0 (slot numbers differ)
    assert [c.coefs for c in one.combines] == [c.coefs for c in ddim.combines] == [(1.0,)]
    assert [(e.t, e.target) for e in one.evals] == [(e.t, e.target) for e in ddim.evals]
    on = deis_fast.build_plan(s, "rhoabm2", 6)
    assert on.nfe == 6 and len(on.combines) > len(off.combines)
    # the first step is corrected: x_1 = t_1 x_0 + (1 - t_1) D_1 (implicit Euler in u = alpha / sigma)
    t1 = on.times[1]
    assert any(c.dst == 0 and np.allclose(c.coefs, (t1, 1.0 - t1)) for c in on.combines[:4])


def test_rhoabm2_converges_faster_than_rhoab2(flow_mix):
    """Away from t = 1 (VP, full range): slope ~3.3-3.7 in log2 (order 4 asymptotically), below rhoab2's error."""
    mix, z, _ = flow_mix
    vp = deis_fast.VPSchedule.discrete("linear")
    model = mix.model(vp, "eps")
    ref = reference_solution(mix, vp, z, vp.t_max, vp.t_min)
    e = {m: [_err(deis_fast.sample(model, z, schedule=vp, nfe=n, method=m, grid="time_quadratic"), ref)
             for n in (20, 40, 80)] for m in ("rhoabm2", "rhoab2")}
    slopes = np.log2(np.array(e["rhoabm2"][:-1]) / np.array(e["rhoabm2"][1:]))
    assert slopes.min() > 3.2, e
    assert all(a < b / 3 for a, b in zip(e["rhoabm2"], e["rhoab2"])), e


def test_with_time_scale_keeps_shift_or_mu():
    f = FlowSchedule(mu=flux_mu(1024)).with_time_scale(1.0)
    assert f.mu == flux_mu(1024) and f.time_scale == 1.0 and f.shift == pytest.approx(math.exp(f.mu))
    g = FlowSchedule(3.0).with_time_scale(1.0)
    assert g.mu is None and g.shift == 3.0 and g.time_scale == 1.0
    assert deis_fast.schedule_fingerprint(FlowSchedule(mu=0.5, time_scale=1.0)) == \
        deis_fast.schedule_fingerprint(FlowSchedule(mu=0.5).with_time_scale(1.0))
