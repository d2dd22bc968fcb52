"""Tuning for FLUX, SD3 and SDXL pipelines: each family's denoiser as tune_pipeline calls it is the pipeline's own
(a core run of the scheduler's plan equals the pipeline's run); ``deis-fast tune`` on a tiny FLUX and a tiny SD3
pipeline folder (8 calibration prompts, 4 held out) writes a file with which DEISFastScheduler, inside the pipeline
loaded from that folder, beats the untuned scheduler on the held-out prompts (the error to a fine solve through the
pipeline); tune_pipeline works on SDXL."""
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test]'")
from diffusers import DiffusionPipeline  # noqa: E402

from deis_fast import tuning  # noqa: E402
from deis_fast.integrations.diffusers import DEISFastScheduler, tune_pipeline  # noqa: E402
from deis_fast.integrations.diffusers.pipeline import _PipelineDenoiser, _family_of  # noqa: E402
from deis_fast.sampler import Sampler, randn_per_sample  # noqa: E402

from _diffusers_common import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAL = ["a b c", "d e f", "g h", "i j k l", "m a", "b d f h", "c e g", "j l"]
HELD_OUT = ["k m", "a c e g", "f i", "h j l m"]
NFE = 6
# FLUX at 16x16 (64 image tokens: mu 0.4675), its distilled guidance embedding at 3.5; SD3 at its 8x8, CFG 7
BUILD = {"flux": (lambda d: tiny_flux_pipeline(d, guidance_embeds=True, letters=True), dict(height=16, width=16)),
         "sd3": (lambda d: tiny_sd3_pipeline(d, letters=True), {}),
         "sdxl": (lambda d: tiny_sdxl_pipeline(d, letters=True), {})}


def _quiet(f, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*a, **k)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return {k: _quiet(build, str(tmp_path_factory.mktemp(k))) for k, (build, _) in BUILD.items()}


def _run(pipe, sch, prompts, n, latents, size):
    """The pipeline's latents for ``prompts`` from ``latents`` with scheduler ``sch`` at ``n`` steps."""
    saved, pipe.scheduler = pipe.scheduler, sch
    try:
        return _quiet(pipe, prompts, num_inference_steps=n, latents=latents.clone(), output_type="latent",
                      **size).images
    finally:
        pipe.scheduler = saved


def _scheduler(pipe, **kw):
    return _quiet(DEISFastScheduler.from_config, pipe.scheduler.config, **kw)


def _median_rel(x, ref):
    return float(((x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).median())


@pytest.mark.parametrize("family", list(BUILD))
def test_the_tuned_denoiser_is_the_pipelines_own(pipes, family):
    """The core sampler on tune_pipeline's denoiser and conditioning, with the plan the scheduler runs in the pipeline
    (FLUX: its sigmas and mu), gives the pipeline's own result: the model tuned is the one the pipeline runs."""
    pipe, size = pipes[family], BUILD[family][1]
    fam = _family_of(pipe)(pipe, 4.0 if family != "flux" else 3.5, None, size.get("height"), size.get("width"))
    sch = _scheduler(pipe, method="tab3")
    fam.set_timesteps(sch, 3)
    z = randn_per_sample((2,) + fam.shape, range(2), dtype=fam.net.dtype)
    model = _PipelineDenoiser(fam.net, fam.call, fam.guidance)
    ours = Sampler(model, sch.schedule, plan=sch.plan, prediction=sch.prediction)(z, **_quiet(fam.encode, HELD_OUT[:2]))
    theirs = _run(pipe, _scheduler(pipe, method="tab3"), HELD_OUT[:2], 3, z,
                  dict(size, guidance_scale=fam.guidance))
    if family == "flux":
        assert sch.schedule.shift == pytest.approx(2.718281828 ** 0.4675) and fam.shape == (64, 4)
    assert (ours - theirs).norm() / theirs.norm() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cli_tuned_file_beats_untuned_inside_the_pipeline(pipes, family, tmp_path, capsys):
    from deis_fast.cli import main as cli
    folder = tmp_path / family
    pipes[family].save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAL + HELD_OUT) + "\n")
    out = tmp_path / f"{family}.json"
    size = BUILD[family][1]
    extra = [f"--{k}={v}" for k, v in size.items()]
    rc = _quiet(cli.main, ["tune", "--model", str(folder), "--prompts", str(prompts), "--calibration", "8",
                           "--held-out", "4", "--method", "tab3", "--nfe", str(NFE), "--time-budget", "8",
                           "--reference-nfe", "120", "--cache", "", "--quiet", "--out", str(out), *extra])
    assert rc == 0, capsys.readouterr().err[-3000:]
    t = tuning.load_tuned(out)
    pipe = _quiet(DiffusionPipeline.from_pretrained, str(folder))   # the folder as a user loads it
    assert t.pipeline == type(pipe).__name__ and t.meta["held_out_prompts"] == HELD_OUT and t.kind == "grid"
    assert t.guidance_scale == {"flux": 3.5, "sd3": 7.0}[family]
    # the held-out prompts' noises, as tune_pipeline drew them (seeds after the 8 calibration ones)
    z = randn_per_sample((4,) + tuple(t.meta["latent_shape"]), range(8, 12), dtype=pipe.transformer.dtype)
    fine = _run(pipe, _scheduler(pipe, method="rho_rk4"), HELD_OUT, 200, z, size)
    untuned = _run(pipe, _scheduler(pipe, method="tab3"), HELD_OUT, NFE, z, size)
    tuned = _run(pipe, _scheduler(pipe, tuned=str(out)), HELD_OUT, NFE, z, size)
    before, after = _median_rel(untuned, fine), _median_rel(tuned, fine)
    print(f"{family}: held-out error through the pipeline, untuned {before:.4g} -> tuned {after:.4g} "
          f"(file: {t.errors['held_out_untuned']:.4g} -> {t.errors['held_out_tuned']:.4g})")
    assert after < before, (before, after)
    # the file's held-out numbers (core sampler, rho_rk4 @ 120 reference) are the pipeline's
    assert after == pytest.approx(t.errors["held_out_tuned"], rel=0.1)
    assert before == pytest.approx(t.errors["held_out_untuned"], rel=0.1)
    if family == "flux":   # FLUX's mu follows the image size: at another size the file's schedule is not the one run
        with pytest.raises(tuning.TunedMismatchError, match="schedule"):
            _run(pipe, _scheduler(pipe, tuned=str(out)), HELD_OUT, NFE, torch.zeros(4, 256, 4),
                 dict(height=32, width=32))


def test_sdxl_tune_pipeline_writes_a_file_the_pipeline_runs(pipes, tmp_path):
    pipe = pipes["sdxl"]
    t = _quiet(tune_pipeline, pipe, CAL[:4], HELD_OUT[:2], "tab3", 4, time_budget=2, reference_nfe=40)
    assert t.pipeline == "StableDiffusionXLPipeline" and t.guidance_scale == 5.0 and t.resolution == [8, 8]
    assert t.errors["held_out_tuned"] <= t.errors["held_out_untuned"] and t.meta["latent_shape"] == [4, 8, 8]
    t.save(tmp_path / "sdxl.json")
    z = randn_per_sample((2, 4, 8, 8), range(4, 6), dtype=pipe.unet.dtype)
    x = _run(pipe, _scheduler(pipe, tuned=str(tmp_path / "sdxl.json")), HELD_OUT[:2], 4, z, {})
    assert torch.isfinite(x).all()


def test_unsupported_pipelines_and_options_say_what_to_do(pipes):
    with pytest.raises(NotImplementedError, match="true CFG"):
        tune_pipeline(pipes["flux"], CAL[:2], HELD_OUT[:1], negative_prompt="blurry", height=16, width=16)
    with pytest.raises(NotImplementedError, match="wrap its denoiser"):
        tune_pipeline(object(), CAL[:2], HELD_OUT[:1])
    with pytest.raises(ValueError, match="multiples of 2"):
        tune_pipeline(pipes["flux"], CAL[:2], HELD_OUT[:1], height=15, width=16)
