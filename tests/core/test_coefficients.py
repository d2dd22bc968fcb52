import numpy as np
import pytest
from scipy.integrate import quad

from deis_fast.core.coefficients import data_ab_rows, dpmsolver_rows, eps_ab_rows, ipndm_rows, points_per_step
from deis_fast.core.grids import grid_rho, make_grid
from deis_fast.core.schedules import VESchedule, VPSchedule

SCHEDULES = [VPSchedule.discrete("linear"), VPSchedule.linear(), VPSchedule.cosine(), VESchedule(0.002, 80.0)]


def _grid(s, n=9):
    t = make_grid(s, "logsnr", n)
    return t, grid_rho(s, t)


@pytest.mark.parametrize("s", SCHEDULES, ids=repr)
@pytest.mark.parametrize("variable", ["t", "rho", "logrho"])
@pytest.mark.parametrize("points", [1, 2, 3, 4])
def test_eps_rows_sum_to_rho_step(s, variable, points):
    t, rho = _grid(s)
    rows = eps_ab_rows(s, t, rho, points_per_step(len(t) - 1, points), variable)
    alpha = s.alpha_from_rho(rho)
    for i, r in enumerate(rows):
        assert sum(r.coefs) / alpha[i + 1] == pytest.approx(rho[i + 1] - rho[i], rel=1e-10, abs=1e-12)
        assert r.state_coef == pytest.approx(alpha[i + 1] / alpha[i], rel=1e-14)
        if i == 0:  # order-0 row is DDIM
            assert r.coefs == pytest.approx((alpha[1] * (rho[1] - rho[0]),), rel=1e-12)


def _poly(deg, rng):
    c = rng.standard_normal(deg + 1)
    return lambda s: np.polyval(c, s)


@pytest.mark.parametrize("s", SCHEDULES, ids=repr)
@pytest.mark.parametrize("variable", ["t", "rho", "logrho"])
def test_eps_rows_exact_for_polynomials(s, variable):
    """With eps a polynomial of degree <= p-1 in the interpolation variable, a p-point step is exact."""
    rng = np.random.default_rng(0)
    t, rho = _grid(s, 7)
    svar = {"t": lambda tt, rr: tt, "rho": lambda tt, rr: rr, "logrho": lambda tt, rr: np.log(rr)}[variable]
    for points in (1, 2, 3, 4):
        p = _poly(points - 1, rng)
        pts = points_per_step(len(t) - 1, points)
        rows = eps_ab_rows(s, t, rho, pts, variable)
        alpha = s.alpha_from_rho(rho)
        for i, (r, k) in enumerate(zip(rows, pts)):
            if k < points:
                continue
            approx = sum(c / alpha[i + 1] * p(svar(t[i - j], rho[i - j])) for j, c in enumerate(r.coefs))
            f = lambda rr: p(svar(float(s.t_from_rho(rr)), rr))
            brk = s.rho(s.knots(t[i + 1], t[i])) if s.discrete else None
            exact = quad(f, rho[i], rho[i + 1], points=None if brk is None or len(brk) == 0 else np.sort(brk)[:50],
                         limit=400, epsabs=1e-13, epsrel=1e-12)[0] if brk is None or len(brk) < 50 else \
                sum(quad(f, a, b, epsabs=1e-14, epsrel=1e-12)[0]
                    for a, b in zip(np.r_[rho[i], np.sort(brk)[::-1]], np.r_[np.sort(brk)[::-1], rho[i + 1]]))
            assert approx == pytest.approx(exact, rel=1e-9, abs=1e-10), (points, i)


@pytest.mark.parametrize("s", SCHEDULES, ids=repr)
def test_data_rows_invariants_and_exactness(s):
    rng = np.random.default_rng(1)
    t, rho = _grid(s, 7)
    lam = -np.log(rho)
    alpha = s.alpha_from_rho(rho)
    sigma = alpha * rho
    for points in (1, 2, 3):
        pts = points_per_step(len(t) - 1, points)
        rows = data_ab_rows(s, rho, pts)
        p = _poly(points - 1, rng)
        for i, (r, k) in enumerate(zip(rows, pts)):
            h = lam[i + 1] - lam[i]
            assert sum(r.coefs) / alpha[i + 1] == pytest.approx(-np.expm1(-h), rel=1e-10)
            assert r.state_coef == pytest.approx(sigma[i + 1] / sigma[i], rel=1e-13)
            if k == points:
                approx = sum(c / alpha[i + 1] * p(lam[i - j]) for j, c in enumerate(r.coefs))
                exact = quad(lambda u: np.exp(u - lam[i + 1]) * p(u), lam[i], lam[i + 1], epsabs=1e-14)[0]
                assert approx == pytest.approx(exact, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("s", SCHEDULES, ids=repr)
def test_dpm_solver_pp_rows_exact_where_published_formulas_are(s):
    """Measured facts of DPM-Solver++ multistep: every row sums to the DDIM weight; 2M-heun equals the exact
    lambda-AB step; 2M-midpoint is not exact for linear D; 3M is exact for linear D but misses a quadratic
    (its D2 weight phi_3 is half the exact integral), while the exact lambda-AB 3-point row is not."""
    t, rho = _grid(s, 12)
    t, rho = t[:-1], rho[:-1]  # keep rho > 0 (the final jump to rho = 0 is the same first-order step)
    alpha = s.alpha_from_rho(rho)
    with np.errstate(divide="ignore"):
        lam = -np.log(rho)
    pts = points_per_step(len(t) - 1, 3)
    mid3, heun2 = dpmsolver_rows(s, rho, pts), dpmsolver_rows(s, rho, points_per_step(len(t) - 1, 2), "heun")
    mid2, exact2 = dpmsolver_rows(s, rho, points_per_step(len(t) - 1, 2)), data_ab_rows(s, rho, points_per_step(len(t) - 1, 2))
    exact3 = data_ab_rows(s, rho, pts)
    for a, b in zip(heun2, exact2):
        np.testing.assert_allclose(a.coefs, b.coefs, rtol=1e-9, atol=1e-14)
    i = 6

    def err(row, p):
        approx = sum(c / alpha[i + 1] * p(lam[i - j]) for j, c in enumerate(row.coefs))
        exact = quad(lambda u: np.exp(u - lam[i + 1]) * p(u), lam[i], lam[i + 1], epsabs=1e-14)[0]
        return abs(approx - exact) / abs(exact)
    for rows in (mid3, mid2, heun2):
        assert sum(rows[i].coefs) / alpha[i + 1] == pytest.approx(-np.expm1(-(lam[i + 1] - lam[i])), rel=1e-10)
    lin, quadratic = (lambda u: 0.3 + 1.7 * u), (lambda u: 0.3 + 1.7 * u - 0.9 * u ** 2)
    assert err(heun2[i], lin) < 1e-9 and err(mid3[i], lin) < 1e-9 and err(exact3[i], quadratic) < 1e-9
    assert err(mid2[i], lin) > 1e-4 and err(mid3[i], quadratic) > 1e-4
    with pytest.raises(ValueError, match="solver_type"):
        dpmsolver_rows(s, rho, pts, "bogus")


def test_ipndm_fixed_weights_equal_exact_ab_on_uniform_rho_grid():
    s = VESchedule(0.002, 80.0)
    rho = np.linspace(40.0, 1.0, 9)
    t = s.t_from_rho(rho)
    pts = points_per_step(8, 4)
    fixed = ipndm_rows(s, rho, pts)
    exact = eps_ab_rows(s, t, rho, pts, "rho")  # = ipndm_v
    for a, b in zip(fixed, exact):
        np.testing.assert_allclose(a.coefs, b.coefs, rtol=1e-12)


def test_points_per_step_warm_start_and_lower_order_final():
    assert points_per_step(6, 3) == [1, 2, 3, 3, 3, 3]
    assert points_per_step(6, 3, lower_order_final=True) == [1, 2, 3, 3, 2, 1]
    assert points_per_step(2, 4, lower_order_final=True) == [1, 1]
