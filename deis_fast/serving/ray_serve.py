"""Scale out on Ray Serve (extra ``[ray]``): N replicas of the engine (one per GPU) behind Ray Serve's HTTP proxy.

    from ray import serve
    from deis_fast.serving.ray_serve import deployment
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(deployment("digits", num_replicas=2), route_prefix="/")     # POST :8000/generate, as deis-fast serve

or from the shell, with Ray's own CLI (the app builder below takes the same keywords as strings)::

    serve run deis_fast.serving.ray_serve:app_builder model=digits num_replicas=2 num_gpus=1

Each replica runs one :class:`~deis_fast.serving.app.Service` (its own engine, step-level batching inside the
replica); Ray does the rest: routing between replicas, replica health and restarts, autoscaling, the HTTP proxy.
Ray Serve cancels a replica's request when its HTTP client disconnects; the service then cancels the engine
request.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Replica", "deployment", "app_builder"]


class Replica:
    """One Ray Serve replica: loads the model, starts an engine, answers /generate, /health, /metrics."""

    def __init__(self, model: str, engine_kw: dict):
        from .app import make_service
        self.service = make_service(model, **engine_kw)

    async def __call__(self, request: Any) -> Any:
        return await self.service.dispatch(request)


def deployment(model: str = "digits", *, num_replicas: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
               device: str | None = None, max_batch: int = 64, max_queue: int = 256, max_nfe: int = 100,
               threads: int | None = None, tuned_dir: str | None = None) -> Any:
    """A bound Ray Serve application of ``num_replicas`` replicas of ``model`` (``num_gpus`` per replica: 1 puts one
    replica on each GPU, and the engine on ``cuda`` unless ``device`` says otherwise). Ray lets each replica take
    up to ``max_queue + max_batch`` requests at once, so that the engine, not Ray, batches them."""
    from ray import serve
    device = device or ("cuda" if num_gpus else "cpu")
    engine_kw = dict(device=device, max_batch=max_batch, max_queue=max_queue, max_nfe=max_nfe, threads=threads,
                     tuned_dir=tuned_dir)
    d = serve.deployment(Replica, name="deis_fast", num_replicas=num_replicas,
                         max_ongoing_requests=max_queue + max_batch,
                         ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus})
    return d.bind(model, engine_kw)


def app_builder(args: dict) -> Any:
    """``serve run deis_fast.serving.ray_serve:app_builder model=digits num_replicas=2``: the keywords of
    :func:`deployment`, as strings."""
    args = dict(args)
    model = args.pop("model", "digits")
    kinds = {"num_replicas": int, "num_gpus": float, "num_cpus": float, "max_batch": int, "max_queue": int,
             "max_nfe": int, "threads": int, "device": str, "tuned_dir": str}
    unknown = sorted(set(args) - set(kinds))
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}; use model= and {', '.join(kinds)}")
    return deployment(model, **{k: kinds[k](v) for k, v in args.items()})
