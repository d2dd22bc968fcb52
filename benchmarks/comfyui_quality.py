"""Sampler quality inside ComfyUI: deis_fast's KSampler entries against ComfyUI's own samplers, on ComfyUI's
schedulers and deis_fast's, with trained networks (the embedded digits models wrapped as ComfyUI models: the eps
model under ModelSamplingDiscrete, the rectified-flow model under CONST / ModelSamplingDiscreteFlow).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfyui_quality.py [--out benchmarks/comfyui_quality.md]

Everything runs through ``comfy.sample.sample`` (the KSampler node's path; cfg 1, the conditioning is ignored by
the digits networks). Metric: the median over 64 noises of ||x - x_ref|| / ||x_ref||, with x_ref from the same
noise by deis_fast's rho_rk4 on a 200-step time_quadratic grid run inside ComfyUI (800 network calls; its own
accuracy, the distance to a 400-step run, is printed under each table). ComfyUI's discrete models round the
network's time to a training step, so both the samplers and the reference see ComfyUI's model exactly.
The ComfyUI tree is copied to a temporary folder (see ``deis_fast.testing.comfyui_sandbox``) and imported in a
subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STEPS = (5, 8, 10)
COMFY_SAMPLERS = ("euler", "deis", "ipndm", "ipndm_v", "uni_pc", "uni_pc_bh2", "dpmpp_2m", "res_multistep")
DEIS_FAST = ("deis_fast_tab3", "deis_fast_tab3_pc", "deis_fast_ipndm4", "deis_fast_logrho3", "deis_fast_dpmpp3",
             "deis_fast_unipc3", "deis_fast_pfdiff")
SCHEDULERS = ("karras", "simple", "sgm_uniform", "deis_fast_time_quadratic", "deis_fast_logsnr")
N_NOISE = 64


def _comfy_session(root: str, stubs: str, n_noise: int = N_NOISE, register: bool = True) -> tuple:
    """ComfyUI imported in CPU mode into this process (one thread, no progress bars), deis_fast's entries registered
    unless ``register=False``: (deis_fast's comfyui module, ComfyUI's custom-sampler nodes, an empty positive
    conditioning, the [n, 1, 8, 8] latent, ComfyUI's seed-0 noise for it)."""
    from deis_fast.testing import import_comfyui_cpu
    import_comfyui_cpu(root, stubs)
    import torch
    import comfy.sample
    import comfy.utils
    import deis_fast.integrations.comfyui as dc
    from comfy_extras import nodes_custom_sampler as ncs
    torch.set_num_threads(1)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    if register:
        dc.register()
    lat = torch.zeros(n_noise, 1, 8, 8)
    return dc, ncs, [[torch.zeros(1, 1, 8), {}]], lat, comfy.sample.prepare_noise(lat, 0)


def measure(root: str, stubs: str) -> dict:
    """Inside ComfyUI (this process): every (model, sampler, scheduler, steps) error."""
    dc, ncs, pos, lat, noise = _comfy_session(root, stubs)
    import torch
    import comfy.sample


    def reference(model, steps):
        guider = ncs.CFGGuider().get_guider(model, pos, pos, 1.0)[0]
        sig = dc.DeisFastScheduler().get_sigmas(model, "time_quadratic", steps)[0]
        sampler = dc.DeisFastSampler().get_sampler("rho_rk4")[0]
        return guider.sample(noise, lat, sampler, sig, disable_pbar=True, seed=0)

    out: dict = {"models": {}}
    for label, model in (("digits eps (VP, ModelSamplingDiscrete)", dc.digits_model("digits")),
                         ("digits flow (CONST, shift 1)", dc.digits_model("flow", 1.0))):
        t0 = time.time()
        ref = reference(model, 200)
        ref_err = rel(reference(model, 100), ref)
        rows = {}
        for name in COMFY_SAMPLERS + DEIS_FAST:
            for sched in SCHEDULERS:
                for n in STEPS:
                    x = comfy.sample.sample(model, noise, n, 1.0, name, sched, pos, pos, lat, seed=0,
                                            disable_pbar=True)
                    rows[f"{name}|{sched}|{n}"] = rel(x, ref) if bool(torch.isfinite(x).all()) else float("nan")
        out["models"][label] = {"reference_error": ref_err, "errors": rows, "seconds": time.time() - t0}
    return out


def rel(x, ref) -> float:
    """The median relative error of the project's quality tables (deis_fast.testing.relative_errors)."""
    from deis_fast.testing import relative_errors
    return float(relative_errors(x, ref).median())


def measure_lower_order_final(root: str, stubs: str) -> dict:
    """``--lower-order-final``: unipc3 / dpmpp3 / logrho3 through the DEIS-fast Sampler node with lower_order_final
    off / on / auto on ComfyUI's karras, simple and exponential lists (same models, noises and reference)."""
    dc, ncs, pos, lat, noise = _comfy_session(root, stubs, register=False)
    import comfy.sample
    import comfy.samplers

    rows = {}
    for label, model in (("eps (VP)", dc.digits_model("digits")), ("flow (CONST)", dc.digits_model("flow", 1.0))):
        guider = ncs.CFGGuider().get_guider(model, pos, pos, 1.0)[0]
        ref = guider.sample(noise, lat, dc.DeisFastSampler().get_sampler("rho_rk4")[0],
                            dc.DeisFastScheduler().get_sigmas(model, "time_quadratic", 200)[0], disable_pbar=True, seed=0)
        ms = model.get_model_object("model_sampling")
        for sched in ("karras", "simple", "exponential"):
            for n in STEPS:
                sig = comfy.samplers.calculate_sigmas(ms, sched, n)
                for m in ("unipc3", "dpmpp3", "logrho3"):
                    rows[f"{label}|{sched}|{n}|{m}"] = [
                        rel(guider.sample(noise, lat, dc.DeisFastSampler().get_sampler(m, lower_order_final=lof)[0],
                                          sig, disable_pbar=True, seed=0), ref) for lof in ("off", "on", "auto")]
    return rows


def table_lower_order_final(rows: dict) -> str:
    lines = ["| model | list | steps | unipc3 off / on / auto | dpmpp3 off / on / auto | logrho3 off / on / auto |",
             "|---|---|---|---|---|---|"]
    keys = sorted({tuple(k.split("|")[:3]) for k in rows}, key=lambda k: (k[0], k[1], int(k[2])))
    for model, sched, n in keys:
        cells = [" / ".join("%.4f" % v for v in rows[f"{model}|{sched}|{n}|{m}"]) for m in ("unipc3", "dpmpp3", "logrho3")]
        lines.append(f"| {model} | {sched} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


FLOW_STEPS = (4, 5, 8, 10)
FLOW_DEIS_FAST = ("deis_fast_rhoabm2", "deis_fast_tab3")
COMFY_OWN_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                        "linear_quadratic", "kl_optimal")
DEIS_FAST_SCHEDULERS = ("deis_fast_time_quadratic", "deis_fast_time_uniform", "deis_fast_logsnr", "deis_fast_karras",
                        "deis_fast_ays", "deis_fast_kl_optimal")


def measure_flow(root: str, stubs: str, tuned_dir: str) -> dict:
    """``--flow``: on the flow mixture and the embedded flow digits model (shift 1 and 3), every ComfyUI sampler and
    deis_fast's flow default (rhoabm2) on every scheduler, and a tuned file (``deis_fast.tuning.tune`` of rhoabm2's
    grid on this model's own schedule, seeds 1000+, never the 64 measured noises) through the nodes."""
    dc, ncs, pos, lat, noise = _comfy_session(root, stubs)
    import torch
    import comfy.sample
    from deis_fast import tuning
    from deis_fast.core.schedules import FlowSchedule
    from deis_fast.testing import reference_solution
    out: dict = {"models": {}}
    digits_ref = None
    for kind in ("mixture", "digits"):
        for shift in (1.0, 3.0):
            t0 = time.time()
            if kind == "mixture":
                model, mix = dc.flow_mixture_model(shift)
                ref = reference_solution(mix, FlowSchedule(), noise.double().reshape(N_NOISE, 64), 1.0, 0.0)
                ref = ref.reshape(noise.shape)
                ms = model.get_model_object("model_sampling")
                fn = mix.model(FlowSchedule(time_scale=1.0), "flow")
                tune_model = lambda x, t, fn=fn: fn(x.reshape(x.shape[0], 64), t).reshape(x.shape)  # noqa: E731
            else:
                model = dc.digits_model("flow", shift)
                guider = ncs.CFGGuider().get_guider(model, pos, pos, 1.0)[0]
                if digits_ref is None:
                    sig = dc.DeisFastScheduler().get_sigmas(model, "time_quadratic", 200)[0]
                    digits_ref = guider.sample(noise, lat, dc.DeisFastSampler().get_sampler("rho_rk4")[0], sig,
                                               disable_pbar=True, seed=0)
                ref = digits_ref
                ms = model.get_model_object("model_sampling")
                net = model.model.diffusion_model.net
                tune_model = lambda x, t, net=net, ms=ms: net(x, ms.timestep(t.float()).float())  # noqa: E731
            rows = {}
            for name in COMFY_SAMPLERS + FLOW_DEIS_FAST:
                for sched in COMFY_OWN_SCHEDULERS + DEIS_FAST_SCHEDULERS:
                    for n in FLOW_STEPS:
                        x = comfy.sample.sample(model, noise.clone(), n, 1.0, name, sched, pos, pos, lat, seed=0,
                                                disable_pbar=True)
                        rows[f"{name}|{sched}|{n}"] = rel(x, ref) if bool(torch.isfinite(x).all()) else float("nan")
            schedule = dc.model_schedule(ms)[1]
            guider = ncs.CFGGuider().get_guider(model, pos, pos, 1.0)[0]
            for n in FLOW_STEPS:
                t = tuning.tune(tune_model, schedule, "rhoabm2", n, prediction="flow", shape=(1, 8, 8), calibration=32,
                                held_out=8, seed=1000, time_budget=20.0, reference_nfe=200)
                path = os.path.join(tuned_dir, f"{kind}_shift{shift:g}_rhoabm2_nfe{n}.json")
                t.save(path)
                sig = dc.DeisFastScheduler().get_sigmas(model, "karras", n, 1.0, tuned_file=path)[0]
                x = guider.sample(noise.clone(), lat, dc.DeisFastSampler().get_sampler("rhoabm2", tuned_file=path)[0],
                                  sig, disable_pbar=True, seed=0)
                rows[f"tuned rhoabm2|tuned|{n}"] = rel(x, ref)
            out["models"][f"{kind} shift {shift:g}"] = {"errors": rows, "seconds": time.time() - t0}
    return out


def table_flow(res: dict) -> str:
    """The flow summary: deis_fast default (rhoabm2 on the FlowMatch grid = ComfyUI's simple), tuned, the best
    ComfyUI sampler on simple (the same grid), on ComfyUI's schedulers, on deis_fast's schedulers."""
    lines = ["| model | steps | deis_fast default (rhoabm2 / simple) | best ComfyUI on the same grid (simple) | "
             "ratio | deis_fast tuned | best ComfyUI, ComfyUI's schedulers | best ComfyUI, deis_fast's schedulers | "
             "tuned vs best ComfyUI anywhere | rhoabm2, best scheduler |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, m in res["models"].items():
        e = m["errors"]
        for n in FLOW_STEPS:
            def best(names, scheds):
                v, k = min((e[f"{a}|{s}|{n}"], f"{a} / {s}") for a in names for s in scheds
                           if e[f"{a}|{s}|{n}"] == e[f"{a}|{s}|{n}"])
                return v, k
            d = e[f"deis_fast_rhoabm2|simple|{n}"]
            same = best(COMFY_SAMPLERS, ("simple",))
            own = best(COMFY_SAMPLERS, COMFY_OWN_SCHEDULERS)
            theirs = best(COMFY_SAMPLERS, DEIS_FAST_SCHEDULERS)
            anywhere = min(own[0], theirs[0])
            tuned = e[f"tuned rhoabm2|tuned|{n}"]
            dbest = best(("deis_fast_rhoabm2",), COMFY_OWN_SCHEDULERS + DEIS_FAST_SCHEDULERS)
            lines.append(f"| {label} | {n} | {d:.4f} | {same[0]:.4f} ({same[1]}) | {same[0] / d:.2f}x | {tuned:.4f} | "
                         f"{own[0]:.4f} ({own[1]}) | {theirs[0]:.4f} ({theirs[1]}) | {anywhere / tuned:.2f}x | "
                         f"{dbest[0]:.4f} ({dbest[1].split(' / ')[1]}) |")
    return "\n".join(lines)


# ``--flow-tuned``: the committed tuned flow files (benchmarks/tuned/flow_digits_shift{1,3}_nfe{5,8}.json) on the
# embedded flow digits model, against every ComfyUI sampler on every scheduler, in one run. ``--tune`` first writes
# them with these settings (deis_fast.tuning.tune on the model's own ComfyUI schedule; per-sample seeds 1000-1287,
# never the 64 measured noises): a rhoabm2 grid search, then a learned plan (its coefficients and times) from it.
TUNED_STEPS = (5, 8)
TUNED_SETTINGS = dict(method="rhoabm2", calibration=256, held_out=32, seed=1000, time_budget=40.0, reference_nfe=200,
                      plan=True, plan_iters=600, plan_batch=64, plan_lr=8e-3)


def tuned_flow_path(tuned_dir: str, shift: float, n: int) -> str:
    return os.path.join(tuned_dir, f"flow_digits_shift{shift:g}_nfe{n}.json")


def measure_flow_tuned(root: str, stubs: str, tuned_dir: str, tune: bool) -> dict:
    """Inside ComfyUI: (re)tune the files with ``tune``, then measure them through the DEIS-fast Scheduler + Sampler
    nodes (tuned_file, method auto) next to every ComfyUI sampler on every scheduler and deis_fast's default."""
    dc, ncs, pos, lat, noise = _comfy_session(root, stubs)
    import torch
    import comfy.sample
    from deis_fast import tuning
    out: dict = {"models": {}, "settings": TUNED_SETTINGS}
    ref = None
    for shift in (1.0, 3.0):
        t0 = time.time()
        model = dc.digits_model("flow", shift)
        guider = ncs.CFGGuider().get_guider(model, pos, pos, 1.0)[0]
        if ref is None:   # the flow ODE does not depend on the shift (it only moves the grids): one reference
            sig = dc.DeisFastScheduler().get_sigmas(model, "time_quadratic", 200)[0]
            ref = guider.sample(noise, lat, dc.DeisFastSampler().get_sampler("rho_rk4")[0], sig, disable_pbar=True,
                                seed=0)
        ms = model.get_model_object("model_sampling")
        net = model.model.diffusion_model.net
        rows, files = {}, {}
        for n in TUNED_STEPS:
            path = tuned_flow_path(tuned_dir, shift, n)
            if tune:
                tuning.tune(lambda x, t: net(x, ms.timestep(t.float()).float()), dc.model_schedule(ms)[1],
                            nfe=n, prediction="flow", shape=(1, 8, 8), **TUNED_SETTINGS).save(path)
            t = tuning.load_tuned(path)
            files[n] = {"kind": t.kind, "method": t.method, "errors": t.errors, "seconds": t.meta.get("seconds")}
            sig = dc.DeisFastScheduler().get_sigmas(model, "karras", n, 1.0, tuned_file=path)[0]
            x = guider.sample(noise.clone(), lat, dc.DeisFastSampler().get_sampler("auto", tuned_file=path)[0], sig,
                              disable_pbar=True, seed=0)
            rows[f"tuned file|tuned|{n}"] = rel(x, ref)
            for name in COMFY_SAMPLERS + ("deis_fast_rhoabm2",):
                for sched in COMFY_OWN_SCHEDULERS + DEIS_FAST_SCHEDULERS:
                    x = comfy.sample.sample(model, noise.clone(), n, 1.0, name, sched, pos, pos, lat, seed=0,
                                            disable_pbar=True)
                    rows[f"{name}|{sched}|{n}"] = rel(x, ref) if bool(torch.isfinite(x).all()) else float("nan")
        out["models"][f"digits shift {shift:g}"] = {"errors": rows, "files": files, "seconds": time.time() - t0}
    return out


def table_flow_tuned(res: dict) -> str:
    lines = ["| model | steps | tuned file (kind; held-out error at tuning) | best ComfyUI sampler, any scheduler | "
             "ratio | deis_fast default (rhoabm2 / simple) |", "|---|---|---|---|---|---|"]
    for label, m in res["models"].items():
        e = m["errors"]
        for n in TUNED_STEPS:
            cells = [(e[f"{a}|{s}|{n}"], f"{a} / {s}") for a in COMFY_SAMPLERS
                     for s in COMFY_OWN_SCHEDULERS + DEIS_FAST_SCHEDULERS if e[f"{a}|{s}|{n}"] == e[f"{a}|{s}|{n}"]]
            best = min(cells)
            f = m["files"][str(n)] if str(n) in m["files"] else m["files"][n]
            tuned = e[f"tuned file|tuned|{n}"]
            lines.append(f"| {label} | {n} | {tuned:.4f} ({f['method']} {f['kind']}; {f['errors']['held_out_tuned']:.4f}) "
                         f"| {best[0]:.4f} ({best[1]}) | {best[0] / tuned:.2f}x | "
                         f"{e[f'deis_fast_rhoabm2|simple|{n}']:.4f} |")
    return "\n".join(lines)


# ``--flow-candidates``: candidates for the same-grid lead on ComfyUI's `simple` (the FlowMatch grid), 4-20 steps
CAND_STEPS = (4, 5, 6, 8, 10, 12, 15, 20)
CAND_COMFY = ("euler", "res_multistep", "deis", "ipndm_v")
CAND_NODE = (("rhoabm2", {}), ("rhoabm3", {}), ("tab3", {"corrector": "on"}), ("rhoab3", {"corrector": "on"}),
             ("unipc3", {}))


def measure_flow_candidates(root: str, stubs: str) -> dict:
    """Inside ComfyUI: the flow mixture and the flow digits model (shift 1 and 3), 32 noises, on `simple`: ComfyUI's
    euler, res_multistep, deis, ipndm_v (KSampler path) and deis_fast candidates (DEIS-fast Sampler node)."""
    dc, ncs, pos, lat, noise = _comfy_session(root, stubs, 32, register=False)
    import comfy.sample
    from deis_fast.core.schedules import FlowSchedule
    from deis_fast.testing import reference_solution
    out, digits_ref = {}, None
    for kind in ("mixture", "digits"):
        for shift in (1.0, 3.0):
            if kind == "mixture":
                model, mix = dc.flow_mixture_model(shift)
                ref = reference_solution(mix, FlowSchedule(), noise.double().reshape(32, 64), 1.0, 0.0)
                ref = ref.reshape(noise.shape)
            else:
                model = dc.digits_model("flow", shift)
                if digits_ref is None:
                    g = ncs.CFGGuider().get_guider(model, pos, pos, 1.0)[0]
                    digits_ref = g.sample(noise, lat, dc.DeisFastSampler().get_sampler("rho_rk4")[0],
                                          dc.DeisFastScheduler().get_sigmas(model, "time_quadratic", 200)[0],
                                          disable_pbar=True, seed=0)
                ref = digits_ref
            guider = ncs.CFGGuider().get_guider(model, pos, pos, 1.0)[0]
            for n in CAND_STEPS:
                sig = ncs.BasicScheduler().get_sigmas(model, "simple", n, 1.0)[0]
                row = {a: rel(comfy.sample.sample(model, noise.clone(), n, 1.0, a, "simple", pos, pos, lat, seed=0,
                                                  disable_pbar=True), ref) for a in CAND_COMFY}
                for m, kw in CAND_NODE:
                    x = guider.sample(noise.clone(), lat, dc.DeisFastSampler().get_sampler(m, **kw)[0], sig,
                                      disable_pbar=True, seed=0)
                    row[m + ("+corrector" if kw else "")] = rel(x, ref)
                out[f"{kind} shift {shift:g}|{n}"] = row
    return out


def table_flow_candidates(res: dict) -> str:
    names = list(next(iter(res.values())))
    lines = ["| model | steps | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key, row in res.items():
        best = min(row.values())
        cells = [("**%.4f**" if row[k] == best else "%.4f") % row[k] for k in names]
        lines.append("| " + " | ".join(key.split("|")) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(res: dict) -> str:
    lines = []
    for label, m in res["models"].items():
        e = m["errors"]
        for n in STEPS:
            lines += [f"**{label}, {n} steps** (= network calls)", "",
                      "| sampler | " + " | ".join(SCHEDULERS) + " |", "|---|" + "---|" * len(SCHEDULERS)]
            for name in COMFY_SAMPLERS + DEIS_FAST:
                vals = [e[f"{name}|{s}|{n}"] for s in SCHEDULERS]
                best = min(v for v in (e[f"{x}|{s}|{n}"] for x in COMFY_SAMPLERS + DEIS_FAST for s in SCHEDULERS)
                           if v == v)
                cells = [("**%.4f**" if v == best else "%.4f") % v for v in vals]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        lines.append(f"Reference accuracy (rho_rk4 100 vs 200 steps): {m['reference_error']:.1e}; "
                     f"{m['seconds']:.0f} s for this model.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "comfyui_quality.md"))
    ap.add_argument("--lower-order-final", action="store_true",
                    help="instead: lower_order_final off / on / auto for the third-order lambda methods (stdout)")
    ap.add_argument("--flow", action="store_true",
                    help="instead: flow models (mixture and digits, shift 1 and 3), deis_fast's flow default and a "
                         "tuned file against every ComfyUI sampler on every scheduler (writes --out .md / .json)")
    ap.add_argument("--flow-tuned", action="store_true",
                    help="instead: the committed tuned flow files on the flow digits model (shift 1 and 3, 5 and 8 "
                         "steps) against every ComfyUI sampler on every scheduler (writes --out .md / .json)")
    ap.add_argument("--flow-candidates", action="store_true",
                    help="instead: same-grid candidates (rhoabm2 / rhoabm3 / correctors / unipc3 vs ComfyUI's euler, "
                         "res_multistep, deis, ipndm_v) on `simple`, flow mixture and digits, shift 1 and 3 (stdout)")
    ap.add_argument("--tune", action="store_true", help="with --flow-tuned: (re)write the tuned files first")
    ap.add_argument("--tuned-dir", default=os.path.join(HERE, "tuned"), help="with --flow-tuned: where the files are")
    ap.add_argument("--inside", nargs=3, metavar=("ROOT", "STUBS", "JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.inside:
        if a.flow_tuned:
            res = measure_flow_tuned(a.inside[0], a.inside[1], a.tuned_dir, a.tune)
        elif a.flow_candidates:
            res = measure_flow_candidates(a.inside[0], a.inside[1])
        elif a.flow:
            res = measure_flow(a.inside[0], a.inside[1], os.path.dirname(a.inside[2]))
        else:
            res = (measure_lower_order_final if a.lower_order_final else measure)(a.inside[0], a.inside[1])
        with open(a.inside[2], "w") as f:
            json.dump(res, f)
        return 0
    src = os.environ.get("COMFYUI_PATH")
    if not src:
        print("set COMFYUI_PATH to a ComfyUI source tree", file=sys.stderr)
        return 2
    from deis_fast.testing import comfyui_sandbox
    with tempfile.TemporaryDirectory() as tmp:
        root, stubs = comfyui_sandbox(src, tmp)
        js = os.path.join(tmp, "r.json")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        extra = ["--lower-order-final"] if a.lower_order_final else ["--flow"] if a.flow else []
        if a.flow_candidates:
            extra = ["--flow-candidates"]
        if a.flow_tuned:
            extra = ["--flow-tuned", "--tuned-dir", os.path.abspath(a.tuned_dir)] + (["--tune"] if a.tune else [])
        subprocess.run([sys.executable, os.path.abspath(__file__), "--inside", root, stubs, js] + extra, check=True,
                       cwd=tmp, env=env)
        res = json.load(open(js))
    if a.lower_order_final:
        print(table_lower_order_final(res))
        return 0
    if a.flow_candidates:
        print(table_flow_candidates(res))
        return 0
    if a.flow or a.flow_tuned:
        md = table_flow_tuned(res) if a.flow_tuned else table_flow(res)
        with open(a.out.replace(".md", ".json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(a.out, "w") as f:
            f.write(md + "\n")
        print(md)
        return 0
    md = table(res)
    with open(a.out, "w") as f:
        f.write("# Samplers inside ComfyUI (digits models)\n\n`COMFYUI_PATH=... python benchmarks/comfyui_quality.py`"
                "; median relative error to a fine solution from the same 64 noises; bold: the best of the "
                "table.\n\n" + md)
    with open(a.out.replace(".md", ".json"), "w") as f:
        json.dump(res, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
