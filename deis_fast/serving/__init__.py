"""Serving: a step-level continuous-batching engine over plans (:mod:`.engine`), an ASGI app and the
``deis-fast serve`` command (:mod:`.app`, extra ``[serve]``), and a Ray Serve deployment (:mod:`.ray_serve`, extra
``[ray]``). Only the engine is imported here: it needs nothing beyond torch."""
from __future__ import annotations

from .engine import (Engine, EngineClosedError, GenerateRequest, Observer, QueueFullError, RequestError,
                     RequestFailed, Ticket)

__all__ = ["Engine", "EngineClosedError", "GenerateRequest", "Observer", "QueueFullError", "RequestError",
           "RequestFailed", "Ticket"]
