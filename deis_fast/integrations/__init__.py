"""Integrations with other libraries (imported lazily; neither diffusers nor k-diffusion is required).

* :mod:`deis_fast.integrations.diffusers` — ``DEISFastScheduler``, a drop-in diffusers scheduler.
* :mod:`deis_fast.integrations.k_diffusion` — ``sample_deis`` & co. with k-diffusion's sampler signature.
* :mod:`deis_fast.integrations.comfyui` — ComfyUI nodes and KSampler entries (thin glue over the k-diffusion path).
"""
__all__ = ["diffusers", "k_diffusion", "comfyui"]
