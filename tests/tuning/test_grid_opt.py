"""Grid optimizer: deterministic, valid grids, JSON round trip, and a held-out improvement."""
import json

import numpy as np
import pytest
import torch

import deis_fast
from deis_fast.tuning.grids import OptimizedGrid, grid_intervals, load_grid, optimize_grid, save_grid
from deis_fast.testing import GaussianMixture, reference_solution, relative_errors

VP = deis_fast.VPSchedule.discrete("linear")


@pytest.fixture(scope="module")
def problem():
    mix = GaussianMixture.random(8, 16, 0.3, seed=11)
    model = mix.model(VP)
    cal = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    held = torch.randn(64, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (model, cal, reference_solution(mix, VP, cal, 999.0, 0.0),
            held, reference_solution(mix, VP, held, 999.0, 0.0))


def test_deterministic_valid_and_accepted_by_sample(problem):
    model, cal, cref, held, _ = problem
    a = optimize_grid(model, VP, "logrho3", 4, cal, reference=cref, max_evals=60, max_restarts=0)
    b = optimize_grid(model, VP, "logrho3", 4, cal, reference=cref, max_evals=60, max_restarts=0)
    assert a.times == b.times
    t = np.asarray(a)
    assert t.shape == (5,) and np.all(np.diff(t) < 0) and t[0] == 999.0 and t[-1] == 0.0
    assert a.calibration_error <= a.start_error
    x = deis_fast.sample(model, held, schedule=VP, method="logrho3", nfe=4, grid=a)
    assert torch.isfinite(x).all()
    s = deis_fast.Sampler(model, VP, "logrho3", 4, grid=a)
    assert s.plan.nfe == 4 and s.plan.times == tuple(a.times)


def test_pfdiff_grid_has_the_pfdiff_number_of_intervals(problem):
    model, cal, cref, _, _ = problem
    g = optimize_grid(model, VP, "pfdiff", 3, cal, reference=cref, max_evals=30, max_restarts=0)
    assert len(g) == grid_intervals("ddim", 3, (2, 1)) + 1 == 3 * 3 - 2 + 1
    assert g.pfdiff == (2, 1) and g.method == "ddim"


def test_json_round_trip_keyed_by_model_method_nfe(tmp_path, problem):
    model, cal, cref, _, _ = problem
    g = optimize_grid(model, VP, "tab2", 3, cal, reference=cref, max_evals=20, max_restarts=0, model_id="mix16")
    path = tmp_path / "grids.json"
    save_grid(path, g)
    save_grid(path, OptimizedGrid([999.0, 0.0], "ddim", 1, model_id="mix16"))
    back = load_grid(path, "mix16", "tab2", 3)
    assert back.times == g.times and back.calibration_error == g.calibration_error
    assert set(json.loads(path.read_text())) == {"mix16|tab2|3", "mix16|ddim|1"}
    with pytest.raises(KeyError, match="no optimized grid"):
        load_grid(path, "mix16", "tab3", 3)


@pytest.mark.slow
def test_beats_the_best_fixed_grid_on_held_out_noise(problem):
    model, cal, cref, held, href = problem
    for method in ("logrho3", "pfdiff"):
        og = optimize_grid(model, VP, method, 5, cal, reference=cref, time_budget=20)
        fixed = min(float(relative_errors(deis_fast.sample(model, held, schedule=VP, method=method, nfe=5, grid=g),
                                          href).median())
                    for g in ("time_quadratic", "logsnr", "karras", "time_uniform"))
        opt = float(relative_errors(deis_fast.sample(model, held, schedule=VP, method=og.method, nfe=5, grid=og,
                                                     pfdiff=og.pfdiff), href).median())
        assert opt * 1.5 <= fixed, (method, opt, fixed)


def test_multi_start_never_worse_than_the_best_start_alone(problem):
    model, cal, cref, _, _ = problem
    kw = dict(reference=cref, max_evals=40, max_restarts=0, time_budget=None)
    every = optimize_grid(model, VP, "ipndm4", 5, cal, **kw)
    alone = optimize_grid(model, VP, "ipndm4", 5, cal, start_grids=(every.start_grid,), **kw)
    assert every.calibration_error <= alone.calibration_error < alone.start_error
    assert every.evaluations > alone.evaluations and not every.extra["stopped_by_time_budget"]


def test_time_budget_stops_the_search_and_says_so(problem):
    model, cal, cref, _, _ = problem
    g = optimize_grid(model, VP, "tab3", 5, cal, reference=cref, time_budget=0.0)
    assert g.extra["stopped_by_time_budget"] and g.calibration_error == g.start_error
    fixed = np.asarray(deis_fast.make_grid(VP, g.start_grid, 5))
    np.testing.assert_allclose(np.asarray(g), fixed)


def test_gain_within_calibration_noise_keeps_the_fixed_grid(problem):
    model, cal, cref, _, _ = problem
    kw = dict(reference=cref, max_evals=40, max_restarts=0, time_budget=None)
    free = optimize_grid(model, VP, "tab3", 5, cal, min_gain=0.0, **kw)
    assert free.calibration_error < free.start_error
    strict = optimize_grid(model, VP, "tab3", 5, cal, min_gain=0.999, **kw)
    assert strict.calibration_error == strict.start_error
    np.testing.assert_allclose(np.asarray(strict), np.asarray(deis_fast.make_grid(VP, strict.start_grid, 5)))


def test_needs_noise_or_shape():
    with pytest.raises(ValueError, match="calibration"):
        optimize_grid(lambda x, t: x, VP, "ddim", 3)
    with pytest.raises(ValueError, match="min_gain"):
        optimize_grid(lambda x, t: x, VP, "ddim", 3, shape=(2, 4), min_gain=-0.1)


@pytest.mark.slow
def test_sampler_grid_optimized_string(problem):
    model, cal, cref, held, href = problem
    s = deis_fast.Sampler(model, VP, "logrho3", 4, grid="optimized", calibration_noise=cal)
    assert s.optimized_grid is not None and s.plan.nfe == 4
    assert s.plan.times == tuple(s.optimized_grid.times)
    s2 = deis_fast.Sampler(model, VP, "pfdiff", 3, grid="optimized", calibration_noise=cal)
    assert s2.plan.nfe == 3 and len(s2.plan.times) == 3 * 3 - 2 + 1
    with pytest.raises(ValueError, match="calibration_noise"):
        deis_fast.Sampler(model, VP, "logrho3", 4, grid="optimized")
    with pytest.raises(ValueError, match="optimize_grid"):
        deis_fast.build_plan(VP, "tab3", 4, "optimized")


def test_build_plan_refuses_non_finite_coefficients(monkeypatch):
    import dataclasses
    import deis_fast.solvers.build as smp
    real = smp._build

    def poisoned(*a, **k):
        plan = real(*a, **k)
        ops = list(plan.ops)
        j = next(i for i, op in enumerate(ops) if isinstance(op, deis_fast.Combine))
        ops[j] = dataclasses.replace(ops[j], coefs=(float("nan"),) + ops[j].coefs[1:])
        return dataclasses.replace(plan, ops=tuple(ops))
    monkeypatch.setattr(smp, "_build", poisoned)
    with pytest.raises(ValueError, match="non-finite coefficients"):
        deis_fast.build_plan(VP, "tab2", 4)


def test_held_out_noises_veto_a_grid_that_only_wins_on_the_fit(problem):
    """The last quarter of the calibration noises is held out. Make the fixed grid perfect there (its own
    output is the reference of those rows): the optimized grid wins on the fit rows but must be rejected."""
    model, cal, cref, _, _ = problem
    kw = dict(max_evals=40, max_restarts=0, time_budget=None, min_gain=0.0)
    free = optimize_grid(model, VP, "logrho3", 4, cal, reference=cref, validation_fraction=0.0, **kw)
    fixed = deis_fast.make_grid(VP, free.start_grid, 4)
    assert free.calibration_error < free.start_error and list(free.times) != list(fixed)
    assert np.isnan(free.validation_error)
    rigged = cref.clone()
    rigged[12:] = deis_fast.sample(model, cal[12:], schedule=VP, method="logrho3", nfe=4, grid=list(fixed))
    vetoed = optimize_grid(model, VP, "logrho3", 4, cal, reference=rigged, validation_fraction=0.25, **kw)
    assert vetoed.extra["held_out_noises"] == 4 and vetoed.extra["fit_noises"] == 12
    assert vetoed.start_grid == free.start_grid
    assert vetoed.times == [float(t) for t in fixed]
    assert vetoed.start_validation_error < 1e-9 and vetoed.validation_error == vetoed.start_validation_error
    honest = optimize_grid(model, VP, "logrho3", 4, cal, reference=cref, validation_fraction=0.25, **kw)
    assert honest.validation_error < honest.start_validation_error  # on true references it generalizes
    with pytest.raises(ValueError, match="validation_fraction"):
        optimize_grid(model, VP, "ddim", 3, cal, reference=cref, validation_fraction=1.0)


def test_flow_schedules_are_optimized_too():
    """lambda is infinite at both ends of a flow process (t = 1 and t = 0): the optimizer then parametrizes the
    angle atan2(sigma, alpha) instead of silently returning the fixed grid."""
    flow = deis_fast.FlowSchedule(shift=3.0)
    mix = GaussianMixture.random(4, 8, 0.5, seed=3)
    model = mix.model(flow, "flow")
    cal = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_solution(mix, flow, cal, 1.0, 0.0)
    g = optimize_grid(model, flow, "tab2", 4, cal, reference=ref, prediction="flow", min_gain=0.0,
                      validation_fraction=0.0, max_evals=40, max_restarts=0, time_budget=None)
    assert g.evaluations > 4 * 4  # Nelder-Mead ran from every start grid
    assert g.calibration_error < g.start_error
    assert g.times[0] == 1.0 and g.times[-1] == 0.0 and all(np.diff(g.times) < 0)
