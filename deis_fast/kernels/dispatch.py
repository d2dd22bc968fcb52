"""Backend selection for the combine op, and its registration as the custom op ``deis_fast::combine``.

Backends: "torch" (eager reference), "cpu" (C++/OpenMP, deis_fast._C), "cuda" (C++ CUDA kernel,
deis_fast._C built with nvcc), "triton". Automatic choice: triton, then cuda for CUDA tensors; cpu,
then torch for CPU tensors; torch for everything else (fp64, other devices). ``DEIS_FAST_BACKEND``
or the ``backend`` argument forces one; forcing an unavailable backend raises
:class:`BackendUnavailableError`. Layouts the kernels do not cover (tensors not all sharing one
non-overlapping-and-dense layout, or ``out`` partially overlapping an input) always use torch.
"""
# No `from __future__ import annotations`: torch.library.custom_op infers the schema from the
# (real) annotations below.
import os
import warnings
from typing import List, Optional, Sequence

import torch

from .reference import combine_torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "DEIS_FAST_BACKEND"
from . import DTYPE_CODES  # noqa: E402  (re-export)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these tensors."""


# ---------------------------------------------------------------------------------------------
# Optional components, loaded once.
# ---------------------------------------------------------------------------------------------
_ext = None
_ext_error: Optional[BaseException] = None
_ext_tried = False
_ext_warned = False
_triton_mod = None
_triton_error: Optional[BaseException] = None
_triton_tried = False


def load_ext():
    """deis_fast._C or None (the import error is kept in ``ext_error()``)."""
    global _ext, _ext_error, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        try:
            from .. import _C  # type: ignore[attr-defined]

            _ext = _C
        except Exception as e:  # ImportError, or a broken .so
            import importlib.util
            try:
                built = importlib.util.find_spec("deis_fast._C") is not None
            except (ImportError, ValueError):
                built = False
            _ext_error = e if built else ImportError("it was not built when deis_fast was installed")
    return _ext


def ext_error() -> Optional[BaseException]:
    load_ext()
    return _ext_error


def warn_if_no_ext() -> None:
    """Once per process (called by ``import deis_fast``): say that the C++ kernel is missing, why, and how to get
    it. Silent when the torch backend is forced (``DEIS_FAST_BACKEND=torch``)."""
    global _ext_warned
    if _ext_warned or os.environ.get(ENV_VAR, "").strip().lower() == "torch" or load_ext() is not None:
        return
    _ext_warned = True
    warnings.warn(f"deis_fast._C (the C++ combine kernel) is not available ({_ext_error}); deis_fast works and uses "
                  "the slower torch path. To build it, install a C++20 compiler with OpenMP (g++ >= 10, or clang with "
                  "libomp) and reinstall deis_fast; set DEIS_FAST_BACKEND=torch to silence this warning.",
                  RuntimeWarning, stacklevel=3)


def load_triton():
    global _triton_mod, _triton_error, _triton_tried
    if not _triton_tried:
        _triton_tried = True
        try:
            from . import triton_combine

            _triton_mod = triton_combine
        except Exception as e:
            _triton_error = e
    return _triton_mod


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(backend: str, device_type: str) -> Optional[str]:
    """None when `backend` can run tensors on `device_type`, else the reason why not."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' runs CPU tensors only, got {device_type} tensors"
        return None if load_ext() is not None else f"deis_fast._C failed to import: {_ext_error!r}"
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs CUDA tensors only, got {device_type} tensors"
        ext = load_ext()
        if ext is None:
            return f"deis_fast._C failed to import: {_ext_error!r}"
        return None if ext.has_cuda() else "deis_fast._C was built without CUDA (nvcc not found or DEIS_FAST_CUDA=0)"
    if backend == "triton":
        if device_type != "cuda" and not (device_type == "cpu" and _triton_interpret()):
            return f"backend 'triton' runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device_type}"
        return None if load_triton() is not None else f"triton kernel failed to import: {_triton_error!r}"
    return f"unknown backend {backend!r}; choose one of {BACKENDS}"


_cache = {}
_env = [False, None]  # [read?, value of DEIS_FAST_BACKEND]


def _env_backend() -> Optional[str]:
    """DEIS_FAST_BACKEND, read once (clear_cache() re-reads it)."""
    if not _env[0]:
        _env[1] = os.environ.get(ENV_VAR) or None
        _env[0] = True
    return _env[1]


def select(device_type: str, dtype: torch.dtype, requested: Optional[str]) -> str:
    """The backend for (device, dtype, requested); cached."""
    key = (device_type, dtype, requested)
    b = _cache.get(key)
    if b is not None:
        return b
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown combine backend {requested!r}; choose one of {BACKENDS}")
        why = available(requested, device_type)
        if why is not None:
            raise BackendUnavailableError(f"combine backend {requested!r} is unavailable: {why}")
        # fp64 (and any dtype the kernels lack) always goes through torch.
        b = requested if dtype in DTYPE_CODES else "torch"
    elif dtype not in DTYPE_CODES:
        b = "torch"
    elif device_type == "cuda":
        b = next((x for x in ("triton", "cuda") if available(x, "cuda") is None), "torch")
    elif device_type == "cpu":
        b = "cpu" if available("cpu", "cpu") is None else "torch"
    else:
        b = "torch"
    _cache[key] = b
    return b


def clear_cache() -> None:
    """Forget cached backend decisions and re-read DEIS_FAST_BACKEND (call after changing the env)."""
    _cache.clear()
    _env[0] = False


# ---------------------------------------------------------------------------------------------
# Layout checks: kernels run over the underlying dense span when every tensor shares one layout.
# ---------------------------------------------------------------------------------------------
def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def kernel_layout_ok(tensors: Sequence[torch.Tensor], out: torch.Tensor, n: int) -> Optional[List[int]]:
    """Data pointers of `tensors` when all tensors share strides and are non-overlapping and dense
    and out never partially overlaps an input (exact aliasing is fine); otherwise None."""
    if out.is_contiguous():
        if not all(t.is_contiguous() for t in tensors):
            return None
    else:
        st = out.stride()
        if any(t.stride() != st for t in tensors) or not _non_overlapping_and_dense(out):
            return None
    nbytes = n * out.element_size()
    o = out.data_ptr()
    lo, hi = o - nbytes, o + nbytes
    ptrs = [t.data_ptr() for t in tensors]
    for p in ptrs:
        if p != o and lo < p < hi:  # partial overlap with out
            return None
    return ptrs


def run(sources: Sequence[torch.Tensor], coefs: Sequence[float], out: torch.Tensor,
        noise: Optional[torch.Tensor], noise_coef: float, backend: Optional[str]) -> None:
    """Compute into `out` with the selected backend (inputs already validated)."""
    requested = backend if backend is not None else _env_backend()
    b = select("cuda" if out.is_cuda else ("cpu" if out.is_cpu else out.device.type), out.dtype, requested)
    if b == "torch":
        combine_torch(sources, coefs, out, noise, noise_coef)
        return
    if noise is not None and noise_coef == 0.0:
        noise = None  # same as the reference: a zero-weighted noise term is skipped
    n = out.numel()
    if n == 0:
        return
    ptrs = kernel_layout_ok(sources if noise is None else [*sources, noise], out, n)
    if ptrs is None:
        combine_torch(sources, coefs, out, noise, noise_coef)
        return
    if b == "cpu":
        _ext.combine_cpu(out.data_ptr(), ptrs[:len(sources)], coefs, 0 if noise is None else ptrs[-1], noise_coef,
                         n, DTYPE_CODES[out.dtype], torch.get_num_threads())
    elif b == "cuda":
        dev = out.device
        if dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                _launch_cuda(sources, coefs, out, noise, noise_coef, n)
        else:
            _launch_cuda(sources, coefs, out, noise, noise_coef, n)
    else:  # triton
        _triton_mod.combine_triton(sources, coefs, out, noise, noise_coef)


def _launch_cuda(sources, coefs, out, noise, noise_coef, n) -> None:
    stream = torch.cuda.current_stream(out.device).cuda_stream
    _ext.combine_cuda(out.data_ptr(), [s.data_ptr() for s in sources], coefs,
                      0 if noise is None else noise.data_ptr(), noise_coef, n, DTYPE_CODES[out.dtype], stream)


# ---------------------------------------------------------------------------------------------
# The custom op: what torch.compile traces and what a TorchDispatchMode sees (one op per call).
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("deis_fast::combine", mutates_args=("out",))
def combine_op(sources: List[torch.Tensor], coefs: List[float], out: torch.Tensor,
               noise: Optional[torch.Tensor], noise_coef: float, backend: Optional[str]) -> None:
    run(sources, coefs, out, noise, noise_coef, backend)


@combine_op.register_fake
def _combine_fake(sources, coefs, out, noise, noise_coef, backend) -> None:
    return None
