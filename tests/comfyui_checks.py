"""Runs inside a ComfyUI process (started by tests/integrations/test_comfyui.py): deis_fast's nodes and KSampler entries through
ComfyUI's own sampling code, on the embedded digits models wrapped as ComfyUI models. Writes one JSON of
measurements; the tests assert on it.

    python tests/comfyui_checks.py COMFYUI_COPY STUBS_DIR OUT.json

COMFYUI_COPY and STUBS_DIR come from ``deis_fast.testing.comfyui_sandbox``: a writable copy of a ComfyUI tree
(ComfyUI writes beside itself) and a test-only ``torchvision`` stub (ComfyUI's sampling path imports only ``from
torchvision import transforms``, in comfy/ldm/cosmos/model.py; no torchvision release loads with the CPU torch
the suite runs on).
"""
import asyncio
import json
import os
import sys

from deis_fast.testing import import_comfyui_cpu  # noqa: E402

comfy_dir, stubs, out_path = sys.argv[1:4]
import_comfyui_cpu(comfy_dir, stubs)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402
import nodes  # noqa: E402
from comfy_extras import nodes_custom_sampler as ncs  # noqa: E402

import deis_fast  # noqa: E402
import deis_fast.integrations.comfyui as dc  # noqa: E402

torch.set_num_threads(1)
comfy.utils.PROGRESS_BAR_ENABLED = False  # no console bars (the progress checks use the callbacks and hook)
R: dict = {}
ENTRIES = list(dc.KSAMPLER_ENTRIES)
STOCHASTIC = [n for n, (m, _) in dc.KSAMPLER_ENTRIES.items() if m in ("ddim_eta", "dpmpp_2m_sde", "dpmpp_3m_sde")]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# --- loading: the repo's custom node folder, as ComfyUI loads it at start-up
node_dir = os.path.join(comfy_dir, "custom_nodes", "deis_fast")
R["loaded"] = bool(asyncio.run(nodes.load_custom_node(node_dir)))
R["node_classes"] = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("DeisFast"))
ks_inputs = nodes.KSampler.INPUT_TYPES()["required"]
R["ksampler_lists"] = {"samplers": [n for n in ks_inputs["sampler_name"][0] if n.startswith("deis_fast_")],
                       "schedulers": [n for n in ks_inputs["scheduler"][0] if n.startswith("deis_fast_")]}
R["register_again"] = dc.register()  # idempotent: nothing added twice

VP = dc.digits_model("digits")
FLOW = {1.0: dc.digits_model("flow", 1.0), 3.0: dc.digits_model("flow", 3.0)}
POS = [[torch.zeros(1, 1, 8), {}]]
LAT = torch.zeros(3, 1, 8, 8)


def ks(model, sampler, scheduler="karras", steps=8, seed=5, callback=None, **kw):
    noise = comfy.sample.prepare_noise(LAT, seed)
    return comfy.sample.sample(model, noise, steps, 1.0, sampler, scheduler, POS, POS, LAT, seed=seed,
                               callback=callback, disable_pbar=True, **kw)


def advanced(model, sampler, sigmas, seed=5):
    guider = ncs.CFGGuider().get_guider(model, POS, POS, 1.0)[0]
    noise = ncs.RandomNoise().get_noise(seed)[0]
    return ncs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, {"samples": LAT})[0]["samples"]


def node_sampler(method, **kw):
    return dc.DeisFastSampler().get_sampler(method, **kw)[0]


def node_sigmas(model, grid, steps, denoise=1.0):
    return dc.DeisFastScheduler().get_sigmas(model, grid, steps, denoise)[0]


# --- 1. seeds: the same seed gives the same image, through comfy.sample.sample and SamplerCustomAdvanced
seed_rows = {}
for name in STOCHASTIC:
    for mname, model in (("vp", VP), ("flow", FLOW[3.0])):
        a, b, c = ks(model, name, seed=11), ks(model, name, seed=11), ks(model, name, seed=12)
        seed_rows[f"ksampler {name} {mname}"] = [rel(a, b), rel(a, c)]
for method in ("ddim_eta", "dpmpp_2m_sde", "dpmpp_3m_sde"):
    sig = node_sigmas(VP, "logsnr", 8)
    a, b, c = (advanced(VP, node_sampler(method), sig, seed=s) for s in (11, 11, 12))
    seed_rows[f"advanced {method} vp"] = [rel(a, b), rel(a, c)]
R["seeds"] = seed_rows
# ComfyUI's own dpmpp_2m_sde / 3m_sde with the same seed (the same Brownian tree)
R["sde_vs_comfyui"] = {n: rel(ks(VP, f"deis_fast_{n}"), ks(VP, n)) for n in ("dpmpp_2m_sde", "dpmpp_3m_sde")}

# --- 2. one-step lists: karras 1 ([sigma_max, 0]), SDTurbo 1, CONST simple 1 ([1, 0]); euler is one denoise
one = {}
for name in ENTRIES:
    for label, model, sched in (("vp karras", VP, "karras"), ("flow simple", FLOW[1.0], "simple")):
        out = ks(model, name, sched, steps=1)
        ref = ks(model, "euler", sched, steps=1)
        one[f"{name} {label}"] = [bool(torch.isfinite(out).all()), rel(out, ref)]
turbo = ncs.SDTurboScheduler().get_sigmas(VP, 1, 1.0)[0]
for method in ("tab3", "rho_heun", "unipc3", "pfdiff", "dpmpp_2m_sde"):
    out = advanced(VP, node_sampler(method), turbo)
    ref = advanced(VP, comfy.samplers.sampler_object("euler"), turbo)
    one[f"advanced {method} sdturbo"] = [bool(torch.isfinite(out).all()), rel(out, ref)]
R["one_step"] = one

# --- 3. the progress bar reaches its total (latent_preview's bar through ComfyUI's global hook)
bars = []
comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: bars.append((value, total)))
prog = {}
for name in ENTRIES:
    seen = []
    ks(VP, name, steps=7, callback=lambda step, x0, x, total: seen.append((step + 1, total)))
    prog[f"ksampler {name}"] = [len(seen), seen[-1][0], seen[-1][1]]
for method, kw, steps in (("pfdiff", {}, 10), ("pfdiff", {"pfdiff_steps": "base grid"}, 10), ("rho_rk4", {}, 6),
                          ("unipc3", {}, 9), ("tab3", {"corrector": "on"}, 9), ("dpmpp_3m_sde", {}, 9)):
    del bars[:]
    advanced(FLOW[3.0], node_sampler(method, **kw), node_sigmas(FLOW[3.0], "time_uniform", steps))
    prog[f"advanced {method} {kw}"] = [len(bars), bars[-1][0], bars[-1][1]]
comfy.utils.set_progress_bar_global_hook(None)
R["progress"] = prog

# --- 4. a VP model's tab3 inside ComfyUI = deis_fast.sample in the model's own VP schedule, same grid
ms = VP.get_model_object("model_sampling")
net = VP.model.diffusion_model.net
vp = dc.model_schedule(ms)[1]


GRID: list = []


def x0_model(x, t):
    """The digits network as ComfyUI's EPS model sampling uses it, on the VP state x at VP time t: input alpha x_k
    (= x) at the training step nearest sigma = rho(t), x0 = x_k - sigma eps with x_k = x / alpha (float32)."""
    sigma = float(vp.rho(float(t[0])))
    sigma = min(GRID, key=lambda s: abs(s - sigma)) if min(abs(s - sigma) for s in GRID) < 1e-9 * sigma else sigma
    eps = net(x, ms.timestep(torch.full(t.shape, sigma)).float())
    return x * float(np.sqrt(1 + sigma * sigma)) - eps * sigma


def own_time(sigmas, method="tab3", noise_scale=1.0, **kw):
    GRID[:] = [float(v) for v in sigmas if v > 0]
    noise = comfy.sample.prepare_noise(LAT, 5) * noise_scale
    return deis_fast.sample(x0_model, noise, schedule=vp, method=method, nfe=None, prediction="x0",
                            grid={"rho": [min(float(v), vp.rho_max) for v in sigmas]}, time_dtype=torch.float64,
                            denoise_to_zero=True, **kw)


vp_rows, floors = {}, {}
for sched in ("karras", "normal", "deis_fast_time_quadratic"):
    sig = comfy.samplers.calculate_sigmas(ms, sched, 8)
    vp_rows[f"ksampler tab3 {sched}"] = rel(ks(VP, "deis_fast_tab3", sched), own_time(sig))
    # float32's own floor on this grid: the same deis_fast run from noise moved by 1e-7 relative
    floors[f"ksampler tab3 {sched}"] = rel(own_time(sig, noise_scale=1 + 1e-7), own_time(sig))
R["vp_float32_floor"] = floors
sig = node_sigmas(VP, "time_quadratic", 8)
vp_rows["advanced tab3 time_quadratic"] = rel(advanced(VP, node_sampler("tab3"), sig), own_time(sig))
vp_rows["advanced tab3 vs rhoab3 (tAB is not rhoAB)"] = rel(advanced(VP, node_sampler("tab3"), sig),
                                                             advanced(VP, node_sampler("rhoab3"), sig))
R["vp_own_time"] = vp_rows

# --- 5. parity with ComfyUI's euler: EPS, CONST shift 1 / 3, partial sigmas (denoise), inpainting mask
par = {}
mask = torch.zeros(3, 1, 8, 8)
mask[..., 2:6, 2:6] = 1.0
init = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
for label, model in (("vp", VP), ("flow1", FLOW[1.0]), ("flow3", FLOW[3.0])):
    par[f"ddim {label}"] = rel(ks(model, "deis_fast_ddim", "simple", 9), ks(model, "euler", "simple", 9))
    noise = comfy.sample.prepare_noise(init, 5)
    a, b = (comfy.sample.sample(model, noise, 9, 1.0, s, "simple", POS, POS, init, denoise=0.6, noise_mask=mask,
                                seed=5, disable_pbar=True) for s in ("deis_fast_ddim", "euler"))
    par[f"ddim {label} denoise 0.6 + mask"] = rel(a, b)
    c = comfy.sample.sample(model, noise, 9, 1.0, "deis_fast_tab3", "simple", POS, POS, init, denoise=0.6,
                            noise_mask=mask, seed=5, disable_pbar=True)
    par[f"tab3 {label} mask keeps the known region"] = float((c - init).mul(1 - mask).abs().max())
R["parity"] = par

# --- 6. every entry and node method runs and stays finite on every model; model_options reach the model
fin = {}
for name in ENTRIES:
    for label, model in (("vp", VP), ("flow3", FLOW[3.0])):
        fin[f"{name} {label}"] = bool(torch.isfinite(ks(model, name, "deis_fast_logsnr", 6)).all())
for method in dc.NODE_METHODS:
    for grid in ("time_quadratic", "karras", "ays"):
        fin[f"node {method} {grid}"] = bool(torch.isfinite(advanced(VP, node_sampler(method),
                                                                     node_sigmas(VP, grid, 6))).all())
R["finite"] = fin
hooked = []
patched = VP.clone()
patched.set_model_sampler_post_cfg_function(lambda args: hooked.append(1) or args["denoised"])
ks(patched, "deis_fast_tab3", steps=5)
R["post_cfg_calls"] = len(hooked)

# --- 6a. the schedule each model_sampling gets, and the Scheduler node's sigmas on it
import comfy.model_sampling as cms  # noqa: E402


def ms_of(sampling, kind, **params):
    cls = type("MS", (sampling, kind), {})
    m = cls()
    if params:
        m.set_parameters(**params)
    return m


flux = ms_of(cms.ModelSamplingFlux, cms.CONST, shift=1.15)
sd3 = ms_of(cms.ModelSamplingDiscreteFlow, cms.CONST, shift=3.0)
edm = ms_of(cms.ModelSamplingContinuousEDM, cms.EDM, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
vpred = ms_of(cms.ModelSamplingDiscrete, cms.V_PREDICTION)
u = torch.linspace(1, 0, 5, dtype=torch.float64)[:-1]
sch = {"flux": (dc.model_schedule(flux)[0], repr(dc.model_schedule(flux)[1]),
                rel(dc.sigmas_for(flux, "time_uniform", 4)[:-1], cms.flux_time_shift(1.15, 1.0, u).float())),
       "sd3": (dc.model_schedule(sd3)[0], repr(dc.model_schedule(sd3)[1]),
               rel(dc.sigmas_for(sd3, "time_uniform", 4)[:-1], cms.time_snr_shift(3.0, u).float())),
       "edm": (dc.model_schedule(edm)[0], repr(dc.model_schedule(edm)[1]),
               rel(dc.sigmas_for(edm, "karras", 6), comfy.samplers.calculate_sigmas(edm, "karras", 6))),
       "v_prediction": (dc.model_schedule(vpred)[0], repr(dc.model_schedule(vpred)[1]),
                        rel(dc.sigmas_for(vpred, "karras", 6), comfy.samplers.calculate_sigmas(vpred, "karras", 6)))}
R["schedules"] = sch

# --- 6b. "optimized (file)": a grid saved with deis_fast.save_grid becomes the model's SIGMAS (+ the final 0)
grid_file = os.path.join(os.path.dirname(out_path), "grids.json")
times = [999.0, 700.0, 420.0, 200.0, 60.0, 0.0]   # tab3 at NFE 5: calls at the first five, then 0
deis_fast.save_grid(grid_file, deis_fast.OptimizedGrid(times=times, method="tab3", nfe=5, model_id="digits",
                                                       schedule=deis_fast.schedule_fingerprint(vp)))
got = dc.DeisFastScheduler().get_sigmas(VP, "optimized (file)", 5, 1.0, grid_file, "tab3")[0]
want = torch.tensor(list(vp.rho(np.array(times[:-1]))) + [0.0], dtype=torch.float32)
R["optimized_file"] = [list(got.shape), float((got - want).abs().max()),
                       bool(torch.isfinite(advanced(VP, node_sampler("tab3"), got)).all()),
                       float(got[0]), float(ms.sigma_max)]   # issue 33 item 8: the top sigma is the model's
# a grid optimized by deis_fast.optimize_grid on this model's own schedule (save_grid records its fingerprint)
og = deis_fast.optimize_grid(x0_model, vp, "tab3", 4, torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                             prediction="x0", time_budget=0.5,
                             reference_nfe=40, max_restarts=0, start_grids=("time_quadratic",))
opt_file = os.path.join(os.path.dirname(out_path), "optimized.json")
deis_fast.save_grid(opt_file, og)
got = dc.DeisFastScheduler().get_sigmas(VP, "optimized (file)", 4, 1.0, opt_file, "tab3")[0]
R["optimized_file_real"] = [list(got.shape), float(got[0]), float(ms.sigma_max), float(got[-1])]
# item 8/9: refused in the node's terms, never truncated
bad_files = {"another schedule": {"k": deis_fast.OptimizedGrid(times=times, method="tab3", nfe=5,
                                                               schedule="0123456789abcdef").to_json()},
             "continuous time": {"k": deis_fast.OptimizedGrid(times=[1.0, 0.6, 0.3, 0.1, 0.03, 0.001], method="tab3",
                                                              nfe=5).to_json()},
             "entry not an object": {"k": "x"}, "a list": [1, 2], "labelled NFE 6": {
                 "k": deis_fast.OptimizedGrid(times=times, method="tab3", nfe=6).to_json()}}
file_errors = {}
for label, content in list(bad_files.items()) + [("not JSON", None)]:
    path = os.path.join(os.path.dirname(out_path), f"bad_{len(file_errors)}.json")
    with open(path, "w") as f:
        f.write("{not json" if content is None else json.dumps(content))
    try:
        dc.DeisFastScheduler().get_sigmas(VP, "optimized (file)", 6 if "NFE 6" in label else 5, 1.0, path, "tab3")
        file_errors[label] = None
    except ValueError as e:
        file_errors[label] = [type(e).__name__, str(e)]
R["grid_file_errors"] = file_errors

# --- 6a'. issue 33 item 10: SIGMAS ending below the model's smallest sigma (a KarrasScheduler with sigma_min 0.002,
# uni_pc's 0.001): every deis_fast entry runs, ddim = ComfyUI's euler on them; errors name the node
low = {}
karras_low = ncs.KarrasScheduler().get_sigmas(8, float(ms.sigma_max), 0.002, 7.0)[0]
unipc_low = comfy.samplers.calculate_sigmas(ms, "karras", 8).clone()
unipc_low[-2] = 0.001
for label, sig in (("karras sigma_min 0.002", karras_low), ("uni_pc 0.001", unipc_low)):
    for name in ENTRIES:
        out = advanced(VP, comfy.samplers.sampler_object(name), sig)
        low[f"{name} {label}"] = bool(torch.isfinite(out).all())
    low[f"ddim vs euler {label}"] = rel(advanced(VP, node_sampler("ddim"), sig),
                                        advanced(VP, comfy.samplers.sampler_object("euler"), sig))
R["below_sigma_min"] = low
node_errors = {}
above = torch.tensor([2 * float(ms.sigma_max), 1.0, 0.0])
for label, fn in (("node, sigmas above the model", lambda: advanced(VP, node_sampler("tab3"), above)),
                  ("ksampler entry, sigmas above the model",
                   lambda: advanced(VP, comfy.samplers.sampler_object("deis_fast_tab3"), above))):
    try:
        fn()
        node_errors[label] = None
    except ValueError as e:
        node_errors[label] = str(e)
R["node_errors"] = node_errors

# --- 6c. a tiny SD1.5-config UNet (ComfyUI's own UNetModel with cross-attention; its layers start uninitialized,
# so the weights are filled from a seed), text-like conditioning and cfg 7
import comfy.model_base  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402

unet_config = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
               "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
               "transformer_depth_middle": 1, "context_dim": 32, "num_heads": 2, "num_head_channels": -1,
               "use_spatial_transformer": True, "use_linear_in_transformer": False, "adm_in_channels": None,
               "use_temporal_attention": False, "use_temporal_resblock": False, "legacy": False}
sd_base = comfy.model_base.BaseModel(comfy.supported_models.SD15(unet_config), comfy.model_base.ModelType.EPS,
                                     device=torch.device("cpu"))
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for prm in sd_base.parameters():
        prm.copy_(torch.randn(prm.shape, generator=gen) * 0.05)
SD = comfy.model_patcher.ModelPatcher(sd_base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
sd_lat = torch.zeros(2, 4, 16, 16)
sd_pos, sd_neg = [[torch.randn(1, 4, 32, generator=gen), {}]], [[torch.zeros(1, 4, 32), {}]]


def sd(sampler, steps=6, seed=1, scheduler="karras", model=SD):
    noise = comfy.sample.prepare_noise(sd_lat, seed)
    return comfy.sample.sample(model, noise, steps, 7.0, sampler, scheduler, sd_pos, sd_neg, sd_lat, seed=seed,
                               disable_pbar=True)


unet = {"ddim vs euler": rel(sd("deis_fast_ddim"), sd("euler")),
        "dpmpp_2m_sde vs ComfyUI's": rel(sd("deis_fast_dpmpp_2m_sde"), sd("dpmpp_2m_sde")),
        "one step tab3 vs euler": rel(sd("deis_fast_tab3", steps=1), sd("euler", steps=1))}
for name in STOCHASTIC:
    unet[f"seed {name}"] = rel(sd(name), sd(name))
sd_hooked = []
sd_patched = SD.clone()
sd_patched.set_model_sampler_post_cfg_function(lambda args: sd_hooked.append(1) or args["denoised"])
unet["finite tab3_pc with a post-CFG hook"] = float(not bool(torch.isfinite(sd("deis_fast_tab3_pc",
                                                                                  model=sd_patched)).all()))
unet["post-CFG hook calls"] = len(sd_hooked)
R["unet"] = unet

# --- 6d. tuned files (deis_fast.tuning) through the nodes: a committed `deis-fast tune --model digits` file on the
# digits model (its float32 sigma table is the linear DDPM preset the file was tuned on), and a file tuned here, in a
# tiny time budget, on the shift-3 flow model's own schedule; the node's output = deis_fast.Sampler with the file's
# plan on the same noise, and mismatches refused in the nodes' terms
import time as _time  # noqa: E402

from deis_fast import tuning  # noqa: E402

began = _time.perf_counter()
tuned_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tuned")
tuned_rows, tuned_errors = {}, {}
for fname, method, kw in (("digits_tab2_nfe5.json", "tab2", {}),
                          ("digits_pfdiff_nfe5.json", "pfdiff", {"pfdiff_k": 2, "pfdiff_h": 1})):
    path = os.path.join(tuned_dir, fname)
    t = tuning.load_tuned(path)
    sig = dc.DeisFastScheduler().get_sigmas(VP, "karras", 10, 1.0, tuned_file=path)[0]
    got = advanced(VP, node_sampler(method, tuned_file=path, **kw), sig)
    GRID[:] = [float(v) for v in vp.rho(np.asarray(t.grid))]
    noise = comfy.sample.prepare_noise(LAT, 5)
    core = deis_fast.Sampler(x0_model, vp, plan=t.make_plan(vp), prediction="x0", time_dtype=torch.float64)(noise)
    tuned_rows[f"vp {fname}"] = [len(sig) - 1, rel(got, core / float(vp.alpha(t.grid[-1])))]
    tuned_rows[f"vp {fname} vs untuned"] = [len(sig) - 1, rel(got, advanced(VP, node_sampler(method, **kw), sig))]
flow3_ms = FLOW[3.0].get_model_object("model_sampling")
flow3 = dc.model_schedule(flow3_ms)[1]
flow_net = FLOW[3.0].model.diffusion_model.net


def flow_model(x, t):   # the flow network as ComfyUI's CONST sampling runs it: time = sigma * 1000 (float32)
    return flow_net(x, flow3_ms.timestep(t.float()).float())


flow_file = os.path.join(os.path.dirname(out_path), "flow3_tab3_nfe5.json")
ft = tuning.tune(flow_model, flow3, "tab3", 5, prediction="flow", shape=(1, 8, 8), calibration=8, held_out=4,
                 time_budget=1.0, reference_nfe=40)
ft.save(flow_file)
sig = dc.DeisFastScheduler().get_sigmas(FLOW[3.0], "karras", 10, 1.0, tuned_file=flow_file)[0]
got = advanced(FLOW[3.0], node_sampler("tab3", tuned_file=flow_file), sig)
core = deis_fast.Sampler(flow_model, flow3, plan=ft.make_plan(flow3), prediction="flow",
                         time_dtype=torch.float64)(comfy.sample.prepare_noise(LAT, 5))
tuned_rows["flow3 tuned here"] = [len(sig) - 1, rel(got, core)]
tuned_rows["flow3 kind"] = ft.kind
# a committed `deis-fast tune --model flow` file: tuned in the network's own time (x 1000, ComfyUI's multiplier)
flow1_file = os.path.join(tuned_dir, "flow_tab3_nfe5.json")
f1 = tuning.load_tuned(flow1_file)
own1 = deis_fast.FlowSchedule(1.0)       # time_scale 1000: the network's time, as the file was tuned
sig = dc.DeisFastScheduler().get_sigmas(FLOW[1.0], "karras", 10, 1.0, tuned_file=flow1_file)[0]
got = advanced(FLOW[1.0], node_sampler("tab3", tuned_file=flow1_file), sig)
core = deis_fast.Sampler(lambda x, mt: flow_net(x, mt.float()), own1, plan=f1.make_plan(own1), prediction="flow",
                         time_dtype=torch.float64)(comfy.sample.prepare_noise(LAT, 5))
tuned_rows["flow1 committed"] = [len(sig) - 1, rel(got, core)]
# a committed learned plan (benchmarks/comfyui_quality.py --flow-tuned --tune): its network times moved off its solver
# times, so the node must run it on the file's flow prediction, as it was tuned
lp_file = os.path.join(tuned_dir, "flow_digits_shift1_nfe5.json")
flow1_ms = FLOW[1.0].get_model_object("model_sampling")
flow1 = dc.model_schedule(flow1_ms)[1]
lp = tuning.load_tuned(lp_file)
sig = dc.DeisFastScheduler().get_sigmas(FLOW[1.0], "karras", 10, 1.0, tuned_file=lp_file)[0]
got = advanced(FLOW[1.0], node_sampler("auto", tuned_file=lp_file), sig)
core = deis_fast.Sampler(lambda x, t: flow_net(x, flow1_ms.timestep(t.float()).float()), flow1, plan=lp.make_plan(flow1),
                         prediction="flow", time_dtype=torch.float64)(comfy.sample.prepare_noise(LAT, 5))
tuned_rows["flow1 learned plan committed"] = [len(sig) - 1, rel(got, core), lp.kind]
digits5 = os.path.join(tuned_dir, "digits_tab2_nfe5.json")
for label, fn in (
        ("other NFE", lambda: advanced(VP, node_sampler("tab2", tuned_file=digits5), node_sigmas(VP, "karras", 7))),
        ("other model schedule", lambda: advanced(FLOW[1.0], node_sampler("tab2", tuned_file=digits5),
                                                  node_sigmas(FLOW[1.0], "time_uniform", 5))),
        ("other flow shift", lambda: advanced(FLOW[1.0], node_sampler("tab3", tuned_file=flow_file),
                                              node_sigmas(FLOW[1.0], "time_uniform", 5))),
        ("committed flow file, other shift", lambda: advanced(FLOW[3.0], node_sampler("tab3", tuned_file=flow1_file),
                                                              node_sigmas(FLOW[3.0], "time_uniform", 5))),
        ("scheduler on another model", lambda: dc.DeisFastScheduler().get_sigmas(FLOW[1.0], "karras", 5, 1.0,
                                                                                 tuned_file=digits5)),
        ("other method", lambda: node_sampler("tab3", tuned_file=digits5)),
        ("pfdiff file without pfdiff", lambda: node_sampler("ddim", tuned_file=os.path.join(
            tuned_dir, "digits_pfdiff_nfe5.json"))),
        ("pfdiff file, other k", lambda: node_sampler("pfdiff", pfdiff_k=3, pfdiff_h=1, tuned_file=os.path.join(
            tuned_dir, "digits_pfdiff_nfe5.json"))),
        ("denoise < 1", lambda: advanced(VP, node_sampler("tab2", tuned_file=digits5),
                                         node_sigmas(VP, "karras", 5, denoise=0.6))),
        ("scheduler denoise < 1", lambda: dc.DeisFastScheduler().get_sigmas(VP, "karras", 5, 0.6,
                                                                            tuned_file=digits5)),
        ("missing file", lambda: node_sampler("tab2", tuned_file=os.path.join(tuned_dir, "missing.json")))):
    try:
        fn()
        tuned_errors[label] = None
    except ValueError as e:
        tuned_errors[label] = [type(e).__name__, str(e)]
sd15_vp = dc.model_schedule(SD.get_model_object("model_sampling"))[1]   # SD 1.5's float32 table: its preset
R["tuned"] = {"rows": tuned_rows, "errors": tuned_errors, "seconds": _time.perf_counter() - began,
              "sd15 schedule": [repr(sd15_vp), deis_fast.schedule_fingerprint(sd15_vp)]}

# --- 6d. the Sampler node's method "auto" (its default): tab3 on discrete / EDM models, rhoabm2 on flow models, a
# tuned file's own method; an option neither of tab3 / rhoabm2 takes is refused before sampling
sig_vp, sig_fl = node_sigmas(VP, "time_quadratic", 6), node_sigmas(FLOW[3.0], "time_uniform", 6)
auto_rows = {
    "vp = tab3": rel(advanced(VP, node_sampler("auto"), sig_vp), advanced(VP, node_sampler("tab3"), sig_vp)),
    "vp != rhoabm2": rel(advanced(VP, node_sampler("auto"), sig_vp), advanced(VP, node_sampler("rhoabm2"), sig_vp)),
    "flow = rhoabm2": rel(advanced(FLOW[3.0], node_sampler("auto"), sig_fl),
                          advanced(FLOW[3.0], node_sampler("rhoabm2"), sig_fl)),
    "edm / sigma models": dc.auto_method(*dc.model_schedule(edm)),
    "auto + corrector on = tab3_pc": rel(advanced(VP, node_sampler("auto", corrector="on"), sig_vp),
                                         advanced(VP, node_sampler("tab3", corrector="on"), sig_vp))}
for fname, method, kw in (("digits_tab2_nfe5.json", "tab2", {}),
                          ("digits_pfdiff_nfe5.json", "pfdiff", {"pfdiff_k": 2, "pfdiff_h": 1})):
    path = os.path.join(tuned_dir, fname)
    sig = dc.DeisFastScheduler().get_sigmas(VP, "karras", 10, 1.0, tuned_file=path)[0]
    auto_rows[f"tuned {fname}"] = rel(advanced(VP, node_sampler("auto", tuned_file=path), sig),
                                      advanced(VP, node_sampler(method, tuned_file=path, **kw), sig))
try:
    node_sampler("auto", variant="bh1")
    auto_rows["variant"] = None
except ValueError as e:
    auto_rows["variant"] = [type(e).__name__, str(e)]
R["auto"] = auto_rows

# --- 7. bad input: messages in the nodes' terms
errors = {}
for label, fn in (
        ("pfdiff base grid steps", lambda: advanced(VP, node_sampler("pfdiff", pfdiff_steps="base grid"),
                                                    node_sigmas(VP, "karras", 9))),
        ("pfdiff h > k", lambda: node_sampler("pfdiff", pfdiff_k=1, pfdiff_h=2)),
        ("variant on tab3", lambda: node_sampler("tab3", variant="bh1")),
        ("corrector on rho_heun", lambda: node_sampler("rho_heun", corrector="on")),
        ("optimized grid without file", lambda: node_sigmas(VP, "optimized (file)", 5)),
        ("optimized grid, no entry for the steps",
         lambda: dc.DeisFastScheduler().get_sigmas(VP, "optimized (file)", 7, 1.0, grid_file, "tab3"))):
    try:
        fn()
        errors[label] = None
    except ValueError as e:
        errors[label] = str(e)
R["errors"] = errors

# --- 8. the workflow in docs/, run through ComfyUI's own node classes (a checkpoint loader and text encoders are
# stood in for: the digits model, empty conditioning); every other node is the class ComfyUI registers
wf_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "comfyui_workflow_api.json")
workflow = json.load(open(wf_path))
stand_ins = {"CheckpointLoaderSimple": lambda **_: (VP, None, None), "CLIPTextEncode": lambda **_: (POS,),
             "VAEDecode": lambda samples, vae: (samples["samples"],), "SaveImage": lambda images, **_: ()}
done: dict = {}


def run_node(nid):
    if nid in done:
        return done[nid]
    spec = workflow[nid]
    kw = {k: (run_node(v[0])[v[1]] if isinstance(v, list) else v) for k, v in spec["inputs"].items()}
    ct = spec["class_type"]
    if ct == "EmptyLatentImage":  # the digits model's 8 x 8 latents
        kw.update(width=64, height=64)
    if ct in stand_ins:
        res = stand_ins[ct](**kw)
    else:
        cls = nodes.NODE_CLASS_MAPPINGS.get(ct) or ncs.NODE_CLASS_MAPPINGS[ct]
        res = getattr(cls(), cls.FUNCTION)(**kw)
    done[nid] = res
    return res


for nid in workflow:
    run_node(nid)
R["workflow"] = {"class_types": sorted({v["class_type"] for v in workflow.values()}),
                 "output_shapes": [list(v[0]["samples"].shape) for n, v in done.items()
                                   if workflow[n]["class_type"] in ("SamplerCustomAdvanced", "KSampler")],
                 "finite": all(bool(torch.isfinite(v[0]["samples"]).all()) for n, v in done.items()
                               if workflow[n]["class_type"] in ("SamplerCustomAdvanced", "KSampler"))}

with open(out_path, "w") as f:
    json.dump(R, f, indent=1)
