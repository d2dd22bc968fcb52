"""GaussianStart: the exact ODE of Gaussian data, checked against a fine numerical solve of the same ODE driven by
the exact Gaussian eps model (an independent computation), on VP, flow (from alpha = 0) and VE schedules."""
import pytest
import torch

import deis_fast
from deis_fast.tuning.gaussian_start import GaussianStart
from deis_fast.testing import relative_errors

D = 12


def _gaussian(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    cov = a @ a.T / D + 0.05 * torch.eye(D, dtype=torch.float64)
    return torch.randn(D, generator=g, dtype=torch.float64), cov


def _x0_model(mean, cov, schedule):
    """The exact E[x0 | x_t] of N(mean, cov) data: mean + alpha C (alpha^2 C + sigma^2 I)^-1 (x - alpha mean)
    (finite at alpha = 0)."""
    def model(x, t):
        tt = float(schedule.t_from_model_time(float(t[0])))
        a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
        m = a * a * cov + s * s * torch.eye(D, dtype=torch.float64)
        return mean + a * (cov @ torch.linalg.solve(m, (x - a * mean).T)).T
    return model


CASES = [("vp", deis_fast.VPSchedule.discrete("linear"), 999.0, 300.0),
         ("flow", deis_fast.FlowSchedule(), 1.0, 0.35),
         ("ve", deis_fast.VESchedule(0.02, 20.0), 1.0, 0.4)]


@pytest.mark.parametrize("name,schedule,t_from,t_to", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("diagonal", [False, True])
def test_matches_a_fine_solve_of_the_gaussian_ode(name, schedule, t_from, t_to, diagonal):
    mean, cov = _gaussian()
    if diagonal:
        cov = torch.diag(torch.diagonal(cov))
    z = torch.randn(16, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = z * float(schedule.sigma(t_from)) if name == "ve" else z
    start = GaussianStart(mean, torch.diagonal(cov) if diagonal else cov)
    got = start(x, schedule, t_from, t_to)
    ref = deis_fast.sample(_x0_model(mean, cov, schedule), x, schedule=schedule, method="rho_rk4", nfe=800,
                           grid="time_uniform", t_start=t_from, t_end=t_to, prediction="x0")
    err = float(relative_errors(got, ref).max())
    assert err < 1e-7, err
    # and it is not the identity: the state moved
    assert float(relative_errors(x, ref).min()) > 0.05


def test_from_samples_and_errors():
    mean, cov = _gaussian()
    g = torch.Generator().manual_seed(2)
    data = mean + torch.randn(20000, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    est = GaussianStart.from_samples(data.reshape(20000, 3, 4))
    assert float((est.mean - mean).norm() / mean.norm()) < 0.02
    sched = deis_fast.VPSchedule.discrete("linear")
    x = torch.randn(4, 3, 4, dtype=torch.float32)
    y = est(x, sched, 999.0, 500.0)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="12 elements each"):
        est(torch.randn(4, 5), sched, 999.0, 500.0)
    with pytest.raises(ValueError, match="noisier"):
        est(x, sched, 500.0, 999.0)
    with pytest.raises(ValueError, match="symmetric"):
        GaussianStart(mean, cov + torch.triu(torch.ones(D, D, dtype=torch.float64), 1))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianStart(mean, -cov)
    with pytest.raises(ValueError, match="covariance"):
        GaussianStart(mean, cov[:3])
    with pytest.raises(ValueError, match="at least 2 samples"):
        GaussianStart.from_samples(data[:1])
