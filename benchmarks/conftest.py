"""Latency suite configuration: ``--bench-*`` options (or ``DEIS_FAST_BENCH_*`` env vars) and the
parametrization they drive.

    python -m pytest benchmarks --benchmark-only --benchmark-autosave          # CPU
    python -m pytest benchmarks --benchmark-only --bench-device cuda           # CUDA, fp16 + bf16, batch 1 and 8
    python -m pytest benchmarks --benchmark-disable -q                         # every body once, as a test (CI)
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("deis_fast latency suite")
    for name, (env, text) in harness.OPTIONS.items():
        group.addoption(f"--bench-{name}", default=None, help=f"{text}; env {env}")


def pytest_configure(config: pytest.Config) -> None:
    try:
        config._deis_fast_bench = harness.config_from(lambda name: config.getoption(f"--bench-{name}"))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if config._deis_fast_bench.threads:
        torch.set_num_threads(config._deis_fast_bench.threads)


@pytest.fixture(scope="session")
def cfg(pytestconfig: pytest.Config) -> harness.BenchConfig:
    return pytestconfig._deis_fast_bench


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg: harness.BenchConfig = metafunc.config._deis_fast_bench
    axes = {"dtype_name": (cfg.dtypes, None), "batch": (cfg.batches, lambda b: f"b{b}"),
            "net_name": (cfg.nets, None), "guided": (cfg.cfgs, lambda g: "cfg" if g else "nocfg")}
    for name, (values, ids) in axes.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=ids)


@pytest.fixture
def dtype(dtype_name: str) -> torch.dtype:
    return harness.DTYPES[dtype_name]


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def nets(cfg: harness.BenchConfig):
    """``nets(name, dtype)``: one network per (name, dtype) for the whole session."""
    cache: dict = {}

    def get(name: str, dtype: torch.dtype):
        if (name, dtype) not in cache:
            cache[name, dtype] = harness.make_net(name, cfg.device, dtype)
        return cache[name, dtype]
    return get


# the fine solve each network's results are checked against: (dtype, NFE of rho_rk4 on the logSNR grid)
REFERENCE_SOLVE = {"digits": (torch.float64, 100), "unet": (torch.float32, 80)}


@pytest.fixture(scope="session")
def references(nets):
    """``references(net_name, noise)``: the ODE endpoint from ``noise`` by a fine rho_rk4 solve of the same
    network (``REFERENCE_SOLVE``), cached per network and noise."""
    cache: dict = {}

    def get(net_name: str, noise: torch.Tensor) -> torch.Tensor:
        key = (net_name, tuple(noise.shape), float(noise.double().sum()))
        if key not in cache:
            dtype, nfe = REFERENCE_SOLVE[net_name]
            with torch.inference_mode():
                cache[key] = harness.fine_reference(nets(net_name, dtype), noise.to(dtype), nfe)
        return cache[key]
    return get
