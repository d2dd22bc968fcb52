"""Fast tests for the embedded models (deis_fast.zoo.digits): the eps U-Net ('digits') and the rectified-flow
U-Net ('flow'), same architecture, both shipped as safetensors."""
import json
import os
import pickle
import re
import struct
import tokenize

import numpy as np
import pytest
import torch

import deis_fast
from deis_fast.zoo import digits as D


@pytest.fixture(scope="module")
def model():
    return D.load_digits_model()


def test_constants():
    assert D.DIGITS_SCHEDULE == "linear"
    assert D.DIGITS_SHAPE == (1, 8, 8)
    assert D.DIGITS_NUM_TRAIN_TIMESTEPS == 1000
    betas = D.digits_betas()
    assert betas.shape == (1000,)
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(0.02)
    ac = D.digits_alphas_cumprod()
    torch.testing.assert_close(ac, torch.cumprod(1 - betas, 0))


@pytest.mark.parametrize("kind", list(D.DIGITS_KINDS))
def test_weights_file_is_safetensors_not_pickle(kind):
    path = D.DIGITS_KINDS[kind].weights
    assert os.path.isfile(path)
    size = os.path.getsize(path)
    assert size <= 5 * 1024 * 1024
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        assert 0 < n < size
        header = json.loads(f.read(n).decode("utf-8"))
    assert "__metadata__" in header
    assert header["__metadata__"]["model"] == "DigitsUNet"
    assert header["__metadata__"]["prediction"] == {"digits": "epsilon", "flow": "flow"}[kind]
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    # pickle/zip files start with b"\x80" or b"PK"; safetensors starts with the header length
    assert head[:1] != b"\x80" and head[:2] != b"PK"


@pytest.mark.parametrize("kind", list(D.DIGITS_KINDS))
def test_load_does_not_use_pickle(kind, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle-based loading used")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    m = D.load_digits_model(kind=kind)
    assert not m.training
    assert all(not p.requires_grad for p in m.parameters())


def test_kinds_and_a_mismatched_weights_file():
    assert D.digits_kind("eps") is D.DIGITS_KINDS["digits"] and D.digits_kind("flow").prediction == "flow"
    assert D.DIGITS_KINDS["flow"].schedule().model_time(1.0) == 1000.0   # network time 1000 t, as FlowMatch
    with pytest.raises(ValueError, match="unknown digits model 've'"):
        D.digits_kind("ve")
    with pytest.raises(ValueError, match="pass the matching kind="):
        D.load_digits_model(path=D.DIGITS_FLOW_WEIGHTS_PATH)          # flow weights loaded as the eps model
    fm, em = D.load_digits_model(kind="flow"), D.load_digits_model()
    assert any(not torch.equal(a, b) for a, b in zip(fm.parameters(), em.parameters()))


def test_training_example_flow_is_the_rectified_flow_interpolation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    xt, mt, target = D.training_example("flow", x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(xt[i], (1 - ti) * x0[i] + ti * eps[i])
    torch.testing.assert_close(mt, 1000 * t)
    torch.testing.assert_close(target, eps - x0)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[-1], eps[-1])
    # eps objective: the DDPM marginal at integer timesteps
    ti = torch.tensor([0, 10, 500, 999, 999])
    xt, mt, target = D.training_example("eps", x0, eps, ti)
    ac = D.digits_alphas_cumprod()[ti].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ac.sqrt() * x0 + (1 - ac).sqrt() * eps)
    assert torch.equal(target, eps) and mt.tolist() == ti.float().tolist()
    with pytest.raises(ValueError, match="unknown objective"):
        D.training_example("v", x0, eps, t)


def test_param_count_and_size(model):
    n = sum(p.numel() for p in model.parameters())
    assert 50_000 < n <= 5 * 1024 * 1024 // 4
    assert isinstance(model, D.DigitsUNet)


@pytest.mark.parametrize("batch", [1, 5])
def test_forward_fractional_t(model, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *D.DIGITS_SHAPE, generator=g)
    t = torch.rand(batch, generator=g) * 999.0  # non-integer timesteps
    with torch.no_grad():
        y = model(x, t)
    assert y.shape == (batch, 1, 8, 8)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_scalar_t_broadcast(model):
    x = torch.randn(5, *D.DIGITS_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, torch.full((5,), 412.37))
        y0 = model(x, torch.tensor(412.37))
        yf = model(x, 412.37)
    torch.testing.assert_close(y0, ref)
    torch.testing.assert_close(yf, ref)


def test_fractional_t_is_smooth(model):
    x = torch.randn(4, *D.DIGITS_SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(x, 412.0)
        b = model(x, 412.5)
        c = model(x, 413.0)
    # the half-step output lies near the two integer-t outputs
    assert (b - 0.5 * (a + c)).abs().max() < 0.05
    assert (a - c).abs().max() < 0.2


def test_deterministic(model):
    x = torch.randn(3, *D.DIGITS_SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10.0, 500.5, 999.0])
    with torch.no_grad():
        y1 = model(x, t)
        y2 = D.load_digits_model()(x, t)
    assert torch.equal(y1, y2)


def test_dtype_float64():
    m = D.load_digits_model(dtype=torch.float64)
    x = torch.randn(2, *D.DIGITS_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        y = m(x, torch.tensor([3.5, 700.25], dtype=torch.float64))
    assert y.dtype == torch.float64 and y.shape == x.shape


def test_to_image():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    img = D.to_image(x)
    assert img.dtype == np.uint8
    assert img.tolist() == [0, 0, 128, 255, 255]


def test_eps_prediction_beats_zero(model):
    pytest.importorskip("sklearn", reason="needs scikit-learn: pip install -e '.[test]'")
    data = D.load_digits_data()
    assert data.shape == (1797, 1, 8, 8) and data.dtype == torch.float32
    assert float(data.min()) == -1.0 and float(data.max()) == 1.0
    g = torch.Generator().manual_seed(0)
    x0 = data[torch.randperm(data.shape[0], generator=g)[:256]]
    eps = torch.randn(x0.shape, generator=g)
    ac = D.digits_alphas_cumprod(torch.float32)[500]
    xt = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    with torch.no_grad():
        pred = model(xt, torch.full((256,), 500.0))
    ratio = float(((pred - eps) ** 2).mean() / (eps**2).mean())
    assert ratio < 0.5, ratio


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_flow_velocity_prediction_beats_zero(t):
    """The flow model predicts v = eps - x0 on noised real digits far better than 0 does."""
    pytest.importorskip("sklearn", reason="needs scikit-learn: pip install -e '.[test]'")
    data = D.load_digits_data()
    g = torch.Generator().manual_seed(0)
    x0 = data[torch.randperm(data.shape[0], generator=g)[:256]]
    eps = torch.randn(x0.shape, generator=g)
    xt, mt, v = D.training_example("flow", x0, eps, torch.full((256,), t))
    with torch.no_grad():
        pred = D.load_digits_model(kind="flow")(xt, mt)
    ratio = float(((pred - v) ** 2).mean() / (v**2).mean())
    assert ratio < 0.3, ratio


# ---------------------------------------------------------------- no pickle anywhere
PKG = os.path.dirname(deis_fast.__file__)


def _code_tokens(path: str) -> str:
    with open(path, "rb") as f:
        toks = tokenize.tokenize(f.readline)
        return " ".join(t.string for t in toks if t.type not in (tokenize.COMMENT, tokenize.STRING))


def test_package_never_uses_pickle_or_torch_load():
    pattern = re.compile(r"\btorch \. load\b|\bpickle\b|\bcPickle\b|\bdill\b|\bjoblib\b|\bmarshal\b|allow_pickle = True"
                         r"|weights_only = False|\btorch \. serialization\b")
    offenders = []
    for root, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                code = re.sub(r"\s*([.=])\s*", r" \1 ", _code_tokens(path))
                for m in pattern.finditer(code):
                    offenders.append(f"{os.path.relpath(path, PKG)}: {m.group(0)}")
    assert not offenders, offenders
    # every from_pretrained call insists on safetensors
    for root, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                code = _code_tokens(os.path.join(root, name))
                for m in re.finditer(r"from_pretrained \((.*?)\)", code):
                    assert "use_safetensors" in m.group(1), f"{name}: from_pretrained without use_safetensors"


def test_embedded_weights_are_safetensors_and_load_without_torch_load(monkeypatch):
    assets = os.listdir(os.path.join(PKG, "zoo", "assets"))
    assert assets and all(a.endswith(".safetensors") for a in assets if not a.startswith(".")), assets

    def forbidden(*a, **k):
        raise AssertionError("torch.load / pickle used")

    import pickle
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    from deis_fast.zoo.digits import DIGITS_KINDS, load_digits_model
    for kind in DIGITS_KINDS:
        m = load_digits_model(kind=kind)
        assert sum(p.numel() for p in m.parameters()) > 1000


def test_load_model_speaks_python_the_cli_speaks_flags(capsys):
    """Issue 33 item 18: deis_fast.load_model raises a plain ValueError naming its own keywords (no CLI UsageError,
    no --model); the command line wraps it into its flags."""
    import pytest as _pytest

    import deis_fast
    from deis_fast.cli.common import UsageError
    from deis_fast.cli.main import main
    with _pytest.raises(ValueError) as info:
        deis_fast.load_model("mnist")
    assert type(info.value) is ValueError and not isinstance(info.value, UsageError)
    assert "--model" not in str(info.value) and "mnist" in str(info.value)
    assert main(["sample", "--model", "mnist", "--outdir", "unused"]) == 2
    assert "--model 'mnist'" in capsys.readouterr().err
