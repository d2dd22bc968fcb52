import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def small_mixture():
    from deis_fast.testing import GaussianMixture
    return GaussianMixture.random(4, 8, 0.5, seed=3)


@pytest.fixture(scope="session")
def small_noise():
    return torch.randn(32, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
