"""Sampling results are pinned bit for bit: a refactor of the registry, the plan builders or the executor must
not change any method's output on a fixed seed. The hashes in ``data/pinned_outputs.json`` were written by
``python tests/test_pinned_outputs.py --write`` before the one-core refactor (issue 12); rewrite them only for a
change that is meant to alter results, and say so in the commit."""
from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch

import deis_fast
from deis_fast.solvers import METHOD_SPECS
from deis_fast.testing import GaussianMixture

PINS = os.path.join(os.path.dirname(__file__), "data", "pinned_outputs.json")
SCHEDULES = {"vp": deis_fast.VPSchedule.discrete("linear"), "ve": deis_fast.VESchedule(0.002, 80.0),
             "flow": deis_fast.FlowSchedule(shift=3.0)}
EXTRA = {"pfdiff": dict(method="pfdiff"), "pfdiff31_eta": dict(method="ddim_eta", pfdiff=(3, 1), eta=0.7),
         "tab3_lof": dict(method="tab3", lower_order_final=True), "ddim_eta05": dict(method="ddim_eta", eta=0.5)}


def _cases() -> dict[str, tuple[str, dict]]:
    cases = {f"vp/{m}": ("vp", dict(method=m)) for m in METHOD_SPECS if m in _PINNED_METHODS}
    cases.update({f"vp/{k}": ("vp", v) for k, v in EXTRA.items()})
    for s in ("ve", "flow"):
        for m in ("ddim", "tab3", "logrho3", "dpmpp_2m", "ipndm4", "rho_heun", "ddim_eta", "pfdiff"):
            cases[f"{s}/{m}"] = (s, dict(method=m))
    return cases


# the methods that existed when the pins were written (new methods get pins of their own when they land)
_PINNED_METHODS = ("ddim", "tab0", "rhoab0", "tab1", "rhoab1", "tab2", "rhoab2", "tab3", "rhoab3", "logrho1", "dpmpp1",
                   "logrho2", "dpmpp2", "logrho3", "dpmpp3", "dpmpp_2m", "dpmpp_3m", "ipndm1", "ipndm2", "ipndm3",
                   "ipndm4", "ipndm_v", "rho_euler", "rho_heun", "rho_midpoint", "rho_kutta3", "rho_ralston3",
                   "rho_heun3", "rho_ssprk3", "rho_rk4", "ddim_eta")


def _output(schedule: str, opts: dict) -> torch.Tensor:
    mix = GaussianMixture.random(4, 8, 0.5, seed=3)
    sched = SCHEDULES[schedule]
    noise = deis_fast.randn_per_sample((6, 8), range(6), dtype=torch.float64)
    if schedule == "ve":
        noise = noise * 80.0
    gens = [torch.Generator().manual_seed(100 + i) for i in range(6)]
    model, pred = mix.model(sched), "eps"
    if schedule == "flow":  # a velocity model (an eps model says nothing at t = 1)
        model, pred = mix.model(sched, "flow"), "flow"
    return deis_fast.sample(model, noise, schedule=sched, nfe=12, generator=gens, prediction=pred, **opts)


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:24]


@pytest.fixture(scope="module")
def pins() -> dict:
    with open(PINS) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", sorted(_cases()))
def test_output_is_bitwise_pinned(case, pins):
    schedule, opts = _cases()[case]
    assert case in pins, f"no pin for {case}; add it with `python tests/test_pinned_outputs.py --write`"
    assert _digest(_output(schedule, opts)) == pins[case], f"{case}: the output changed bitwise"


if __name__ == "__main__" and "--write" in sys.argv:
    torch.set_num_threads(1)
    with open(PINS, "w") as f:
        json.dump({k: _digest(_output(s, o)) for k, (s, o) in sorted(_cases().items())}, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {PINS}")
