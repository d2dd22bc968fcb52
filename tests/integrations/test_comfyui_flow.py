"""deis_fast on ComfyUI's flow-model samplings (ModelSamplingFlux with FLUX's mu, ModelSamplingSD3, AuraFlow, the
flow checkpoints' ModelSamplingDiscreteFlow): every KSampler entry and every DEIS-fast Sampler method, on every
scheduler in KSampler's list, through comfy.sample.sample and SamplerCustomAdvanced (tests/comfyui_flow_checks.py
in a temporary ComfyUI copy, as tests/integrations/test_comfyui.py)."""

import pytest

from _comfyui_common import run_in_comfyui


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    return run_in_comfyui("comfyui_flow_checks.py", str(tmp_path_factory.mktemp("comfyui_flow")))


def test_every_entry_and_node_method_runs_on_every_flow_sampling_and_scheduler(flow):
    from deis_fast.integrations.comfyui import KSAMPLER_ENTRIES, NODE_METHODS
    assert flow["entries"] == list(KSAMPLER_ENTRIES)
    assert {"simple", "karras", "beta", "kl_optimal", "deis_fast_time_quadratic"} <= set(flow["schedulers"])
    runs = flow["runs"]
    assert len(runs) >= 5 * len(flow["schedulers"]) * (len(KSAMPLER_ENTRIES) + len(NODE_METHODS))
    bad = {k: v for k, v in runs.items() if v != "ok"}
    assert not bad, f"{len(bad)} of {len(runs)} runs failed, e.g. {list(bad.items())[:5]}"


def test_the_samplings_are_comfyuis_and_get_their_schedules(flow):
    mu = flow["mu"]
    assert mu["flux mu 1.15"][0] == "ModelSamplingFlux" and abs(mu["flux mu 1.15"][1] - 1.15) < 1e-9
    assert "mu=1.15" in mu["flux mu 1.15"][2]
    assert mu["flux mu 0.5"][0] == "ModelSamplingFlux" and "mu=0.5" in mu["flux mu 0.5"][2]
    assert mu["sd3 shift 3"][0] == "ModelSamplingDiscreteFlow" and "shift=3.0" in mu["sd3 shift 3"][2]
    assert "shift=1.73" in mu["auraflow shift 1.73"][2]
    assert "shift=1.0" in mu["discrete flow default"][2]


def test_ddim_equals_comfyuis_euler_on_every_flow_sampling(flow):
    for label, err in flow["parity"].items():
        assert err < 1e-5, (label, err)


def test_node_method_defaults_to_auto_which_runs_rhoabm2_on_flow_models(flow):
    assert flow["node default"] == "auto"
    for label, (vs_rhoabm2, vs_tab3) in flow["auto"].items():
        assert vs_rhoabm2 == 0.0 and vs_tab3 > 1e-3, (label, vs_rhoabm2, vs_tab3)


def test_flow_default_never_worse_than_comfyuis_euler_on_simple(flow):
    """deis_fast_rhoabm2 (KSampler) and the DEIS-fast Sampler node's defaults against ComfyUI's euler on `simple`, on
    the flow mixture under SD3 shift 1 / 3 and FLUX mu 0.5 / 1.15 (256^2 / 1024^2), 4-20 steps. Measured worst ratio
    0.99 (FLUX 1024^2 and shift 3 at 4 steps)."""
    rows = flow["never worse"]
    assert len(rows) == 4 * 17
    for key, (euler, entry, node) in rows.items():
        assert entry <= euler and node <= euler, (key, euler, entry, node)
