import numpy as np
import pytest
import deis_fast

from deis_fast.core.grids import GRIDS, make_grid
from deis_fast.core.schedules import VESchedule, VPSchedule

VP = VPSchedule.discrete("linear")


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("s", [VP, VPSchedule.linear(), VESchedule(0.002, 80.0)], ids=repr)
def test_named_grids(grid, s):
    t = make_grid(s, grid, 7)
    assert t.shape == (8,) and t[0] == s.t_max and t[-1] == s.t_min
    assert np.all(np.diff(t) < 0)


def test_grid_shapes_match_definitions():
    t = make_grid(VP, "logsnr", 4)
    lam = VP.lam(t)
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)
    t = make_grid(VP, "time_quadratic", 4)
    np.testing.assert_allclose(np.diff(np.sqrt(t)), np.diff(np.sqrt(t))[0], rtol=1e-12)
    ve = VESchedule(0.002, 80.0)
    r = ve.rho(make_grid(ve, "karras", 5, karras_rho=7.0))
    np.testing.assert_allclose(np.diff(r ** (1 / 7)), np.diff(r ** (1 / 7))[0], rtol=1e-9)


def test_custom_grids_and_range():
    t = make_grid(VP, [999, 500.5, 10], None)
    assert t.tolist() == [999, 500.5, 10]
    t = make_grid(VP, {"rho": [100.0, 1.0, 0.1]}, 2)
    np.testing.assert_allclose(VP.rho(t), [100.0, 1.0, 0.1], rtol=1e-10)
    t = make_grid(VP, "logsnr", 3, t_start=800, t_end=20)
    assert t[0] == 800 and t[-1] == 20


def test_bad_grids_raise():
    with pytest.raises(ValueError, match="valid grids"):
        make_grid(VP, "cosine-ish", 5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_grid(VP, [999, 10, 500], None)
    with pytest.raises(ValueError, match="outside the schedule"):
        make_grid(VP, [1500, 10], None)
    with pytest.raises(ValueError, match="outside the schedule"):
        make_grid(VP, "logsnr", 5, t_start=2000)
    with pytest.raises(ValueError, match="t_start"):
        make_grid(VP, "logsnr", 5, t_start=10, t_end=500)


def test_integer_rounding_removes_duplicates_with_warning():
    with pytest.warns(UserWarning, match="duplicate"):
        t = make_grid(VP, [999, 10.2, 10.4, 0], None, integer_timesteps=True)
    assert t.tolist() == [999, 10, 0]


def test_schedule_fingerprint_tells_schedules_apart():
    """Equal schedules share a fingerprint; another beta schedule, shift or sigma range does not."""
    fp = deis_fast.schedule_fingerprint
    assert fp(deis_fast.VPSchedule.discrete("linear")) == fp(deis_fast.VPSchedule.discrete("linear"))
    prints = {fp(s) for s in (deis_fast.VPSchedule.discrete("linear"), deis_fast.VPSchedule.discrete("scaled_linear"),
                              deis_fast.VPSchedule.linear(), deis_fast.VESchedule(), deis_fast.VESchedule(0.002, 40.0),
                              deis_fast.FlowSchedule(), deis_fast.FlowSchedule(shift=3.0))}
    assert len(prints) == 7
