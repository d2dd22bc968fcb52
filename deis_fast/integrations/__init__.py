"""Integrations with other libraries (imported lazily; neither diffusers nor k-diffusion is required).

* :mod:`deis_fast.integrations.diffusers` — ``DEISFastScheduler``, a drop-in diffusers scheduler.
* :mod:`deis_fast.integrations.k_diffusion` — ``sample_deis`` & co. with k-diffusion's sampler signature.
"""
__all__ = ["diffusers", "k_diffusion"]
