"""Running a check script inside ComfyUI for the ComfyUI tests: a temporary copy of ``$COMFYUI_PATH`` (CI's copy is
read-only), one subprocess (ComfyUI's global state stays out of the test process), and its JSON results."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deis_fast.testing import comfyui_sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_comfyui(script: str, tmp: str, custom_node: str | None = None, timeout: float = 900) -> dict:
    """Run ``tests/<script>`` (args: ComfyUI root, stubs folder, results path) in a ComfyUI sandbox under ``tmp``;
    skip without ``COMFYUI_PATH`` or ComfyUI's imports, fail with the script's output if it fails."""
    src = os.environ.get("COMFYUI_PATH")
    if not src or not os.path.isfile(os.path.join(src, "comfy", "samplers.py")):
        pytest.skip("set COMFYUI_PATH to a ComfyUI source tree to run the ComfyUI tests")
    for mod in ("torchsde", "einops", "psutil", "av", "yaml", "PIL"):
        pytest.importorskip(mod, reason=f"ComfyUI's sampling path needs {mod} (pip install -e '.[comfyui]')")
    root, stubs = comfyui_sandbox(src, tmp, **({"custom_node": custom_node} if custom_node else {}))
    out = os.path.join(tmp, "results.json")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", script), root, stubs, out], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"tests/{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)
