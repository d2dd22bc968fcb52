"""``deis-fast tune`` on pipeline folders (Stable Diffusion, SDXL, SD3, FLUX), then the pipeline itself with the tuned
file against the untuned DEISFastScheduler and the pipeline's own scheduler, on held-out prompts.

Tiny pipelines with random weights, built from local parts (tests/_diffusers_common.py: SD 8x8 UNet + CLIP; SDXL
UNet with add_time_ids + two CLIPs; SD3 joint transformer + two CLIPs with projection + T5, FlowMatchEuler shift 3;
FLUX transformer with guidance embedding + CLIP + T5, FLUX.1-dev's dynamic shift at 16x16: 64 image tokens, mu
0.4675), float32, one CPU thread. For each pipeline and NFE: the real command line ``deis-fast tune --model FOLDER
--prompts P --calibration 8 --held-out 4 --nfe N`` (the method search; the pipeline's default guidance), then the
pipeline loaded from the folder runs the 4 held-out prompts from tune's held-out noises (seeds 8..11) at N steps
with (a) its own scheduler, (b) ``DEISFastScheduler.from_config(config)``, (c) the same with ``tuned=FILE``;
reported: median relative error of the latents to a fine solve through the same pipeline (DEISFastScheduler
rho_rk4 at 400 NFE).

    python benchmarks/pipeline_tuning.py --nfe 5 8 --out-md benchmarks/pipeline_tuning.md
"""
import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from _diffusers_common import (tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline,  # noqa: E402
                               tiny_sdxl_pipeline)
from diffusers import DiffusionPipeline  # noqa: E402

from deis_fast.cli import main as cli  # noqa: E402
from deis_fast.integrations.diffusers import DEISFastScheduler  # noqa: E402
from deis_fast.sampler import randn_per_sample  # noqa: E402
from deis_fast.testing import relative_errors  # noqa: E402
from deis_fast.tuning.files import _label, load_tuned  # noqa: E402

PROMPTS = ["a b c", "d e f", "g h", "i j k l", "m a", "b d f h", "c e g", "j l",     # calibration
           "k m", "a c e g", "f i", "h j l m"]                                      # held out
BUILD = {"sd": (lambda d: tiny_sd_pipeline(d, letters=True), {}),
         "sdxl": (lambda d: tiny_sdxl_pipeline(d, letters=True), {}),
         "sd3": (lambda d: tiny_sd3_pipeline(d, letters=True), {}),
         "flux": (lambda d: tiny_flux_pipeline(d, guidance_embeds=True, letters=True), {"height": 16, "width": 16})}


def run(pipe, sch, n, z, size, guidance):
    pipe.scheduler = sch
    return pipe(PROMPTS[8:], num_inference_steps=n, latents=z.clone(), output_type="latent", guidance_scale=guidance,
                **size).images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipelines", nargs="+", default=list(BUILD))
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 8])
    ap.add_argument("--time-budget", type=float, default=20.0)
    ap.add_argument("--reference-nfe", type=int, default=200, help="--reference-nfe of deis-fast tune")
    ap.add_argument("--out-md", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    work = tempfile.mkdtemp()
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    rows = []
    for name in a.pipelines:
        build, size = BUILD[name]
        folder = os.path.join(work, name)
        os.makedirs(folder)
        build(folder).save_pretrained(folder)
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        own = pipe.scheduler
        fine = None
        for n in a.nfe:
            out = os.path.join(work, f"{name}_nfe{n}.json")
            t0 = time.time()
            rc = cli.main(["tune", "--model", folder, "--prompts", prompts, "--calibration", "8", "--held-out", "4",
                           "--nfe", str(n), "--time-budget", str(a.time_budget), "--reference-nfe",
                           str(a.reference_nfe), "--cache", "", "--quiet", "--out", out]
                          + [f"--{k}={v}" for k, v in size.items()])
            assert rc == 0
            secs = time.time() - t0
            t = load_tuned(out)
            z = randn_per_sample((4,) + tuple(t.meta["latent_shape"]), range(8, 12))
            g = t.guidance_scale
            if fine is None:
                fine = run(pipe, DEISFastScheduler.from_config(own.config, method="rho_rk4"), 400, z, size, g)

            def err(x):
                return float(relative_errors(x, fine).median())
            e_own = err(run(pipe, own, n, z, size, g))
            e_un = err(run(pipe, DEISFastScheduler.from_config(own.config), n, z, size, g))
            e_tu = err(run(pipe, DEISFastScheduler.from_config(own.config, tuned=out), n, z, size, g))
            rows.append((type(pipe).__name__, type(own).__name__, n, g, _label(t.method, t.options), t.kind,
                         e_own, e_un, e_tu, secs))
            print(rows[-1], flush=True)
    lines = ["| pipeline | NFE | guidance | its own scheduler | DEISFastScheduler, untuned | tuned file (method) | "
             "untuned / tuned | tune seconds |", "|---|---|---|---|---|---|---|---|"]
    for p, own, n, g, m, kind, e_own, e_un, e_tu, secs in rows:
        lines.append(f"| {p} | {n} | {g} | {e_own:.4g} ({own}) | {e_un:.4g} | {e_tu:.4g} ({m}, {kind}) | "
                     f"{e_un / e_tu:.2f}x | {secs:.0f} |")
    text = "\n".join(lines)
    print(text)
    if a.out_md:
        with open(a.out_md, "w") as f:
            f.write(f"`python benchmarks/pipeline_tuning.py {' '.join(argv or sys.argv[1:])}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
