"""Triton combine kernel: ahead-of-time compilation for sm_80/sm_90 (no GPU needed) and execution on
CPU tensors under TRITON_INTERPRET=1 (in a subprocess: the variable must be set before import)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton", reason="needs triton: pip install -e '.[gpu]'")

from _combine_common import DTYPES  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where _combine_common lives


@pytest.mark.parametrize("arch", [80, 90])
def test_aot_compile_every_variant(arch):
    from deis_fast.kernels.triton_combine import aot_compile

    for dtype in DTYPES:
        for ns in range(1, 7):
            for noise in (False, True):
                k = aot_compile(dtype, ns, noise, arch=arch)
                ptx = k.asm["ptx"]
                assert re.search(rf"\.target\s+sm_{arch}", ptx), "wrong target"
                assert len(k.asm["cubin"]) > 0
                # one load per source (+ noise), one store; fp32 math
                n_loads = len(re.findall(r"ld\.global", ptx))
                assert n_loads >= ns + noise
                assert "st.global.v4" in ptx and "ld.global.v4" in ptx  # 128-bit accesses
    k = aot_compile(torch.float16, 2, False, arch=arch, aligned=False)
    assert "st.global" in k.asm["ptx"]


_SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, sys.argv[1])
    import torch
    from _combine_common import make_inputs, check_result
    from deis_fast import ops
    from deis_fast.kernels import triton_combine
    from deis_fast.kernels.dispatch import select
    results = []
    gen = torch.Generator().manual_seed(0)
    cases = [(n, dt, ns, nz) for dt in (torch.float32, torch.float16, torch.bfloat16)
             for ns in range(1, 7) for nz in (False, True) for n in (1, 37)]
    cases += [(3000, torch.float32, 3, True), (0, torch.float16, 2, False), (1025, torch.bfloat16, 6, True)]
    for n, dt, ns, nz in cases:
        srcs, coefs, z, zc = make_inputs((n,), dt, ns, nz, gen)
        out = torch.full((n,), float("nan"), dtype=dt)
        triton_combine.combine_triton(srcs, coefs, out, z, zc)
        check_result(out, srcs, coefs, z, zc)
        results.append([n, str(dt), ns, nz])
    # through the public op (explicit backend), channels_last and aliasing
    srcs, coefs, z, zc = make_inputs((2, 3, 4, 5), torch.float16, 3, True, gen)
    srcs = [s.contiguous(memory_format=torch.channels_last) for s in srcs]
    z = z.contiguous(memory_format=torch.channels_last)
    orig = [s.clone() for s in srcs]
    ops.combine(srcs, coefs, out=srcs[0], noise=z, noise_coef=zc, backend="triton")
    check_result(srcs[0], orig, coefs, z, zc)
    assert select("cpu", torch.float16, "triton") == "triton"
    print(json.dumps({"ok": len(results)}))
""")


@pytest.mark.slow
def test_interpreter_on_cpu_tensors():
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    env.pop("DEIS_FAST_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", _SCRIPT, HERE], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] == 75
