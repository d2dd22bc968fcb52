"""The ``deis-fast`` command line: ``main`` (sample, demo, plan, bench, methods), ``generate`` (resumable, sharded
generation at scale), ``tune`` and the shared argument helpers (``common``)."""
from .main import main

__all__ = ["main"]
