"""Installing without a working C++ compiler (as on a machine without a C++20/OpenMP toolchain): the build of
deis_fast._C fails, the install -- editable or not -- still succeeds, and ``import deis_fast`` warns once with
the cause and the fix, then samples on the torch path."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _copy_sources(dst: str) -> None:
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), dst)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(dst, "csrc"))
    shutil.copytree(os.path.join(ROOT, "deis_fast"), os.path.join(dst, "deis_fast"),
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))


CHECK = r"""
import sys, site, warnings
site.addsitedir(sys.argv[1])          # the install prefix (processes its .pth: the editable finder)
sys.path.extend(sys.argv[2:])         # torch & co. as plain paths (no .pth: not the checkout's own install)
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    import deis_fast, torch
msgs = [str(w.message) for w in rec if "deis_fast._C" in str(w.message)]
assert len(msgs) == 1 and "not built" in msgs[0] and "compiler" in msgs[0], msgs
from deis_fast.kernels import dispatch
assert dispatch.load_ext() is None
x = deis_fast.sample(lambda x, t: 0.1 * x, torch.randn(2, 4), nfe=3)
assert torch.isfinite(x).all()
print("FILE", deis_fast.__file__)
"""


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "regular"])
def test_install_without_a_compiler_succeeds_and_falls_back(editable, tmp_path):
    pytest.importorskip("pybind11", reason="building the extension needs pybind11: pip install pybind11")
    src, prefix = tmp_path / "src", tmp_path / "prefix"
    src.mkdir()
    _copy_sources(str(src))
    env = dict(os.environ, CC="false", CXX="false", DEIS_FAST_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("DEIS_FAST_REQUIRE_EXT", None)
    # --ignore-installed: never uninstall the deis_fast this suite runs from (pip would, to "upgrade" it)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--ignore-installed", "--no-build-isolation", "--no-deps",
           "--no-index", "--prefix", str(prefix)] + (["-e", str(src)] if editable else [str(src)])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    purelib = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    assert not [f for _, _, fs in os.walk(prefix) for f in fs if f.startswith("_C") and f.endswith(".so")]
    sites = [p for p in site.getsitepackages() if os.path.isdir(p)]
    env2 = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEIS_FAST_BACKEND")}
    r = subprocess.run([sys.executable, "-S", "-c", CHECK, purelib, *sites], capture_output=True, text=True,
                       env=env2, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    where = r.stdout.split("FILE", 1)[1].strip()
    assert where.startswith(str(src) if editable else str(prefix)), where
    # the installation the suite runs from is untouched
    r = subprocess.run([sys.executable, "-c", "import deis_fast; print(deis_fast.__file__)"], capture_output=True,
                       text=True, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0 and not r.stdout.startswith(str(tmp_path)), r.stdout + r.stderr


def test_wheel_installs_into_a_fresh_venv_without_a_compiler(tmp_path):
    """The release path (issue 27): a wheel, with LICENSE and py.typed, installs into a fresh venv with pip and no
    compiler (CC=false), and that venv imports the wheel's deis_fast, not the checkout's."""
    pytest.importorskip("pybind11", reason="building the extension needs pybind11: pip install pybind11")
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    src.mkdir()
    _copy_sources(str(src))
    env = dict(os.environ, CC="false", CXX="false", DEIS_FAST_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    env.pop("DEIS_FAST_REQUIRE_EXT", None)   # CI sets it; this test is about the build that falls back without one
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index",
                        "-w", str(wheels), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = wheels.glob("deis_fast-*.whl")
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert "deis_fast/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names), names
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    if sys.prefix != sys.base_prefix:   # we run in a venv (the README's set-up): its torch is not "system" to the new one
        inner = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
        import site
        with open(os.path.join(inner, "outer_venv.pth"), "w") as f:   # plain paths: the outer .pth files (the
            f.write("\n".join(site.getsitepackages()) + "\n")         # checkout's editable finder) are not run
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([py, "-c", "import deis_fast, torch; print(deis_fast.__file__); "
                        "m = deis_fast.load_model('digits'); print(deis_fast.sample(m.model, torch.randn(1, *m.shape), "
                        "m.schedule, nfe=2).shape)"], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(str(venv)), r.stdout
