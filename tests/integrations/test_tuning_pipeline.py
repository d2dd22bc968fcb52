"""Tuning for a diffusers pipeline: a tiny Stable Diffusion pipeline from local random-weight parts is tuned on 8
prompts and checked on 4 others; DEISFastScheduler loaded with the file beats the untuned one there (the error to a
fine solve of the same guided ODE through the pipeline), survives save_config, and refuses another NFE / method."""
import json
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test]'")
from diffusers import PNDMScheduler, StableDiffusionPipeline  # noqa: E402

from deis_fast import tuning  # noqa: E402
from deis_fast.integrations.diffusers import DEISFastScheduler, tune_pipeline  # noqa: E402
from deis_fast.sampler import randn_per_sample  # noqa: E402

from _diffusers_common import letter_tokenizer, tiny_sd_components  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAL = ["a b c", "d e f", "g h", "i j k l", "m a", "b d f h", "c e g", "j l"]
HELD_OUT = ["k m", "a c e g", "f i", "h j l m"]
GUIDANCE, NFE, METHOD = 3.0, 6, "tab3"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_sd_tune"))
    parts = dict(tiny_sd_components(folder, torch.float64), tokenizer=letter_tokenizer(folder))
    sd_config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                     steps_offset=1)   # Stable Diffusion's scheduler config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StableDiffusionPipeline(scheduler=PNDMScheduler(**sd_config), **parts)


@pytest.fixture(scope="module")
def tuned_file(pipe, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PNDM's skip_prk_steps: the one "ignored keys" warning
        t = tune_pipeline(pipe, CAL, HELD_OUT, METHOD, NFE, guidance_scale=GUIDANCE, time_budget=8,
                                 reference_nfe=120)
    path = tmp_path_factory.mktemp("tuned") / "sd.json"
    t.save(path)
    return t, str(path)


def _scheduler(pipe, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DEISFastScheduler.from_config(pipe.scheduler.config, **kw)


def _latents(pipe, sch, n, latents):
    saved = pipe.scheduler
    pipe.scheduler = sch
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pipe(HELD_OUT, num_inference_steps=n, guidance_scale=GUIDANCE, latents=latents.clone(), height=8,
                        width=8, output_type="latent").images
    finally:
        pipe.scheduler = saved


def _median_rel(x, ref):
    return float(((x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).median())


def test_tuned_scheduler_beats_untuned_on_held_out_prompts(pipe, tuned_file, tmp_path):
    t, path = tuned_file
    assert t.pipeline == "StableDiffusionPipeline" and t.resolution == [8, 8] and t.guidance_scale == GUIDANCE
    assert t.meta["held_out_prompts"] == HELD_OUT and t.kind == "grid"
    # the held-out prompts' noises, as tune_pipeline drew them (seeds after the 8 calibration ones)
    z = randn_per_sample((4, 4, 8, 8), range(len(CAL), len(CAL) + 4), dtype=torch.float64)
    fine = _latents(pipe, _scheduler(pipe, method="rho_rk4"), 200, z)
    untuned = _latents(pipe, _scheduler(pipe, method=METHOD), NFE, z)
    sch = _scheduler(pipe, method=METHOD, tuned=path)
    tuned = _latents(pipe, sch, NFE, z)
    before, after = _median_rel(untuned, fine), _median_rel(tuned, fine)
    assert after < before, (before, after)
    # the file's held-out number (core sampler, rho_rk4 @ 120 reference) agrees with the pipeline's to a few %
    assert after == pytest.approx(t.errors["held_out_tuned"], rel=0.2)
    # save_config / from_pretrained keep the tuned file
    sch.save_config(tmp_path)
    back = DEISFastScheduler.from_pretrained(tmp_path)
    assert back.config.tuned == path
    back.set_timesteps(NFE)
    sch.set_timesteps(NFE)
    assert torch.equal(back.timesteps, sch.timesteps) and back.plan.times == tuple(t.grid)


def test_tuned_scheduler_refuses_other_nfe_method_and_schedule(pipe, tuned_file, tmp_path):
    t, path = tuned_file
    sch = _scheduler(pipe, method=METHOD, tuned=path)
    with pytest.raises(tuning.TunedMismatchError, match=f"NFE {NFE}, not 9"):
        sch.set_timesteps(9)
    with pytest.raises(tuning.TunedMismatchError, match="method 'tab3', not 'ipndm4'"):
        _scheduler(pipe, method="ipndm4", tuned=path)
    with pytest.raises(tuning.TunedMismatchError, match="schedule"):
        DEISFastScheduler(method=METHOD, tuned=path)   # diffusers' default linear betas, not SD's
    bad = json.loads(open(path).read())
    bad["payload"]["nfe"] = 9
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(tuning.TunedFileError, match="checksum"):
        _scheduler(pipe, method=METHOD, tuned=str(tmp_path / "bad.json"))
    with pytest.warns(UserWarning, match="guidance scale"):
        t.check(guidance_scale=7.5)
    sch.set_timesteps(NFE)
    big = torch.zeros(1, 4, 16, 16, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"latents \[4, 8, 8\].*\[4, 16, 16\]"):
        sch.step(big, sch.timesteps[0], big)


def test_cli_tunes_a_pipeline_folder(pipe, tmp_path, capsys):
    from deis_fast.cli import main as cli
    folder = tmp_path / "sd"
    pipe.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAL[:2] + HELD_OUT[:1]) + "\n")
    out = tmp_path / "sd3.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(["tune", "--model", str(folder), "--prompts", str(prompts), "--calibration", "2", "--held-out",
                       "1", "--noises-per-prompt", "2", "--nfe", "3", "--guidance-scale", "2", "--time-budget", "1",
                       "--reference-nfe", "20", "--cache", "", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0 and "| untuned (tab3, default grid) |" in cap.out and "method search" in cap.out, cap.err[-3000:]
    t = tuning.load_tuned(out)
    assert t.pipeline == "StableDiffusionPipeline" and t.meta["held_out_prompts"] == HELD_OUT[:1]
    assert t.guidance_scale == 2.0 and t.nfe == 3 and t.errors["held_out_tuned"] <= t.errors["held_out_untuned"]
    assert cli.main(["tune", "--model", str(folder), "--prompts", str(prompts), "--calibration", "3", "--held-out",
                     "1", "--out", str(out)]) == 2
    assert "has 3 prompts" in capsys.readouterr().err
