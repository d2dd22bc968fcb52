"""The HTTP front of the engine: an ASGI app (Starlette, served by uvicorn; extra ``[serve]``).

    POST /generate   JSON {"seed": 0, "num": 1, "method": "tab3", "nfe": 10, ...} -> image/png (or .npy)
    GET  /health     JSON {"status": "ok", "queue": 0, "active": 0, ...}
    GET  /metrics    Prometheus text: queue depth, rows per network call, tick and request latency histograms

:class:`Service` holds the request handling (body checks, submit, wait or cancel on disconnect, encoding) so that
the uvicorn app here and the Ray Serve deployment (:mod:`deis_fast.serving.ray_serve`) answer alike. A bad request
gets a 4xx with one line ``{"error": "..."}``; a full queue or a draining server 503; a request whose model call
fails or goes non-finite 500 (others are not affected).
"""
from __future__ import annotations

import asyncio
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .engine import (Engine, EngineClosedError, GenerateRequest, Observer, QueueFullError, RequestError,
                     RequestFailed)

__all__ = ["Service", "ModelInfo", "build_app", "parse_body", "FIELDS", "PlanOptionsFields"]

PlanOptionsFields = ("eta", "pfdiff", "corrector", "variant", "s_noise")
FIELDS = ("seed", "seeds", "num", "method", "nfe", "grid", "tuned", "shape", "class", "prompt", "guidance_scale",
          "format", "upscale") + PlanOptionsFields
FORMATS = ("png", "npy")
MAX_UPSCALE = 16


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about its model: id, sample shape, prediction, and the conditioning it takes
    (``class_key``: the keyword of a class-conditional network, e.g. diffusers' ``class_labels``; None: none)."""

    model_id: str
    shape: tuple[int, ...]
    prediction: str
    class_key: str | None = None
    num_classes: int | None = None


def _bad(msg: str) -> RequestError:
    return RequestError(msg)


def _int(body: Mapping[str, Any], k: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(k)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise _bad(f"'{k}' must be an integer {rng}, got {json.dumps(v)[:40]}")
    return v


def _number(body: Mapping[str, Any], k: str) -> float | None:
    v = body.get(k)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"'{k}' must be a finite number, got {json.dumps(v)[:40]}")
    return float(v)


def parse_body(body: Any, info: ModelInfo, tuned_dir: str | None = None) -> tuple[GenerateRequest, str, int]:
    """(request, format, upscale) of a /generate JSON body; a :class:`RequestError` names the bad field."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object, e.g. {\"seed\": 0, \"method\": \"tab3\", \"nfe\": 10}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    if "seeds" in body and ("seed" in body or "num" in body):
        raise _bad("give 'seeds' (a list) or 'seed' with 'num', not both")
    if "seeds" in body:
        seeds = body["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 63 for s in seeds):
            raise _bad("'seeds' must be a non-empty list of integers in [0, 2**63)")
    else:
        seed = _int(body, "seed", 0, 2 ** 63 - 1) or 0
        num = _int(body, "num", 1, 4096) or 1
        if seed + num > 2 ** 63:
            raise _bad("'seed' + 'num' exceeds 2**63")
        seeds = list(range(seed, seed + num))
    method = body.get("method", "tab3")
    if not isinstance(method, str):
        raise _bad(f"'method' must be a string, got {json.dumps(method)[:40]}")
    nfe = body.get("nfe")
    if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, int)):
        raise _bad(f"'nfe' must be an integer, got {json.dumps(nfe)[:40]}")
    grid = body.get("grid")
    if grid is not None and not isinstance(grid, str) and not (
            isinstance(grid, list) and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in grid)):
        raise _bad("'grid' must be a grid name or a list of times")
    options: dict[str, Any] = {}
    for k in ("eta", "s_noise"):
        if body.get(k) is not None:
            options[k] = _number(body, k)
    if body.get("pfdiff") is not None:
        p = body["pfdiff"]
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)):
            raise _bad("'pfdiff' must be [k, h], two integers")
        options["pfdiff"] = tuple(p)
    if body.get("corrector") is not None:
        if not isinstance(body["corrector"], bool):
            raise _bad("'corrector' must be true or false")
        options["corrector"] = body["corrector"]
    if body.get("variant") is not None:
        if not isinstance(body["variant"], str):
            raise _bad("'variant' must be a string")
        options["variant"] = body["variant"]
    tuned = None
    if body.get("tuned") is not None:
        name = body["tuned"]
        if tuned_dir is None:
            raise _bad("this server has no tuned files: start it with --tuned-dir DIR to serve the files in DIR")
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name.startswith("."):
            raise _bad(f"'tuned' must be the name of a file in the server's --tuned-dir, got {json.dumps(name)[:60]}")
        tuned = os.path.join(tuned_dir, name)
    shape = body.get("shape")
    if shape is not None:
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise _bad(f"'shape' must be a list of integers like {list(info.shape)}")
        shape = tuple(shape)
    if body.get("prompt") is not None:
        raise _bad(f"the model {info.model_id!r} takes no text prompt ('deis-fast serve' serves unconditional and "
                   "class-conditional UNets)")
    cond: dict[str, torch.Tensor] = {}
    if body.get("class") is not None:
        if info.class_key is None:
            raise _bad(f"the model {info.model_id!r} is unconditional: it takes no 'class'")
        c = _int(body, "class", 0, (info.num_classes or 2 ** 31) - 1)
        cond[info.class_key] = torch.tensor([c], dtype=torch.long)
    g = _number(body, "guidance_scale")
    if g is not None:
        raise _bad(f"the model {info.model_id!r} has no unconditional branch to guide against: drop 'guidance_scale'")
    fmt = body.get("format", "png")
    if fmt not in FORMATS:
        raise _bad(f"'format' must be one of {', '.join(FORMATS)}, got {json.dumps(fmt)[:40]}")
    upscale = _int(body, "upscale", 1, MAX_UPSCALE) or 1
    req = GenerateRequest(seeds=tuple(seeds), shape=shape, method=method, nfe=nfe,
                          grid=tuple(float(t) for t in grid) if isinstance(grid, list) else grid, options=options,
                          tuned=tuned, cond=cond)
    return req, fmt, upscale


def encode(x: torch.Tensor, fmt: str, upscale: int = 1) -> tuple[bytes, str]:
    """(bytes, media type) of samples [n, C, H, W] in [-1, 1]: one PNG (the samples side by side) or a .npy."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, x.float().numpy())
        return buf.getvalue(), "application/x-npy"
    from ..zoo.digits import png_bytes, to_image
    img = to_image(x)                                     # [n, C, H, W] uint8
    if img.ndim != 4:
        raise RequestFailed(f"PNG output needs image samples [C, H, W], these have shape {list(x.shape[1:])}: "
                            "ask for \"format\": \"npy\"")
    img = np.concatenate(list(img), axis=2)               # side by side: [C, H, n * W]
    if upscale > 1:
        img = img.repeat(upscale, axis=1).repeat(upscale, axis=2)
    try:
        return png_bytes(np.ascontiguousarray(img)), "image/png"
    except ValueError as e:
        raise RequestFailed(f"{e}: ask for \"format\": \"npy\"") from None


class PrometheusObserver(Observer):
    """The engine's metrics in a prometheus_client registry of their own."""

    def __init__(self, engine_ref: list):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.rows = Histogram("deis_fast_batch_rows", "network rows per call (per tick; CFG rows count twice)",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.tick_s = Histogram("deis_fast_tick_seconds", "seconds per tick (one network call and its combines)",
                                registry=r)
        self.latency = Histogram("deis_fast_request_seconds", "request latency from submit to result, seconds",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.requests = Counter("deis_fast_requests", "requests by outcome", ["status"], registry=r)
        q = Gauge("deis_fast_queue_depth", "requests waiting for admission", registry=r)
        a = Gauge("deis_fast_active_requests", "requests running", registry=r)
        q.set_function(lambda: engine_ref[0].queue_depth if engine_ref else 0)
        a.set_function(lambda: engine_ref[0].active_requests if engine_ref else 0)

    def tick(self, rows: int, seconds: float) -> None:
        self.rows.observe(rows)
        self.tick_s.observe(seconds)

    def finished(self, status: str, seconds: float) -> None:
        self.requests.labels(status).inc()
        if status == "ok":
            self.latency.observe(seconds)

    def rejected(self, status: str) -> None:
        self.requests.labels(status).inc()


def _error(status: int, msg: str):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": " ".join(str(msg).split())}, status_code=status)


async def _disconnected(request: Any) -> None:
    """Returns when the client goes away (the ASGI receive channel says http.disconnect)."""
    while True:
        msg = await request.receive()
        if msg.get("type") == "http.disconnect":
            return


class Service:
    """Request handling shared by the uvicorn app and the Ray Serve deployment: one engine (started here), its
    metrics, and the three endpoints as Starlette handlers."""

    def __init__(self, engine_factory: Any, info: ModelInfo, tuned_dir: str | None = None):
        ref: list = []
        self.metrics = PrometheusObserver(ref)
        self.engine: Engine = engine_factory(self.metrics)
        ref.append(self.engine)
        self.info = info
        self.tuned_dir = tuned_dir
        self.engine.start()

    async def generate(self, request: Any):
        from starlette.responses import Response
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            self.metrics.rejected("bad_request")
            return _error(400, "the body must be JSON, e.g. {\"seed\": 0, \"method\": \"tab3\", \"nfe\": 10}")
        try:
            req, fmt, upscale = parse_body(body, self.info, self.tuned_dir)
            ticket = self.engine.submit(req)
        except RequestError as e:
            self.metrics.rejected("bad_request")
            return _error(400, str(e))
        except (QueueFullError, EngineClosedError) as e:
            self.metrics.rejected("unavailable")
            return _error(503, str(e))
        fut = asyncio.wrap_future(ticket.future)
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({fut, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:   # the client left (or this task was cancelled, as Ray Serve does on disconnect): cancel it
            watch.cancel()
            if not fut.done():
                ticket.cancel()
                fut.cancel()
        if fut.cancelled():
            return Response(status_code=499)
        try:
            x = fut.result()
            data, media = encode(x, fmt, upscale)
        except (RequestFailed, EngineClosedError) as e:
            return _error(500, str(e))
        headers = {"x-deis-fast-method": ticket.plan.method, "x-deis-fast-nfe": str(ticket.plan.nfe),
                   "x-deis-fast-seeds": ",".join(map(str, req.seeds)), "x-deis-fast-pid": str(os.getpid())}
        return Response(data, media_type=media, headers=headers)

    async def health(self, request: Any):
        from starlette.responses import JSONResponse
        e = self.engine
        body = {"status": "ok" if e.accepting else "draining", "model": self.info.model_id,
                "shape": list(self.info.shape), "queue": e.queue_depth, "active": e.active_requests,
                "max_batch": e.max_batch, "max_queue": e.max_queue, "pid": os.getpid()}
        return JSONResponse(body, status_code=200 if e.accepting else 503)

    async def metrics_text(self, request: Any):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def dispatch(self, request: Any):
        """Route by the last path component and the method (the Ray Serve deployment's ``__call__``)."""
        path, method = request.url.path, request.method
        routes = {("generate", "POST"): self.generate, ("health", "GET"): self.health,
                  ("metrics", "GET"): self.metrics_text}
        handler = routes.get((path.rstrip("/").rsplit("/", 1)[-1], method))
        if handler is None:
            return _error(404, f"no endpoint {method} {path}: POST /generate, GET /health, GET /metrics")
        return await handler(request)


def build_app(service: Service, drain_timeout: float = 30.0):
    """The Starlette app of ``service``; on shutdown (uvicorn's SIGTERM handling, after in-flight HTTP requests
    have their answers) the engine drains and stops."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.routing import Route

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.engine.shutdown, True, drain_timeout)

    return Starlette(routes=[Route("/generate", service.generate, methods=["POST"]),
                             Route("/health", service.health, methods=["GET"]),
                             Route("/metrics", service.metrics_text, methods=["GET"])],
                     lifespan=lifespan)


def make_service(model: str = "digits", *, device: str = "cpu", max_batch: int = 64, max_queue: int = 256,
                 max_nfe: int = 100, tuned_dir: str | None = None, threads: int | None = None) -> Service:
    """Load ``model`` (``digits``, ``flow`` or a diffusers UNet2DModel / pipeline folder, as
    :func:`deis_fast.load_model`) and start a :class:`Service` over a new engine; a bad spec raises ValueError."""
    from ..zoo import load_model
    if threads:
        torch.set_num_threads(int(threads))
    if tuned_dir is not None and not os.path.isdir(tuned_dir):
        raise ValueError(f"--tuned-dir {tuned_dir!r} is not a folder")
    loaded = load_model(model, device=device)
    cfg = getattr(loaded.model, "config", None)
    n_cls = getattr(cfg, "num_class_embeds", None) if cfg is not None and not isinstance(cfg, dict) else None
    info = ModelInfo(loaded.model_id, tuple(loaded.shape), loaded.prediction,
                     "class_labels" if n_cls else None, int(n_cls) if n_cls else None)

    def factory(observer: Observer) -> Engine:
        return Engine(loaded.model, loaded.schedule, loaded.prediction, shape=loaded.shape, device=device,
                      max_batch=max_batch, max_queue=max_queue, max_nfe=max_nfe, observer=observer)
    return Service(factory, info, tuned_dir)
