"""The static executor, observed with a TorchDispatchMode: what a sampling call dispatches outside the network.

After warm-up (the first call), a call with ``out=`` dispatches exactly one ``deis_fast.combine`` per
Combine (plus one per model-output conversion), no allocation, no host sync; ``check_finite=True``
adds one in-place sum per NFE (no allocation) and exactly one host sync at the end.
"""
from collections import Counter

import pytest
import torch

import deis_fast
from deis_fast.testing import DispatchRecorder

COMBINE = "deis_fast.combine.default"


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, y=None):
        h = torch.nn.functional.silu(self.c1(x) + (t / 1000).view(-1, 1, 1, 1).to(x.dtype))
        if y is not None:
            h = h * (1 + 0.1 * y.view(-1, 1, 1, 1).to(x.dtype))
        return self.c2(h)


@pytest.fixture(scope="module")
def net():
    return TinyNet().eval()


def _noise(b=2):
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _record(sampler, rec, noise, out, **cond):
    with torch.no_grad():
        sampler(noise, out=out, **cond)       # warm-up (first call: output-buffer detection)
        rec.clear()
        with rec:
            sampler(noise, out=out, **cond)
    return rec


@pytest.mark.parametrize("method,nfe", [("tab3", 10), ("dpmpp3", 10), ("ddim_eta", 10), ("rho_rk4", 12),
                                        ("pfdiff", 10), ("ipndm4", 10)])
def test_loop_dispatches_one_combine_per_combine_and_allocates_nothing(net, method, nfe):
    rec = DispatchRecorder()
    s = deis_fast.Sampler(rec.mark(net), method=method, nfe=nfe, check_finite=False)
    x = _noise()
    _record(s, rec, x, torch.empty_like(x))
    plan = s.plan
    conversions = plan.nfe if any(e.target != "eps" for e in plan.evals) else 0
    counts = Counter(rec.ops)
    assert counts[COMBINE] == len(plan.combines) + conversions
    # outside the combines: the noise copied into `out`, and the in-place step-noise draw (stochastic)
    assert counts - Counter({COMBINE: counts[COMBINE]}) == Counter(
        {"aten.copy_.default": 1, **({"aten.normal_.default": 1} if plan.num_noise else {})})
    assert rec.allocations == [] and rec.syncs == []
    assert len(rec.model_ops) > 0, "the network's own ops are recorded separately"


def test_eps_model_tab3_dispatches_one_op_per_nfe_in_place(net):
    rec = DispatchRecorder()
    s = deis_fast.Sampler(rec.mark(net), method="tab3", nfe=10, check_finite=False)
    x = _noise()
    _record(s, rec, x, x)      # out=noise: fully in place
    assert rec.ops == [COMBINE] * 10 and rec.allocations == [] and rec.syncs == []


def test_finite_check_is_in_place_with_one_sync_at_the_end(net):
    rec = DispatchRecorder()
    s = deis_fast.Sampler(rec.mark(net), method="tab3", nfe=10, check_finite=True)
    x = _noise()
    _record(s, rec, x, torch.empty_like(x))
    counts = Counter(rec.ops)
    assert counts[COMBINE] == 10
    assert counts["aten.sum.IntList_out"] == 10 + 3          # input, each NFE, result, total
    assert rec.allocations == []
    assert rec.syncs == ["aten._local_scalar_dense.default"] and rec.ops[-1] == rec.syncs[0]
    assert len(rec.ops) - 1 <= 2 * 10 + 4                   # <= 2 ops per NFE outside the network


@pytest.mark.parametrize("scale", [3.0, "tensor"])
def test_guided_step_ops(net, scale):
    rec = DispatchRecorder()
    w = torch.tensor(3.0) if scale == "tensor" else scale
    s = deis_fast.Sampler(rec.mark(net), method="tab3", nfe=10, check_finite=False, guidance_scale=w,
                          uncond={"y": torch.zeros(2)})
    x = _noise()
    _record(s, rec, x, torch.empty_like(x), y=torch.ones(2))
    counts = Counter(rec.ops)
    # per NFE: the doubled batch (cat out=), its split (views), the guided combination, the step Combine
    assert counts["aten.cat.out"] == 10 and counts["aten.split.Tensor"] == 10
    if scale == "tensor":
        assert counts["aten.lerp.Tensor_out"] == 10 and counts[COMBINE] == 10
    else:
        assert counts[COMBINE] == 20
    # the only allocation: [cond; uncond] batched once per call, not per step
    assert rec.allocations == ["aten.cat.default"]


def test_tensor_guidance_changes_in_place(net):
    # float64 so that lerp's rounding (vs the float-scale Combine) stays far below the tolerance
    import copy
    net64 = copy.deepcopy(net).double()
    w = torch.tensor(2.0)
    kw = dict(method="tab3", nfe=6, uncond={"y": torch.zeros(2)})
    s_t = deis_fast.Sampler(net64, guidance_scale=w, **kw)
    x = _noise().double()
    with torch.no_grad():
        for v in (2.0, 5.5):
            w.fill_(v)
            ref = deis_fast.Sampler(net64, guidance_scale=v, **kw)(x, y=torch.ones(2))
            torch.testing.assert_close(s_t(x, y=torch.ones(2)), ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(s_t(x, y=torch.ones(2), guidance_scale=v), ref, rtol=0, atol=0)


def test_step_noise_drawn_in_place_matches_randn(net):
    s = deis_fast.Sampler(net, method="ddim_eta", nfe=5)
    x = _noise()
    with torch.no_grad():
        a = s(x, generator=torch.Generator().manual_seed(7))
        z = torch.randn((s.plan.num_noise,) + tuple(x.shape), generator=torch.Generator().manual_seed(7))
        b = s(x, step_noise=z)
        s64 = deis_fast.Sampler(lambda x, t: net(x.float(), t.float()).double(), method="ddim_eta", nfe=5)
        c = s64(x.double(), generator=torch.Generator().manual_seed(7))
        d = s64(x.double(), step_noise=z.double())
    assert torch.equal(a, b) and torch.equal(c, d)


def test_out_argument(net):
    s = deis_fast.Sampler(net, method="tab3", nfe=4)
    x = _noise()
    with torch.no_grad():
        ref = s(x)
        out = torch.empty_like(x)
        assert s(x, out=out) is out and torch.equal(out, ref)
        y = x.clone()
        assert s(y, out=y) is y and torch.equal(y, ref)
        with pytest.raises(ValueError, match="out must be"):
            s(x, out=torch.empty(3, 3, 8, 8))
