"""Runs inside a ComfyUI process (started by tests/integrations/test_comfyui_flow.py): every deis_fast KSampler entry and every
DEIS-fast Sampler node method on the flow-model samplings ComfyUI patches onto FLUX, Chroma, SD3, AuraFlow and the
flow checkpoints' defaults, through ComfyUI's own model-sampling nodes and sampling code. Writes one JSON.

    python tests/comfyui_flow_checks.py COMFYUI_COPY STUBS_DIR OUT.json
"""
import json
import sys

from deis_fast.testing import import_comfyui_cpu

comfy_dir, stubs, out_path = sys.argv[1:4]
import_comfyui_cpu(comfy_dir, stubs)

import torch  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402
from comfy_extras import nodes_custom_sampler as ncs  # noqa: E402
from comfy_extras import nodes_model_advanced as nma  # noqa: E402

import deis_fast.integrations.comfyui as dc  # noqa: E402

torch.set_num_threads(1)
comfy.utils.PROGRESS_BAR_ENABLED = False
dc.register()   # the deis_fast_* entries in KSampler's lists, as the custom node does at start-up
POS = [[torch.zeros(1, 1, 8), {}]]
LAT = torch.zeros(1, 1, 8, 8)
STEPS = 5
base = dc.digits_model("flow", 1.0)
# ComfyUI's own model-sampling nodes, as a workflow patches a checkpoint; the flux mu is set as the node computes it
# from the image size (mu = base_shift at 256 tokens, max_shift at 4096): 1024x1024 -> 1.15, 256x256 -> 0.5
MODELS = {
    "flux mu 1.15": nma.ModelSamplingFlux().patch(base, 1.15, 0.5, 1024, 1024)[0],
    "flux mu 0.5": nma.ModelSamplingFlux().patch(base, 1.15, 0.5, 256, 256)[0],
    "sd3 shift 3": nma.ModelSamplingSD3().patch(base, 3.0)[0],
    "auraflow shift 1.73": nma.ModelSamplingAuraFlow().patch_aura(base, 1.73)[0],
    "discrete flow default": base,
}
SCHEDULERS = list(comfy.samplers.KSampler.SCHEDULERS)
ENTRIES = [n for n in comfy.samplers.KSampler.SAMPLERS if n.startswith("deis_fast_")]


def ks(model, sampler, scheduler, seed=5):
    noise = comfy.sample.prepare_noise(LAT, seed)
    return comfy.sample.sample(model, noise, STEPS, 1.0, sampler, scheduler, POS, POS, LAT, seed=seed,
                               disable_pbar=True)


def advanced(model, sampler, sigmas, seed=5):
    guider = ncs.CFGGuider().get_guider(model, POS, POS, 1.0)[0]
    noise = ncs.RandomNoise().get_noise(seed)[0]
    return ncs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, {"samples": LAT})[0]["samples"]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def attempt(fn):
    try:
        out = fn()
        return "ok" if bool(torch.isfinite(out).all()) else "not finite"
    except Exception as e:   # noqa: BLE001 - the test reports every failure with its message
        return f"{type(e).__name__}: {e}"


R: dict = {"entries": ENTRIES, "schedulers": SCHEDULERS, "runs": {}, "mu": {}, "parity": {}}
for label, model in MODELS.items():
    ms = model.get_model_object("model_sampling")
    R["mu"][label] = [type(ms).__mro__[1].__name__, float(ms.shift), repr(dc.model_schedule(ms)[1])]
    for sched in SCHEDULERS:
        for name in ENTRIES:
            R["runs"][f"{label} | ksampler {name} | {sched}"] = attempt(lambda: ks(model, name, sched))
        sigmas = ncs.BasicScheduler().get_sigmas(model, sched, STEPS, 1.0)[0]
        for method in dc.NODE_METHODS:
            sampler = dc.DeisFastSampler().get_sampler(method)[0]
            R["runs"][f"{label} | advanced {method} | {sched}"] = attempt(lambda: advanced(model, sampler, sigmas))
    for grid in dc.NODE_GRIDS:   # the DEIS-fast Scheduler node's own grids on this model
        if grid != "optimized (file)":
            sig = lambda: dc.DeisFastScheduler().get_sigmas(model, grid, STEPS, 1.0)[0]   # noqa: E731
            R["runs"][f"{label} | advanced tab3 | node grid {grid}"] = attempt(
                lambda: advanced(model, dc.DeisFastSampler().get_sampler("tab3")[0], sig()))
    # DDIM is ComfyUI's euler on every sampling (the same sigmas, the same model calls)
    R["parity"][label] = rel(ks(model, "deis_fast_ddim", "simple"), ks(model, "euler", "simple"))

# --- the node's method "auto": rhoabm2 on every flow sampling (the same run), tab3 is not what it runs
R["node default"] = dc.DeisFastSampler.INPUT_TYPES()["required"]["method"][1]["default"]
R["auto"] = {}
for label, model in MODELS.items():
    sigmas = ncs.BasicScheduler().get_sigmas(model, "simple", STEPS, 1.0)[0]
    auto = advanced(model, dc.DeisFastSampler().get_sampler()[0], sigmas)    # the node's default inputs
    R["auto"][label] = [rel(auto, advanced(model, dc.DeisFastSampler().get_sampler("rhoabm2")[0], sigmas)),
                        rel(auto, advanced(model, dc.DeisFastSampler().get_sampler("tab3")[0], sigmas))]

# --- never worse than the scheduler it replaces: ComfyUI's euler on `simple`, on the flow mixture (exact velocity,
# exact ODE endpoint) under SD3's shift 1 / 3 and FLUX's mu at 256^2 / 1024^2, 4-20 steps; deis_fast's flow default
# through the KSampler entry and the DEIS-fast Sampler node's default inputs
from deis_fast.core.schedules import FlowSchedule  # noqa: E402
from deis_fast.testing import reference_solution, relative_errors  # noqa: E402

mix_base, mix = dc.flow_mixture_model(1.0)
MIX = {"sd3 shift 1": mix_base, "sd3 shift 3": nma.ModelSamplingSD3().patch(mix_base, 3.0)[0],
       "flux 256^2 (mu 0.5)": nma.ModelSamplingFlux().patch(mix_base, 1.15, 0.5, 256, 256)[0],
       "flux 1024^2 (mu 1.15)": nma.ModelSamplingFlux().patch(mix_base, 1.15, 0.5, 1024, 1024)[0]}
MLAT = torch.zeros(32, 1, 8, 8)
mnoise = comfy.sample.prepare_noise(MLAT, 7)
mref = reference_solution(mix, FlowSchedule(), mnoise.double().reshape(32, 64), 1.0, 0.0).reshape(mnoise.shape)


def merr(x):
    return float(relative_errors(x.double(), mref).median())


def mks(model, sampler, steps):
    return merr(comfy.sample.sample(model, mnoise.clone(), steps, 1.0, sampler, "simple", POS, POS, MLAT, seed=7,
                                    disable_pbar=True))


R["never worse"] = {}
for label, model in MIX.items():
    guider = ncs.CFGGuider().get_guider(model, POS, POS, 1.0)[0]
    node = dc.DeisFastSampler().get_sampler()[0]
    for n in range(4, 21):
        sig = ncs.BasicScheduler().get_sigmas(model, "simple", n, 1.0)[0]
        R["never worse"][f"{label} | {n}"] = [
            mks(model, "euler", n), mks(model, "deis_fast_rhoabm2", n),
            merr(guider.sample(mnoise.clone(), MLAT, node, sig, disable_pbar=True, seed=7))]

with open(out_path, "w") as f:
    json.dump(R, f, indent=1)
