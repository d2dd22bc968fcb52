"""The package's folders are its layers: every import (lazy ones inside functions included) runs downward or
sideways within a layer, and no module imports itself back through a chain (no circles)."""
import ast
import os

import pytest

import deis_fast

PKG = os.path.dirname(os.path.abspath(deis_fast.__file__))

# lowest first; a module may import its own layer and the ones below it, never one above
LAYERS = [
    ("deis_fast._version", "deis_fast._C", "deis_fast.kernels"),
    ("deis_fast.core",),
    ("deis_fast.solvers",),
    ("deis_fast.graph", "deis_fast.sampler", "deis_fast.testing"),
    ("deis_fast.tuning", "deis_fast.zoo"),
    ("deis_fast.integrations",),
    ("deis_fast.serving",),
    ("deis_fast.cli",),
    ("deis_fast", "deis_fast.__main__"),   # the public API: imports anything
]


def layer_of(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (rank, p)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best[0]


def modules() -> dict[str, str]:
    out = {}
    for dp, _, fn in os.walk(PKG):
        for f in fn:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dp, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dp, f)
    return out


MODULES = modules()
EXTENSIONS = {"deis_fast._C"}   # compiled modules (no .py)


def imports_of(module: str, path: str) -> list[tuple[int, str]]:
    """(line, imported module) for every deis_fast import in the file, at any depth."""
    is_pkg = path.endswith("__init__.py")
    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "deis_fast"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "deis_fast":
                base = node.module
            else:
                continue
            for a in node.names:   # `from pkg import submodule` imports the submodule, not only the package
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES or sub in EXTENSIONS else base))
    return found


GRAPH = {m: sorted({t for _, t in imports_of(m, p) if t != m}) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert len(MODULES) > 40 and all(0 <= layer_of(m) < len(LAYERS) for m in MODULES)   # layer_of raises otherwise


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward(module):
    up = [(line, t) for line, t in imports_of(module, MODULES[module]) if layer_of(t) > layer_of(module)]
    assert not up, (f"{module} imports a higher layer: "
                    + ", ".join(f"{t} (line {line})" for line, t in up)
                    + f"; layers, lowest first: {LAYERS}")


def find_circle(graph: dict[str, list[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> imported modules) as a list ending where it starts, or None."""
    state: dict[str, int] = {}   # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, ()):
            if t not in graph:
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (c := visit(t)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_circles():
    circle = find_circle(GRAPH)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check can fail: a core module importing the CLI, and a two-module circle, are caught."""
    assert layer_of("deis_fast.cli.common") > layer_of("deis_fast.core.plan")
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..cli.common import UsageError\n")
    assert imports_of("deis_fast.core.m", str(f)) == [(2, "deis_fast.cli.common")]
    assert find_circle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_circle({"a": ["b"], "b": [], "c": ["a"]}) is None
