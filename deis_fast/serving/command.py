"""deis-fast serve: step-level batched sampling over HTTP (POST /generate, GET /health, GET /metrics; extra [serve]).

    deis-fast serve --model digits --port 8000            # http://127.0.0.1:8000/generate, /health, /metrics
    curl -s -X POST localhost:8000/generate -d '{"seed": 1, "method": "tab3", "nfe": 10}' -o digit.png
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

__all__ = ["add_arguments", "run"]


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {s!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``deis-fast serve``."""
    p.add_argument("--model", default="digits", metavar="digits|flow|FOLDER",
                   help="'digits' or 'flow' (the embedded 8x8 models) or a diffusers UNet2DModel / pipeline folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max-batch", type=_positive, default=64,
                   help="most network rows in one call (a request's samples, twice with guidance)")
    p.add_argument("--max-queue", type=_positive, default=256, help="most requests waiting; more get 503")
    p.add_argument("--max-nfe", type=_positive, default=100, help="largest NFE a request may ask for")
    p.add_argument("--tuned-dir", default=None, metavar="DIR",
                   help="folder of files written by 'deis-fast tune'; requests name one with \"tuned\": \"NAME\"")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before exiting")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / Ctrl-C (in-flight requests drain first); 2 with one line on a usage problem."""
    missing = [m for m in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"deis-fast serve: error: needs {', '.join(missing)}: pip install 'deis_fast[serve]'", file=sys.stderr)
        return 2
    import uvicorn

    from .app import build_app, make_service
    try:
        service = make_service(args.model, device=args.device, max_batch=args.max_batch, max_queue=args.max_queue,
                               max_nfe=args.max_nfe, tuned_dir=args.tuned_dir, threads=args.threads)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"deis-fast serve: error: {e}", file=sys.stderr)
        return 2
    app = build_app(service, args.drain_timeout)
    print(f"deis-fast serve: {service.info.model_id} on http://{args.host}:{args.port} "
          "(POST /generate, GET /health, GET /metrics)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=max(1, int(args.drain_timeout)))
    return 0
