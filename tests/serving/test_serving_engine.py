"""The step-level batching engine: a request batched with others equals the same request run alone by
``deis_fast.Sampler`` (bitwise on a batch-invariant network, within the measured batch-size noise on the digits
U-Net), requests join at any tick, bad requests are refused at submit, one request's failure stays its own."""
import threading
import time

import pytest
import torch

import deis_fast
from deis_fast.cli.common import initial_noise
from deis_fast.serving import Engine, GenerateRequest, QueueFullError, RequestError, RequestFailed
from deis_fast.testing import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VP = deis_fast.VPSchedule.discrete("linear")
METHODS = ["tab3", "ddim", "dpmpp2", "ipndm4", "unipc3", "ddim_eta", "dpmpp_2m_sde", "pfdiff"]
NFES = [5, 8, 10]


def _conditional_model():
    """An exact class-conditional eps model: y = 1 the mixture mc, y = 0 the mixture mu, blended per row; y = -1
    raises (a model error), y = -2 returns NaN (a non-finite output). Batch-invariant: every op is per row."""
    mc = GaussianMixture.random(4, 16, 0.5, seed=1).model(VP)
    mu = GaussianMixture.random(4, 16, 0.5, seed=2).model(VP)

    def model(x, t, y):
        if (y == -1).any():
            raise ValueError("label -1 is poison")
        yy = y.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        out = yy * mc(x, t) + (1 - yy) * mu(x, t)
        return torch.where(yy == -2, torch.full_like(out, float("nan")), out)
    return model


def _mixed_requests(n_req: int, cond: bool) -> list[GenerateRequest]:
    """Different methods, NFE, seeds, sample counts; every fourth with classifier-free guidance."""
    reqs = []
    for i in range(n_req):
        n = 1 + i % 2
        g = 2.5 if i % 4 == 0 else None
        c = {"y": torch.full((n,), float(i % 2), dtype=torch.float64)} if cond else {}
        u = ({"y": torch.zeros(1, dtype=torch.float64)} if cond else {}) if g is not None else None
        reqs.append(GenerateRequest(seeds=tuple(range(100 * i, 100 * i + n)), method=METHODS[i % len(METHODS)],
                                    nfe=NFES[i % len(NFES)], cond=c, uncond=u, guidance_scale=g))
    return reqs


def _alone(model, schedule, prediction, r: GenerateRequest, shape, dtype, extra_seeds=()) -> torch.Tensor:
    """The request run by itself through deis_fast.Sampler (optionally with other samples in the same batch)."""
    s = deis_fast.Sampler(model, schedule, r.method, r.nfe, prediction=prediction, guidance_scale=r.guidance_scale,
                          uncond=r.uncond)
    noise, gens = initial_noise(shape, list(r.seeds) + list(extra_seeds), dtype=dtype)
    cond = dict(r.cond)
    if extra_seeds:
        cond = {k: torch.cat([v, v[:1].expand(len(extra_seeds), *v.shape[1:])]) for k, v in cond.items()}
    return s(noise, generator=gens if s.plan.num_noise else None, **cond)[:len(r.seeds)]


def _submit_staggered(engine: Engine, reqs: list[GenerateRequest]) -> list[torch.Tensor]:
    """Submit from two client threads while the engine runs, so that requests join at different ticks."""
    tickets = [None] * len(reqs)

    def client(idx):
        for i in idx:
            tickets[i] = engine.submit(reqs[i])
            time.sleep(0.001)
    threads = [threading.Thread(target=client, args=(range(k, len(reqs), 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [tk.result(timeout=120) for tk in tickets]


def test_32_concurrent_requests_equal_each_alone_bitwise_on_a_batch_invariant_model():
    model = _conditional_model()
    reqs = _mixed_requests(32, cond=True)
    engine = Engine(model, VP, "eps", shape=(16,), dtype=torch.float64, max_batch=12).start()
    try:
        outs = _submit_staggered(engine, reqs)
    finally:
        engine.shutdown()
    assert engine.ticks > max(NFES)        # max_batch 12 < the 48 rows asked: requests joined at different ticks
    for r, got in zip(reqs, outs):
        ref = _alone(model, VP, "eps", r, (16,), torch.float64)
        assert torch.equal(got, ref), (r.method, r.nfe, r.guidance_scale, (got - ref).abs().max().item())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


@pytest.fixture(scope="module")
def digits():
    return deis_fast.load_model("digits")


def test_32_concurrent_requests_equal_each_alone_within_the_digits_models_batch_noise(digits):
    m = digits
    # the U-Net's own batch-size noise on this CPU: the same rows in batches of different sizes differ slightly
    x = torch.randn(16, *m.shape, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(10.0, 990.0, 16)
    with torch.no_grad():
        whole = m.model(x, t)
        single = torch.cat([m.model(x[i:i + 1], t[i:i + 1]) for i in range(16)])
    per_call = _relative(single, whole)
    reqs = _mixed_requests(32, cond=False)     # CFG on an unconditional model: doubled rows, u = c
    engine = Engine(m.model, m.schedule, m.prediction, shape=m.shape, max_batch=24).start()
    try:
        outs = _submit_staggered(engine, reqs)
    finally:
        engine.shutdown()
    # that noise through a whole solve: each request alone vs. the same request batched with 30 other samples
    alone = [_alone(m.model, m.schedule, m.prediction, r, m.shape, torch.float32) for r in reqs]
    padded = [_alone(m.model, m.schedule, m.prediction, r, m.shape, torch.float32, range(5000, 5030)) for r in reqs]
    solve_noise = max(_relative(p, a) for p, a in zip(padded, alone))
    tol = 4 * solve_noise
    errs = [_relative(got, ref) for got, ref in zip(outs, alone)]
    print(f"digits batch-size noise: per call {per_call:.2e}, per solve {solve_noise:.2e}; engine vs alone max "
          f"{max(errs):.2e} (tolerance {tol:.2e})")
    assert 0 < solve_noise < 1e-4             # the network is not batch-invariant here, and only barely so
    assert max(errs) <= tol, errs


def test_requests_join_mid_run_and_leave_when_their_plan_ends():
    model = _conditional_model()
    engine = Engine(model, VP, "eps", shape=(16,), dtype=torch.float64, max_batch=64)
    y1 = {"y": torch.ones(1, dtype=torch.float64)}
    long = engine.submit(GenerateRequest(seeds=(1,), method="tab3", nfe=10, cond=y1))
    for _ in range(4):
        engine.step()
    short = engine.submit(GenerateRequest(seeds=(2,), method="ddim", nfe=3, cond=y1))
    rows = []
    while engine.step():
        rows.append(engine.last_batch_rows)
    assert rows == [2, 2, 2, 1, 1, 1]          # joined at tick 5, left after its 3 NFE; the long one went on
    assert engine.ticks == 10
    for tk in (long, short):
        assert torch.equal(tk.result(), _alone(model, VP, "eps", tk.request, (16,), torch.float64))


def test_bad_requests_are_refused_at_submit_with_a_clear_message(digits, tmp_path):
    m = digits
    engine = Engine(m.model, m.schedule, m.prediction, shape=m.shape, max_batch=8, max_queue=2, max_nfe=50)
    bad = {"unknown method": (GenerateRequest(method="nope"), "unknown method 'nope'"),
           "NFE too large": (GenerateRequest(nfe=51), "from 1 to 50"),
           "NFE zero": (GenerateRequest(nfe=0), "from 1 to 50"),
           "oversized batch": (GenerateRequest(seeds=tuple(range(9))), "at most 8 rows"),
           "oversized with CFG": (GenerateRequest(seeds=tuple(range(5)), guidance_scale=2.0, uncond={}), "doubled"),
           "shape": (GenerateRequest(shape=(1, 7, 7)), "cannot take shape [1, 7, 7]"),
           "tuned": (GenerateRequest(tuned=str(tmp_path / "missing.json")), "does not exist"),
           "seeds": (GenerateRequest(seeds=(-1,)), "seeds must be"),
           "cond rows": (GenerateRequest(seeds=(1, 2, 3), cond={"y": torch.zeros(2)}), "1 or 3 rows"),
           "CFG without uncond": (GenerateRequest(guidance_scale=3.0), "uncond")}
    for what, (req, msg) in bad.items():
        with pytest.raises(RequestError, match=msg.replace("[", r"\[").replace("]", r"\]")) as e:
            engine.submit(req)
        assert "\n" not in str(e.value), what
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RequestError, match="tuned: .*cannot read a tuned file"):
        engine.submit(GenerateRequest(tuned=str(tmp_path / "bad.json")))
    assert engine.submit(GenerateRequest(shape=(1, 16, 16), nfe=2))   # another shape the U-Net can take
    engine.submit(GenerateRequest(seeds=(1,), nfe=2))
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(GenerateRequest(seeds=(2,), nfe=2))
    assert engine.run_until_idle() == 2 and engine.queue_depth == 0   # two shapes: two calls per tick


def test_a_model_error_or_non_finite_output_fails_only_that_request():
    model = _conditional_model()
    engine = Engine(model, VP, "eps", shape=(16,), dtype=torch.float64, max_batch=64)
    reqs = _mixed_requests(8, cond=True)
    poison = {2: -1.0, 5: -2.0}        # request 2 makes the model raise, request 5 makes it return NaN
    for i, v in poison.items():
        r = reqs[i]
        reqs[i] = GenerateRequest(seeds=r.seeds, method=r.method, nfe=r.nfe, cond={"y": torch.tensor([1.0, v],
                                  dtype=torch.float64)[:len(r.seeds)] if len(r.seeds) == 2 else
                                  torch.tensor([v], dtype=torch.float64)}, uncond=r.uncond,
                                  guidance_scale=r.guidance_scale)
    tickets = [engine.submit(r) for r in reqs]
    engine.run_until_idle()
    for i, (r, tk) in enumerate(zip(reqs, tickets)):
        if i in poison:
            with pytest.raises(RequestFailed, match="poison" if poison[i] == -1 else "NaN or Inf"):
                tk.result()
        else:
            assert torch.equal(tk.result(), _alone(model, VP, "eps", r, (16,), torch.float64))


def test_cancel_drops_a_request_queued_or_running():
    model = _conditional_model()
    engine = Engine(model, VP, "eps", shape=(16,), dtype=torch.float64, max_batch=2)
    y = {"y": torch.ones(1, dtype=torch.float64)}
    running = engine.submit(GenerateRequest(seeds=(1, 2), nfe=20, cond=y))
    queued = engine.submit(GenerateRequest(seeds=(3,), nfe=20, cond=y))
    engine.step()
    engine.step()
    assert engine.active_requests == 1 and engine.queue_depth == 1
    assert running.cancel() and queued.cancel()
    assert not engine.step()                   # both gone at the next tick: no more network calls
    assert engine.ticks == 2 and engine.active_requests == 0 and engine.queue_depth == 0


def test_shutdown_drains_queued_and_running_requests():
    model = _conditional_model()
    engine = Engine(model, VP, "eps", shape=(16,), dtype=torch.float64, max_batch=2).start()
    y = {"y": torch.ones(1, dtype=torch.float64)}
    tickets = [engine.submit(GenerateRequest(seeds=(i,), nfe=10, cond=y)) for i in range(6)]
    assert engine.shutdown(drain=True, timeout=60)
    assert all(tk.future.done() and tk.result().shape == (1, 16) for tk in tickets)
    with pytest.raises(Exception, match="shutting down"):
        engine.submit(GenerateRequest(seeds=(9,), nfe=10, cond=y))
