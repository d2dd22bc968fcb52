"""CI runs what the README tells a user to run (issue 33, item 1): ``.ci/run`` takes the README's test command out of
README.md, exactly one such line exists, and every test that needs an optional dependency skips with a reason (the
install command) where it is missing."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readmes_test_line():
    ci = _read(".ci", "run")
    grep = re.search(r"^readme_test=\$\((grep -E .* README\.md)\)$", ci, re.M)
    assert grep, ".ci/run must take the test command out of README.md"
    assert re.search(r'^eval "\$readme_test"$', ci, re.M), ".ci/run must run the line it took, as written"
    found = subprocess.run(["bash", "-c", grep.group(1)], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = found.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0].strip()
    readme_lines = [ln.strip() for ln in _read("README.md").splitlines() if "python -m pytest" in ln and "pip install" in ln]
    assert readme_lines == [line]   # the one README test command, and the one CI runs
    extras = re.search(r'pip install -e "\.\[([a-z,]+)\]"', line).group(1).split(",")
    assert {"test", "comfyui"} <= set(extras), extras   # the suite's optional dependencies (torchsde: comfyui)
    # CI adds only its two variables: no other pip install or pytest run before the README's line
    before = ci[:grep.start()]
    assert "pip install" not in before and "pytest" not in before


def test_optional_dependencies_skip_with_a_reason():
    bare = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in files:
            if name.endswith(".py"):
                text = _read(folder, name)
                for m in re.finditer(r"importorskip\(([^()]*)\)", text):
                    if "reason=" not in m.group(1):
                        bare.append(f"{os.path.relpath(os.path.join(folder, name), ROOT)}: {m.group(0)}")
    assert not bare, "pytest.importorskip without reason= (say what to install):\n" + "\n".join(bare)
