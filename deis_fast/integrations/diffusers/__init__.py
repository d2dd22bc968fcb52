"""diffusers front end: ``DEISFastScheduler`` (a drop-in scheduler, ``scheduler``), the config-key translation table
(``config``) and ``tune_pipeline`` (tuning through a pipeline's own denoiser, ``pipeline``).

    from deis_fast.integrations.diffusers import DEISFastScheduler
    pipe.scheduler = DEISFastScheduler.from_config(pipe.scheduler.config, method="tab3")
"""
from .config import equivalent_method
from .scheduler import DEISFastScheduler
from .pipeline import tune_pipeline

__all__ = ["DEISFastScheduler", "equivalent_method", "tune_pipeline"]
