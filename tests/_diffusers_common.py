"""Shared pieces of the diffusers tests: a float64 DEIS reference, a pipeline-style scheduler loop, and tiny
Stable Diffusion, SD3 and FLUX components (random weights, created locally: no download)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from diffusers import DEISMultistepScheduler


class DEIS64(DEISMultistepScheduler):
    """diffusers' DEIS with its sigmas promoted to float64 after set_timesteps (its coefficients are otherwise
    computed in float32, ~6e-5 relative drift from the exact float64 formulas at some step counts)."""

    def set_timesteps(self, *a, **k):
        super().set_timesteps(*a, **k)
        self.sigmas = self.sigmas.double()


def parity_rel(a, b) -> float:
    """||a - b|| / ||b||; with DEIS_FAST_PARITY_LOG set, each value is appended there with the test's name (the
    numbers the drop-in parity tests measured)."""
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    r = float((a - b).norm() / b.norm())
    log = os.environ.get("DEIS_FAST_PARITY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{r:.3e}\n")
    return r


def scheduler_loop(sch, model, x, start=0, blend=None):
    """What a pipeline does: call the model at timesteps[start:], step, optionally blend the state after each step
    (``blend(x, next_timestep)``, the inpainting pipelines' known-region update)."""
    ts = sch.timesteps[start:]
    for i, t in enumerate(ts):
        x = sch.step(model(x, torch.full((x.shape[0],), float(t), dtype=x.dtype)), t, x).prev_sample
        if blend is not None:
            x = blend(x, ts[i + 1] if i + 1 < len(ts) else None)
    return x


def tiny_tokenizer(folder: str):
    """A CLIPTokenizer from a 12-word vocabulary written to ``folder`` (no download)."""
    from transformers import CLIPTokenizer
    words = ["a</w>", "cat</w>", "dog</w>", "photo</w>", "of</w>", "painting</w>", "blurry</w>"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, **{w: 3 + i for i, w in enumerate(words)}}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=8)


def tiny_sd_components(folder: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict:
    """UNet2DConditionModel (4 latent channels, 8x8), AutoencoderKL (scale factor 1) and a 1-layer CLIP text
    encoder, randomly initialised: one UNet call costs ~30 ms on one CPU thread."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    return dict(unet=unet.to(dtype).eval(), vae=vae.to(dtype).eval(), text_encoder=text.to(dtype).eval(),
                tokenizer=tiny_tokenizer(folder), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def _tiny_vae(latent_channels: int, dtype: torch.dtype, **kw):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=latent_channels,
                         norm_num_groups=latent_channels, sample_size=8, shift_factor=0.06, scaling_factor=1.5,
                         **kw).to(dtype).eval()


def tiny_sdxl_components(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict:
    """An SDXL-style UNet2DConditionModel (text_time added conditioning: pooled embedding + the 6 size / crop ids)
    and AutoencoderKL; no text encoders: the tests pass prompt and pooled embeddings (dim 16)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4)
    return dict(unet=unet.to(dtype).eval(), vae=_tiny_vae(4, dtype), text_encoder=None, text_encoder_2=None,
                tokenizer=None, tokenizer_2=None)


def tiny_sd3_components(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict:
    """SD3Transformer2DModel (1 joint block, 4 latent channels, 8x8) and AutoencoderKL; no text encoders: the
    tests pass prompt embeddings. One transformer call costs ~2 ms on one CPU thread."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                        pooled_projection_dim=16, out_channels=4)
    return dict(transformer=transformer.to(dtype).eval(), vae=_tiny_vae(4, dtype),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=None, tokenizer=None,
                text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def tiny_flux_components(dtype: torch.dtype = torch.float64, seed: int = 0, guidance_embeds: bool = False) -> dict:
    """FluxTransformer2DModel (1 double + 1 single block; 1 latent channel packed 2x2 into 4; with
    ``guidance_embeds``, FLUX.1-dev's distilled guidance embedding) and AutoencoderKL, with FLUX.1-dev's dynamic-shift
    scheduler config; no text encoders: the tests pass prompt embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=[2, 2, 4],
                                         guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return dict(transformer=transformer.to(dtype).eval(), scheduler=scheduler,
                vae=_tiny_vae(1, dtype, use_quant_conv=False, use_post_quant_conv=False), text_encoder=None,
                tokenizer=None, text_encoder_2=None, tokenizer_2=None)


# ----------------------------------------------------------------------------------- whole tiny pipelines (prompts)
WORDS = ["a", "cat", "dog", "photo", "of", "painting", "blurry"]   # tiny_tokenizer's vocabulary
LETTERS = list("abcdefghijklm")   # letter_tokenizer's: one token each (CLIPTokenizer without merges splits words)


def letter_tokenizer(folder: str):
    """A CLIPTokenizer whose words are the single letters of LETTERS (16 ids with the specials; no download)."""
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, **{f"{w}</w>": 3 + i for i, w in enumerate(LETTERS)}}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=8)


def _clip_tokenizer(folder: str, letters: bool):
    return letter_tokenizer(folder) if letters else tiny_tokenizer(folder)


def tiny_clip(hidden: int = 16, projection: int | None = None, layers: int = 1, seed: int = 0):
    """A CLIP text encoder over ``tiny_tokenizer``'s ids (with ``projection``: CLIPTextModelWithProjection, the
    pooled projection SDXL's and SD3's pipelines read)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=16, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_t5(d_model: int = 16, seed: int = 0, words: list[str] = WORDS):
    """(T5EncoderModel with 1 layer, T5Tokenizer over a Unigram vocabulary of ``words``): no download."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    torch.manual_seed(seed)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                 num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    return t5.eval(), T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_sd_pipeline(folder: str, dtype: torch.dtype = torch.float32, letters: bool = False):
    """A StableDiffusionPipeline: tiny_sd_components (``letters``: with ``letter_tokenizer``) and SD's PNDM config."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    parts = tiny_sd_components(folder, dtype)
    if letters:
        parts["tokenizer"] = letter_tokenizer(folder)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(scheduler=sched, **parts)


def tiny_flux_pipeline(folder: str, dtype: torch.dtype = torch.float32, guidance_embeds: bool = False,
                       letters: bool = False):
    """A FluxPipeline: the transformer and VAE of tiny_flux_components, a 1-layer CLIP text encoder (pooled output,
    dim 16) with ``tiny_tokenizer`` (``letters``: ``letter_tokenizer``) and a 1-layer T5 encoder (dim 16) over the
    same words; FLUX.1-dev's dynamic-shift scheduler."""
    from diffusers import FluxPipeline
    parts = tiny_flux_components(dtype=dtype, guidance_embeds=guidance_embeds)
    t5, t5_tok = tiny_t5(16, words=LETTERS if letters else WORDS)
    parts.update(text_encoder=tiny_clip(16).to(dtype), tokenizer=_clip_tokenizer(folder, letters),
                 text_encoder_2=t5.to(dtype), tokenizer_2=t5_tok)
    return FluxPipeline(**parts)


def tiny_sd3_pipeline(folder: str, dtype: torch.dtype = torch.float32, t5: bool = True, letters: bool = False):
    """A StableDiffusion3Pipeline: the transformer and VAE of tiny_sd3_components (SD3's FlowMatchEuler, shift 3),
    two 2-layer CLIP text encoders with projection (hidden 8 each, concatenated to the joint dim 16; pooled 8 + 8)
    and, with ``t5``, a 1-layer T5 encoder (dim 16; without it the pipeline pads with zeros, as SD3 allows); tokenizers
    as tiny_flux_pipeline's."""
    from diffusers import StableDiffusion3Pipeline
    parts = tiny_sd3_components(dtype=dtype)
    tok = _clip_tokenizer(folder, letters)
    parts.update(text_encoder=tiny_clip(8, 8, 2, seed=1).to(dtype), tokenizer=tok,
                 text_encoder_2=tiny_clip(8, 8, 2, seed=2).to(dtype), tokenizer_2=tok)
    if t5:
        enc, tok = tiny_t5(16, seed=3, words=LETTERS if letters else WORDS)
        parts.update(text_encoder_3=enc.to(dtype), tokenizer_3=tok)
    return StableDiffusion3Pipeline(**parts)


def tiny_sdxl_pipeline(folder: str, dtype: torch.dtype = torch.float32, letters: bool = False):
    """A StableDiffusionXLPipeline: the UNet and VAE of tiny_sdxl_components, a 2-layer CLIP text encoder (hidden
    8) and a 2-layer CLIP with projection (hidden 8, pooled 16): their penultimate states concatenated are the UNet's
    16-dim cross-attention; SDXL's EulerDiscrete config; tokenizers as tiny_flux_pipeline's."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    parts = tiny_sdxl_components(dtype=dtype)
    tok = _clip_tokenizer(folder, letters)
    parts.update(text_encoder=tiny_clip(8, None, 2, seed=1).to(dtype), tokenizer=tok,
                 text_encoder_2=tiny_clip(8, 16, 2, seed=2).to(dtype), tokenizer_2=tok)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(scheduler=sched, add_watermarker=False, **parts)
