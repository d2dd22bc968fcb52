"""Build of deis_fast._C: a plain pybind11 module with the C++ CPU combine kernel, plus the CUDA
kernel when nvcc is available.

Environment:
  DEIS_FAST_CUDA=0/1         force the CUDA kernel off/on (default: on when nvcc is found)
  TORCH_CUDA_ARCH_LIST       e.g. "8.0;9.0" or "8.0 9.0+PTX" (default "8.0;9.0")
  DEIS_FAST_REQUIRE_EXT=1    make a failing C++ build fail the install (default: warn, torch path)
  NVCC                       nvcc executable (default: $CUDA_HOME/bin/nvcc, then PATH)

The .cu file is compiled by nvcc through subprocess; the object is cached under build/nvcc_cache
keyed by sources + flags, so `pip install --no-build-isolation -e .` stays fast on rebuilds.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.extension import Extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
CXX_FLAGS = ["-std=c++20", "-O3", "-fopenmp", "-fvisibility=hidden"]


def _log(msg: str) -> None:
    print(f"[deis_fast setup] {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.strip().lower() not in ("0", "false", "no", "off")


def _find_nvcc() -> str | None:
    cands = [os.environ.get("NVCC")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    cands.append(shutil.which("nvcc"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _cuda_lib_dirs(nvcc: str) -> list[str]:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    dirs = []
    for h in homes:
        if not h:
            continue
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib")):
            d = os.path.join(h, sub)
            if os.path.isfile(os.path.join(d, "libcudart_static.a")) and d not in dirs:
                dirs.append(d)
    return dirs


def _gencode_flags() -> list[str]:
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "8.0;9.0"
    flags: list[str] = []
    for item in re.split(r"[;\s,]+", spec):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        item = item[:-4] if ptx else item
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", item)
        if not m:
            raise ValueError(f"cannot parse TORCH_CUDA_ARCH_LIST entry {item!r}")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def _compile_cuda(nvcc: str, build_temp: str) -> str:
    src = os.path.join(CSRC, "combine_cuda.cu")
    flags = ["-std=c++20", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
             "--resource-usage", "-I", CSRC] + _gencode_flags()
    h = hashlib.sha256()
    for f in ("combine_cuda.cu", "combine.h", "combine_api.h"):
        with open(os.path.join(CSRC, f), "rb") as fh:
            h.update(fh.read())
    h.update(" ".join(flags).encode())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    cache = os.path.join(ROOT, "build", "nvcc_cache")
    obj = os.path.join(cache, f"combine_cuda-{h.hexdigest()[:16]}.o")
    if os.path.isfile(obj):
        _log(f"nvcc: using cached {os.path.relpath(obj, ROOT)}")
        return obj
    os.makedirs(cache, exist_ok=True)
    cmd = [nvcc, *flags, "-c", src, "-o", obj + ".tmp"]
    _log("nvcc: " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed ({r.returncode}):\n{out[-4000:]}")
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", out)]
    _log(f"nvcc: {len(regs)} kernels, registers {min(regs, default=0)}..{max(regs, default=0)}, "
         f"max spill stores {max(spills, default=0)} bytes")
    os.replace(obj + ".tmp", obj)
    return obj


class BuildExt(build_ext):
    """Builds deis_fast._C; a failed (optional) build leaves it out of everything that would copy or package
    it, so the install -- editable or not -- succeeds and deis_fast uses the torch path."""

    _failed: set = set()

    def _without_failed(self, method: str, *args):
        exts, self.extensions = self.extensions, [e for e in self.extensions if e.name not in self._failed]
        try:
            return getattr(super(), method)(*args)
        finally:
            self.extensions = exts

    def copy_extensions_to_source(self):
        return self._without_failed("copy_extensions_to_source")

    def get_outputs(self):
        return self._without_failed("get_outputs")

    def get_output_mapping(self):
        return self._without_failed("get_output_mapping")

    def build_extension(self, ext):
        want = _env_flag("DEIS_FAST_CUDA")
        required = _env_flag("DEIS_FAST_REQUIRE_EXT")
        nvcc = _find_nvcc() if want is not False else None
        if want is True and nvcc is None:
            raise RuntimeError("DEIS_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or NVCC)")
        if nvcc is not None:
            try:
                obj = _compile_cuda(nvcc, self.build_temp)
                libdirs = _cuda_lib_dirs(nvcc)
                if not libdirs:
                    raise RuntimeError("libcudart_static.a not found next to nvcc")
                ext.extra_objects = [obj]
                ext.library_dirs = libdirs
                ext.libraries = ["cudart_static", "dl", "rt", "pthread"]
                ext.define_macros = [("DF_WITH_CUDA", "1")]
            except Exception as e:  # CUDA part is optional unless forced
                if want is True:
                    raise
                _log(f"WARNING: CUDA kernel not built ({e}); building the CPU kernel only")
                ext.extra_objects, ext.libraries, ext.define_macros = [], [], []
        else:
            _log("nvcc not used (not found or DEIS_FAST_CUDA=0): CPU kernel only")
        try:
            super().build_extension(ext)
        except Exception as e:
            if required or want is True:
                raise
            self._failed = self._failed | {ext.name}
            _log(f"WARNING: deis_fast._C failed to build ({e}); deis_fast will use the torch path")


def _pybind_include() -> str:
    import pybind11

    return pybind11.get_include()


setup(
    ext_modules=[
        Extension(
            "deis_fast._C",
            sources=["csrc/bindings.cpp", "csrc/combine_cpu.cpp"],
            include_dirs=[_pybind_include(), "csrc"],
            depends=["csrc/combine.h", "csrc/combine_api.h"],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
            language="c++",
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
