"""Every ```python block of README.md and of the docs/ pages runs, as written, each on its own.

How it works (follow this when you add a snippet):

* Each block runs in a fresh namespace, so a block must define what it uses (imports, the model, the schedule):
  a reader can paste any one block alone. ``deis_fast.load_model("digits" | "flow")`` (the embedded 8x8 models)
  is the model to use where a snippet needs one.
* What a snippet cannot define offline is a *stand-in* in :func:`standins`: a name the snippet uses as a
  placeholder for the user's own thing (``model_id`` = a tiny Stable Diffusion pipeline saved to a temporary
  folder, ``flux_id`` = a tiny FLUX pipeline with CLIP and T5 text encoders, likewise, ``prompt``, ``init``,
  ``mask``). Add the smallest one that works.
* ``SHRINK``: (text, replacement) pairs applied to the blocks only to make them cheap (fewer noises or steps),
  never to change what they do; each must occur in some block.
* ``SKIP``: {text that identifies a block: why it cannot run here}. Keep it short; each key must match exactly
  one block, so that a stale entry fails.
* Each block is one test (``test_snippet[docs/x.md:N]``), run in a temporary working folder (files it writes, e.g.
  ``save_plan(..., "x.json")``, land there).
"""
from __future__ import annotations

import os
import re
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))

SKIP: dict[str, str] = {
    "num_gpus=1), route_prefix": "one replica per GPU (no GPU here); tests/serving/test_serving_ray.py runs the same "
                                 "deployment with 2 CPU replicas",
}
SHRINK = [
    ("torch.randn(768, 1, 8, 8)", "torch.randn(12, 1, 8, 8)"),                          # learned plan: 12 noises
    ("learn_plan(model, sched, plan, z0, ref)", "learn_plan(model, sched, plan, z0, ref, iters=3, batch=8)"),
    ('Sampler(model, sched, "rho_rk4", 400, "logsnr")', 'Sampler(model, sched, "rho_rk4", 40, "logsnr")'),
]


def readme_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of ``text`` (indented ones in list items too), dedented."""
    pattern = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)
    return [textwrap.dedent(m.group(2)) for m in pattern.finditer(text)]


def shrink(code: str) -> str:
    for old, new in SHRINK:
        code = code.replace(old, new)
    return code


def skip_reason(code: str) -> str | None:
    return next((why for key, why in SKIP.items() if key in code), None)


BLOCKS = {f"{doc}:{i}": code for doc in DOCS
          for i, code in enumerate(readme_blocks(open(os.path.join(ROOT, doc), encoding="utf-8").read()))}


def test_readme_has_snippets_and_the_lists_are_current():
    assert sum(k.startswith("README.md:") for k in BLOCKS) >= 3 and len(BLOCKS) >= 10
    for key in SKIP:
        assert sum(key in b for b in BLOCKS.values()) == 1, f"SKIP key {key!r} must match exactly one block"
    for old, _ in SHRINK:
        assert any(old in b for b in BLOCKS.values()), f"SHRINK text {old!r} is in no block"


def _tiny_sd_folder(folder: str) -> str:
    """A tiny Stable Diffusion pipeline (random weights, SD's PNDM scheduler config) saved to ``folder``."""
    pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test]'")
    from _diffusers_common import tiny_sd_components
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    parts = tiny_sd_components(folder, dtype=torch.float32)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          set_alpha_to_one=False, steps_offset=1)
    path = os.path.join(folder, "tiny-sd")
    StableDiffusionPipeline(**parts, scheduler=sched).save_pretrained(path)
    return path


def _tiny_flux_folder(folder: str) -> str:
    """A tiny FluxPipeline (random weights, FLUX.1-dev's dynamic-shift scheduler config) saved to ``folder``: the
    transformer and VAE of tests/_diffusers_common.py, a 1-layer CLIP text encoder (pooled output, dim 16) with the
    CLIPTokenizer of ``tiny_tokenizer`` and a 1-layer T5 encoder (dim 16) with a T5Tokenizer built from a Unigram
    vocabulary of the same words (no download). FluxPipeline's default size is 128 * vae_scale_factor (1 here):
    128x128 images, 4096 image tokens, ~0.25 s a transformer call; the img2img pipeline resizes ``init`` to that."""
    pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test]'")
    from _diffusers_common import tiny_flux_pipeline
    pipe = tiny_flux_pipeline(folder, torch.float32)
    path = os.path.join(folder, "tiny-flux")
    pipe.save_pretrained(path)
    return path


def standins(folder: str) -> dict:
    """The placeholders README snippets use for the user's own things (see the module docstring)."""
    from PIL import Image
    return {
        "model_id": _tiny_sd_folder(folder),
        "flux_id": _tiny_flux_folder(folder),
        "prompt": "a photo of a cat",
        "init": Image.new("RGB", (8, 8), (120, 60, 200)),
        "mask": Image.new("L", (8, 8), 255),
    }


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("snippets"))
    return folder, standins(folder)


@pytest.mark.parametrize("key", list(BLOCKS))
def test_snippet(key, stand_ins, tmp_path, monkeypatch):
    code = BLOCKS[key]
    why = skip_reason(code)
    if why is not None:
        pytest.skip(why)
    folder, names = stand_ins
    used = {k: v for k, v in names.items() if re.search(rf"\b{k}\b", code)}
    ns = {"__name__": "snippet"} | used
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(shrink(code), f"{key} (python block)", "exec"), ns)
    assert len(ns) > 1 + len(used)   # the block ran and defined something

