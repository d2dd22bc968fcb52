"""Tabulated / named step schedules: Align Your Steps (published tables, log-linear interpolation),
kl_optimal, linear_quadratic; core grids, k-diffusion helpers, diffusers scheduler."""
import numpy as np
import pytest
import torch

import deis_fast
from deis_fast.core.grids import AYS_SIGMAS, ays_sigmas, kl_optimal_sigmas, linear_quadratic_fractions
from deis_fast.integrations.k_diffusion import get_sigmas_ays, get_sigmas_kl_optimal, get_sigmas_linear_quadratic

SD = deis_fast.VPSchedule.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_ays_is_the_published_table_at_10_steps_on_sd():
    """SD 1.5's sigma range is the table's: the grid is the table itself."""
    assert np.isclose(SD.rho(SD.t_max), AYS_SIGMAS["ays"][0], rtol=1e-9)
    for name in ("ays", "ays_sdxl"):
        rho = SD.rho(deis_fast.make_grid(SD, name, 10))
        np.testing.assert_allclose(rho, AYS_SIGMAS[name], rtol=1e-8)


def test_ays_loglinear_interpolation():
    tab = np.array(AYS_SIGMAS["ays"])
    np.testing.assert_allclose(ays_sigmas(10), tab, rtol=1e-14)
    np.testing.assert_allclose(ays_sigmas(20)[::2], tab, rtol=1e-12)     # every other point is a table point
    mid = ays_sigmas(20)[1::2]
    np.testing.assert_allclose(mid, np.sqrt(tab[:-1] * tab[1:]), rtol=1e-12)  # geometric means in between
    s5 = ays_sigmas(5)
    assert s5.size == 6 and np.isclose(s5[0], tab[0]) and np.isclose(s5[-1], tab[-1]) and np.all(np.diff(s5) < 0)


def test_ays_other_schedules_keep_the_table_shape():
    vp = deis_fast.VPSchedule.discrete("linear")
    rho = vp.rho(deis_fast.make_grid(vp, "ays_svd", 10))
    u = np.log(rho / rho[0]) / np.log(rho[-1] / rho[0])
    tab = np.log(np.array(AYS_SIGMAS["ays_svd"]))
    np.testing.assert_allclose(u, (tab - tab[0]) / (tab[-1] - tab[0]), atol=1e-10)


def test_kl_optimal_is_uniform_in_arctan_sigma():
    s = kl_optimal_sigmas(7, 0.03, 14.6)
    assert np.isclose(s[0], 14.6) and np.isclose(s[-1], 0.03)
    np.testing.assert_allclose(np.diff(np.arctan(s)), np.diff(np.arctan(s))[0], rtol=1e-10)
    ks = get_sigmas_kl_optimal(8, 0.03, 14.6, dtype=torch.float64)
    assert ks.shape == (9,) and ks[-1] == 0 and torch.allclose(ks[:-1], torch.from_numpy(s))


def test_linear_quadratic_matches_the_published_recipe():
    """Mochi / ComfyUI: linear to 1 - threshold over steps // 2 steps, then a quadratic reaching 0;
    the quadratic part joins the linear one continuously (value and slope)."""
    f = linear_quadratic_fractions(10)
    assert f[0] == 1.0 and f[-1] == 0.0 and f.size == 11 and np.all(np.diff(f) < 0)
    np.testing.assert_allclose(f[:6], 1.0 - 0.025 * np.arange(6) / 5, rtol=1e-12)
    d2 = np.diff(f, 2)
    np.testing.assert_allclose(d2[5:], d2[5], rtol=1e-9)   # constant second difference: quadratic
    assert np.array_equal(linear_quadratic_fractions(1), [1.0, 0.0])
    lq = get_sigmas_linear_quadratic(10, 14.6, dtype=torch.float64)
    assert torch.allclose(lq, torch.from_numpy(f * 14.6))


def test_k_diffusion_ays_replaces_the_last_sigma_by_zero():
    s = get_sigmas_ays(10, "sd15", dtype=torch.float64)
    assert s.shape == (11,) and s[-1] == 0 and torch.allclose(s[:-1], torch.tensor(AYS_SIGMAS["ays"][:-1],
                                                                                       dtype=torch.float64))
    with pytest.raises(ValueError, match="model must be one of"):
        get_sigmas_ays(10, "sd3")


@pytest.mark.parametrize("grid", ["ays", "ays_sdxl", "ays_svd", "kl_optimal", "linear_quadratic"])
def test_named_tabulated_grids_sample(grid, small_mixture, small_noise):
    s = deis_fast.VPSchedule.discrete("linear")
    t = deis_fast.make_grid(s, grid, 8)
    assert t.size == 9 and t[0] == s.t_max and t[-1] == s.t_min and np.all(np.diff(t) < 0)
    x = deis_fast.sample(small_mixture.model(s), small_noise, schedule=s, method="unipc2", nfe=8, grid=grid)
    assert torch.isfinite(x).all()


def test_diffusers_scheduler_accepts_tabulated_grids():
    pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
    from deis_fast.integrations.diffusers import DEISFastScheduler
    sch = DEISFastScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, method="unipc3",
                            grid="ays", timestep_type="float")
    sch.set_timesteps(10)
    rho = SD.rho(sch.timesteps.double().numpy())
    np.testing.assert_allclose(rho, AYS_SIGMAS["ays"][:-1], rtol=1e-7)
