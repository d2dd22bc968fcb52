"""deis_fast inside ComfyUI, checked against ComfyUI's own sampling code (comfy.sample.sample, SamplerCustomAdvanced,
the KSampler node's lists, the custom-node loader) on the embedded digits models wrapped as ComfyUI models.

ComfyUI is not a dependency: point COMFYUI_PATH at a ComfyUI source tree (CI: ../shared/comfyui, commit a125cd84)
or these tests skip. The tree is copied to a temporary folder (ComfyUI writes beside itself; CI's copy is
read-only) and imported in one subprocess (tests/comfyui_checks.py), so its global state (sys.path, argv, torch
settings, logging) never reaches the rest of the suite. ComfyUI's sampling path imports torchvision only for
``from torchvision import transforms``; no torchvision release loads with the CPU torch this suite runs on, so the
subprocess gets a test-only empty stub.
"""
import os
import subprocess
import sys

import pytest

from _comfyui_common import REPO, run_in_comfyui



@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    return run_in_comfyui("comfyui_checks.py", str(tmp_path_factory.mktemp("comfyui")),
                          custom_node=os.path.join(REPO, "comfyui_node"))


def test_custom_node_folder_loads_and_registers(comfy):
    assert comfy["loaded"]
    assert comfy["node_classes"] == ["DeisFastSampler", "DeisFastScheduler"]
    from deis_fast.integrations.comfyui import KSAMPLER_ENTRIES, SCHEDULER_ENTRIES
    assert comfy["ksampler_lists"]["samplers"] == list(KSAMPLER_ENTRIES)
    assert comfy["ksampler_lists"]["schedulers"] == list(SCHEDULER_ENTRIES)
    assert comfy["register_again"] == []


def test_same_seed_same_image(comfy):
    """Every stochastic method, through comfy.sample.sample and SamplerCustomAdvanced, VP and CONST models."""
    assert len(comfy["seeds"]) == 9
    for name, (same, other) in comfy["seeds"].items():
        assert same == 0.0, name
        assert other > 1e-2, name


def test_sde_methods_equal_comfyuis_with_the_same_seed(comfy):
    for name, err in comfy["sde_vs_comfyui"].items():
        assert err < 1e-5, (name, err)


def test_one_step_lists(comfy):
    """[sigma_max, 0] (karras 1, SDTurboScheduler 1) and CONST [1, 0] run; deterministic methods equal euler (one
    denoise); stochastic ones stay finite."""
    for name, (finite, err) in comfy["one_step"].items():
        assert finite, name
        if not any(s in name for s in ("ddim_eta", "sde")):
            assert err < 1e-5, (name, err)


def test_progress_bar_reaches_its_total(comfy):
    for name, (calls, last, total) in comfy["progress"].items():
        assert last == total, (name, calls, last, total)
        assert calls == total or "base grid" in name, (name, calls, total)


def test_vp_tab3_inside_comfyui_equals_deis_fast_in_the_models_own_time(comfy):
    """<= 1e-5, or within 2x float32's own floor on that grid where that floor is higher (karras: a 1e-7 change of
    the noise moves this model's float32 result by ~1.8e-5, and the run in float64 is as far from either)."""
    rows, floors = comfy["vp_own_time"], comfy["vp_float32_floor"]
    for name, err in rows.items():
        if "is not" in name:
            assert err > 1e-3, (name, err)
        else:
            assert err <= max(1e-5, 2 * floors.get(name, 0.0)), (name, err, floors.get(name))
    assert rows["ksampler tab3 deis_fast_time_quadratic"] <= 1e-6 and rows["ksampler tab3 normal"] <= 1e-5


def test_parity_with_comfyui_euler_and_masks(comfy):
    for name, err in comfy["parity"].items():   # ddim = euler; inpainting keeps the known region
        assert err < 1e-5, (name, err)


def test_every_method_finite_and_hooks_reach_the_model(comfy):
    assert all(comfy["finite"].values()), [k for k, v in comfy["finite"].items() if not v]
    assert comfy["post_cfg_calls"] == 5


def test_bad_input_messages(comfy):
    e = comfy["errors"]
    assert "needs 3N-2 scheduler steps" in e["pfdiff base grid steps"] and "Set the scheduler's steps to 7 or 10" \
        in e["pfdiff base grid steps"]
    assert "pfdiff_h <= pfdiff_k" in e["pfdiff h > k"]
    assert e["variant on tab3"].startswith("DEIS-fast Sampler:") and "variant" in e["variant on tab3"]
    assert e["corrector on rho_heun"].startswith("DEIS-fast Sampler:")
    assert "grid_file" in e["optimized grid without file"]
    assert "tab3 NFE 5" in e["optimized grid, no entry for the steps"]


def test_optimized_grid_from_a_file(comfy):
    """Issue 33 item 8: the file's grid as SIGMAS: the sigmas where tab3 calls the network, then 0; the first is the
    model's largest sigma (it was dropped: the run started at 3.25 instead of 14.6 on SD-style models)."""
    shape, err, finite, first, sigma_max = comfy["optimized_file"]
    assert shape == [6] and err < 1e-5 and finite and abs(first - sigma_max) < 1e-4 * sigma_max
    shape, first, sigma_max, last = comfy["optimized_file_real"]
    assert shape == [5] and abs(first - sigma_max) < 1e-4 * sigma_max and last == 0.0


def test_bad_grid_files_are_refused_in_the_nodes_terms(comfy):
    """Issue 33 items 8-9: a grid for another schedule or in another time convention is refused (not truncated); an
    unreadable or malformed file names the node, the input and the remedy (no AttributeError / JSONDecodeError)."""
    e = comfy["grid_file_errors"]
    assert all(v is not None and v[0] == "DeisFastInputError" for v in e.values()), e
    assert all(v[1].startswith("DEIS-fast Scheduler: grid_file") for v in e.values()), e
    assert "another model schedule" in e["another schedule"][1]
    assert "another time convention" in e["continuous time"][1]
    for k in ("entry not an object", "a list", "not JSON"):
        assert "deis_fast.save_grid" in e[k][1], e[k]
    assert "network calls" in e["labelled NFE 6"][1]


def test_sigmas_below_the_models_smallest_sigma(comfy):
    """Issue 33 item 10: SIGMAS that end below a DDPM model's sigma_min (KarrasScheduler sigma_min 0.002; uni_pc's
    0.001) run for every entry, as ComfyUI's euler does (ddim = euler on them); sampling errors name the node."""
    low = comfy["below_sigma_min"]
    for name, v in low.items():
        if name.startswith("ddim vs euler"):
            assert v < 1e-5, (name, v)
        else:
            assert v is True, name
    e = comfy["node_errors"]
    assert e["node, sigmas above the model"].startswith("DEIS-fast Sampler: ")
    assert e["ksampler entry, sigmas above the model"].startswith("KSampler sampler_name deis_fast_tab3: ")
    assert "the SIGMAS: 2 steps" in e["node, sigmas above the model"]


def test_one_entry_per_method_on_the_ksampler_list():
    """Issue 33 item 12: rhoab3 and ipndm_v are one method (bit-identical plans): one KSampler entry."""
    import deis_fast
    from deis_fast.integrations.comfyui import KSAMPLER_ENTRIES, NODE_METHODS
    sched = deis_fast.VPSchedule.discrete("linear")
    plans = {}
    for name, (method, opts) in KSAMPLER_ENTRIES.items():
        if method in ("pfdiff", "ddim_eta", "dpmpp_2m_sde", "dpmpp_3m_sde"):
            continue
        p = deis_fast.build_plan(sched, method, 10 if method != "rho_heun" else 10, **opts)
        key = (p.times, tuple(op.coefs for op in p.combines))
        assert key not in plans, (name, plans.get(key))
        plans[key] = name
    assert "deis_fast_ipndm_v" in KSAMPLER_ENTRIES and "deis_fast_rhoab3" not in KSAMPLER_ENTRIES
    assert "rhoab3" not in NODE_METHODS and "ipndm_v" in NODE_METHODS


def test_workflow_in_docs_runs(comfy):
    w = comfy["workflow"]
    assert {"DeisFastSampler", "DeisFastScheduler", "SamplerCustomAdvanced", "KSampler"} <= set(w["class_types"])
    assert w["output_shapes"] == [[1, 1, 8, 8], [1, 1, 8, 8]] and w["finite"]


def test_install_writes_the_loader(tmp_path):
    """No ComfyUI needed: ``python -m deis_fast.integrations.comfyui install PATH`` writes custom_nodes/deis_fast."""
    from deis_fast.integrations import comfyui as dc
    with pytest.raises(FileNotFoundError, match="not a ComfyUI folder"):
        dc.install(str(tmp_path))
    (tmp_path / "custom_nodes").mkdir()
    proc = subprocess.run([sys.executable, "-m", "deis_fast.integrations.comfyui", "install", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "custom_nodes" / "deis_fast" / "__init__.py").read_text()
    assert "NODE_CLASS_MAPPINGS" in text and "register()" in text
    assert dc._main([]) == 2


def test_tiny_sd15_unet_with_cfg(comfy):
    """ComfyUI's own UNetModel (SD1.5 config, tiny, seeded weights), text-like conditioning, cfg 7: ddim = euler,
    dpmpp_2m_sde = ComfyUI's with the same seed, one-step lists, seeds reproduce, post-CFG hooks run per call."""
    u = comfy["unet"]
    hooks = u.pop("post-CFG hook calls")
    assert hooks == 6
    for name, err in u.items():
        assert err < 1e-5, (name, err)


def test_schedule_from_model_sampling(comfy):
    """FLUX (mu) and SD3 (shift) CONST models get a shifted FlowSchedule (the Scheduler node's time_uniform = their
    shifted uniform times), EDM is solved in sigma, a v-prediction DDPM model in its VP schedule; karras equals
    ComfyUI's karras on both."""
    s = comfy["schedules"]
    assert s["flux"][0] == "const" and "mu=1.15" in s["flux"][1] and s["flux"][2] < 1e-6
    assert s["sd3"][0] == "const" and "shift=3.0" in s["sd3"][1] and s["sd3"][2] < 1e-6
    assert s["edm"][:2] == ["eps", "None"] and s["edm"][2] < 1e-6
    assert s["v_prediction"][0] == "eps" and s["v_prediction"][1].startswith("VPSchedule")
    assert s["v_prediction"][2] < 1e-5


def test_tuned_files_through_the_nodes(comfy):
    """The Sampler node's tuned_file (and the Scheduler node's SIGMAS of it) = deis_fast.Sampler with the file's plan
    on the same noise: a committed ``deis-fast tune --model digits`` file (VP: the model's float32 sigma table is the
    file's linear DDPM schedule), a PFDiff one, a ``--model flow`` one (tuned in the network's time x 1000), and one
    tuned inside ComfyUI on the shift-3 flow model; another NFE,
    model schedule, flow shift, method or denoise is refused in the nodes' terms."""
    t = comfy["tuned"]
    rows, e = t["rows"], t["errors"]
    for name in ("vp digits_tab2_nfe5.json", "vp digits_pfdiff_nfe5.json", "flow3 tuned here", "flow1 committed",
                 "flow1 learned plan committed"):
        steps, err = rows[name][:2]
        assert steps == 5 and err < 1e-5, (name, err)
    assert rows["flow1 learned plan committed"][2] == "plan"
    assert rows["vp digits_tab2_nfe5.json vs untuned"][1] > 1e-3   # the tuned grid, not the SIGMAS' interior
    assert all(v is not None and v[0] == "DeisFastInputError" for v in e.values()), e
    assert "the SIGMAS have 7 steps" in e["other NFE"][1] and "set the scheduler's steps to 5" in e["other NFE"][1]
    for k in ("other model schedule", "other flow shift", "scheduler on another model",
              "committed flow file, other shift"):
        assert "tuned for another model schedule" in e[k][1] and "this MODEL" in e[k][1], e[k]
    assert "shift=3.0" in e["other flow shift"][1] and "shift=1.0" in e["other flow shift"][1]
    assert "set method to tab2" in e["other method"][1]
    for k in ("pfdiff file without pfdiff", "pfdiff file, other k"):
        assert "set method to pfdiff, pfdiff_k 2, pfdiff_h 1" in e[k][1], e[k]
    assert "set denoise to 1.0" in e["denoise < 1"][1] and "set denoise to 1.0" in e["scheduler denoise < 1"][1]
    assert "does not exist" in e["missing file"][1]
    assert t["seconds"] < 20
    # an SD 1.5 checkpoint's sigma table is diffusers' scaled_linear schedule: files tuned with tune_pipeline load
    import deis_fast
    sd15 = deis_fast.VPSchedule.discrete("scaled_linear", 1000, 0.00085, 0.012)
    assert t["sd15 schedule"] == [repr(sd15), deis_fast.schedule_fingerprint(sd15)]


def test_install_loader_is_the_custom_node_file_and_says_what_to_install(tmp_path):
    """Issue 33 item 11: the loader `install` writes is the repo's comfyui_node/__init__.py (one text), so it has the
    friendly "deis_fast is not installed" message; `install` creates custom_nodes/ in a ComfyUI tree without one (and
    still refuses a folder that is not ComfyUI's, exit 2 with one line)."""
    from deis_fast.integrations import comfyui as dc
    with open(os.path.join(REPO, "comfyui_node", "__init__.py")) as f:
        assert f.read() == dc.LOADER
    (tmp_path / "main.py").write_text("")
    (tmp_path / "comfy").mkdir()
    path = dc.install(str(tmp_path))
    assert os.path.isfile(path) and "pip install deis_fast" in open(path).read()
    # ComfyUI's Python without deis_fast: the loader's message says what to install
    code = ("import sys; sys.modules['deis_fast'] = None; import runpy; runpy.run_path(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "need the deis_fast package in ComfyUI's Python environment" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "deis_fast.integrations.comfyui", "install", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode == 2 and "not a ComfyUI folder" in proc.stderr and "Traceback" not in proc.stderr


def test_sampler_node_method_auto(comfy):
    """The DEIS-fast Sampler's default method "auto": tab3 on a discrete (VP) model and on EDM / sigma models, rhoabm2
    on a flow model, the file's method with a tuned_file; an option tab3 or rhoabm2 refuses is refused up front."""
    a = comfy["auto"]
    assert a["vp = tab3"] == 0.0 and a["vp != rhoabm2"] > 1e-4, a
    assert a["flow = rhoabm2"] == 0.0 and a["auto + corrector on = tab3_pc"] == 0.0, a
    assert a["edm / sigma models"] == "tab3"
    assert a["tuned digits_tab2_nfe5.json"] == 0.0 and a["tuned digits_pfdiff_nfe5.json"] == 0.0, a
    assert a["variant"][0] == "DeisFastInputError" and "method auto runs tab3 or rhoabm2" in a["variant"][1]
    assert "Pick the method" in a["variant"][1]
