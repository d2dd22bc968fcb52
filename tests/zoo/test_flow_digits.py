"""The embedded rectified-flow digits model is a real flow model: sampled from t = 1 with a fine solver it makes
digit-like images (statistics close to the training data, far from those of the noise), and few-step methods
converge to that fine solution as NFE grows."""
import pytest
import torch

import deis_fast
from deis_fast.zoo import digits as D
from deis_fast.testing import relative_errors

N_STATS, N_CONV = 128, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # two threads: ~20x slower on the loaded 2-core box


@pytest.fixture(scope="module")
def flow():
    kind = D.DIGITS_KINDS["flow"]
    return D.load_digits_model(kind="flow"), kind.schedule()


def noise(n: int) -> torch.Tensor:
    return deis_fast.randn_per_sample((n, *D.DIGITS_SHAPE), range(n))


def solve(flow, z: torch.Tensor, method: str, nfe: int) -> torch.Tensor:
    model, sched = flow
    with torch.no_grad():
        return deis_fast.sample(model, z, sched, method, nfe, prediction="flow")


@pytest.fixture(scope="module")
def fine(flow):
    """Fine reference from t = 1: rho_rk4 at 240 NFE (60 steps) on the FlowMatch grid."""
    return solve(flow, noise(N_CONV), "rho_rk4", 240)


def digit_statistics(x: torch.Tensor, data: torch.Tensor) -> dict[str, float]:
    """Distances of a sample set to the data: RMS difference of the per-pixel mean and std images, the median
    nearest-neighbour RMS distance to the data set (relative to the data's own leave-one-out value), and the
    fraction of pixels outside the data range [-1, 1] by more than 0.25."""
    x, data = x.reshape(x.shape[0], -1).double(), data.reshape(data.shape[0], -1).double()
    d = torch.cdist(x, data) / x.shape[1] ** 0.5
    dd = torch.cdist(data[:512], data) / x.shape[1] ** 0.5
    dd.fill_diagonal_(float("inf"))
    return {"mean": float((x.mean(0) - data.mean(0)).pow(2).mean().sqrt()),
            "std": float((x.std(0) - data.std(0)).pow(2).mean().sqrt()),
            "nn": float(d.min(1).values.median() / dd.min(1).values.median()),
            "out_of_range": float((x.abs() > 1.25).double().mean())}


LIMITS = {"mean": 0.1, "std": 0.1, "nn": 2.0, "out_of_range": 0.01}


def test_fine_samples_have_digit_statistics(flow):
    pytest.importorskip("sklearn", reason="needs scikit-learn: pip install -e '.[test]'")
    data = D.load_digits_data()
    z = noise(N_STATS)
    got, base = digit_statistics(solve(flow, z, "rho_rk4", 80), data), digit_statistics(z, data)
    for k, lim in LIMITS.items():
        assert got[k] < lim < base[k], (k, got, base)     # the noise itself fails every limit


def test_fine_reference_is_converged(flow, fine):
    # rho_rk4 converges at order >= 2 on this model: half the NFE is within 2e-3, so 240 NFE is within ~5e-4
    assert float(relative_errors(solve(flow, noise(N_CONV), "rho_rk4", 120), fine).median()) < 2e-3


@pytest.mark.parametrize("method", ["ddim", "tab2", "rhoab3", "ipndm4"])
def test_few_step_methods_converge_to_the_fine_solution(method, flow, fine):
    errs = [float(relative_errors(solve(flow, noise(N_CONV), method, n), fine).median()) for n in (4, 8, 16)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < (0.06 if method == "ddim" else 0.025), errs
    if method == "ddim":   # first order: doubling the NFE halves the error
        assert 1.6 < errs[1] / errs[2] < 2.5, errs


def test_benchmark_problem_for_the_flow_model():
    """benchmarks/flow_yardstick.py --models digits: float64 flow model, reference from t = 1 with prediction flow."""
    from deis_fast.cli.bench import digits_problem
    from deis_fast.core.schedules import FlowSchedule
    prob = digits_problem(seeds=1, per_seed=2, reference_nfe=8, kind="flow")
    assert prob.prediction == "flow" and isinstance(prob.schedule, FlowSchedule) and "flow" in prob.name
    (z, ref), = prob.sets
    assert z.dtype == ref.dtype == torch.float64 and z.shape == (2, *D.DIGITS_SHAPE)
    torch.testing.assert_close(ref, deis_fast.sample(prob.model, z, prob.schedule, "rho_rk4", 8, prediction="flow"))
