import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def small_mixture():
    from deis_fast.testing import GaussianMixture
    return GaussianMixture.random(4, 8, 0.5, seed=3)


@pytest.fixture(scope="session")
def discrete_vp_problem():
    """(exact eps model of a 16-d mixture under diffusers' default linear betas, noise [16, 16]) for parity tests."""
    import deis_fast
    from deis_fast.testing import GaussianMixture
    mix = GaussianMixture.random(8, 16, 0.3, seed=7)
    noise = torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return mix.model(deis_fast.VPSchedule.discrete("linear")), noise


@pytest.fixture(scope="session")
def small_noise():
    return torch.randn(32, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny networks (two are several times slower on a shared machine).
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
