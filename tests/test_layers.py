"""The package reads in one direction: notebook `nbs/NN_name.ipynb` exports `promptsys/<module>.py`, and a module
imports only modules from notebooks with a lower number — at the top of the file or inside a function alike.
No private name crosses a module boundary, no module is named like a builtin or a standard-library module, methods
are defined in their class or with `@patch` (never attached by assignment), and lines stay within 120 characters.

Providers found by name (`providers.PROVIDER_MODULES`, resolved with importlib when a provider is asked for) are a
plugin registry, not an import: the lower layer names the plugin's module as data and never imports it itself.
"""
from __future__ import annotations
import ast, builtins, json, re, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "promptsys"
SKIP = {"__init__", "_modidx"}


def _layers() -> dict[str, tuple[int, str]]:
    "module name -> (notebook number, notebook file), from each notebook's `#| default_exp`."
    out = {}
    for nb in sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        for c in cells:
            m = re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(c["source"]), re.M)
            if c["cell_type"] == "code" and m:
                assert m.group(1) not in out, f"{nb.name} and {out[m.group(1)][1]} both export {m.group(1)}"
                out[m.group(1)] = (int(nb.name[:2]), nb.name)
                break
    return out


LAYERS = _layers()
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in SKIP)


def _target(node, module:str) -> list[tuple[str, list[str], int]]:
    "The promptsys modules an import node reaches, with the names it takes, and its line."
    if isinstance(node, ast.ImportFrom):
        if node.level == 1: base = node.module or ""
        elif (node.module or "").startswith("promptsys"):
            base = node.module[len("promptsys."):] if "." in node.module else ""
        else: return []
        names = [a.name for a in node.names]
        if base == "": return [(n, [], node.lineno) for n in names]          # from promptsys import x
        return [(base.split(".")[0], names, node.lineno)]
    if isinstance(node, ast.Import):
        return [(a.name.split(".")[1], [], node.lineno) for a in node.names
                if a.name.startswith("promptsys.") and len(a.name.split(".")) > 1]
    return []


def _imports(module:str):
    tree = ast.parse((PKG / f"{module}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        yield from _target(node, module)


def test_every_module_comes_from_a_numbered_notebook():
    missing = [m for m in MODULES if m not in LAYERS]
    assert not missing, f"modules without a numbered notebook in nbs/: {missing}"
    stale = [m for m in LAYERS if not (PKG / f"{m}.py").exists()]
    assert not stale, f"notebooks whose module was never exported: {stale}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_only(module):
    "Every promptsys import (top level or inside a function) names a module of a lower-numbered notebook."
    n, nb = LAYERS[module]
    bad = []
    for target, names, line in _imports(module):
        if target in SKIP or target not in LAYERS: continue
        tn, tnb = LAYERS[target]
        if tn >= n: bad.append(f"{module}.py:{line} imports {target} ({tnb}, layer {tn} >= {n})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", MODULES)
def test_no_private_name_crosses_a_module(module):
    tree = ast.parse((PKG / f"{module}.py").read_text(encoding="utf-8"))
    bad, aliases = [], set()
    for node in ast.walk(tree):
        for target, names, line in _target(node, module):
            bad += [f"{module}.py:{line} imports {target}.{x}" for x in names if x.startswith("_")]
            if not names: aliases.add(target)
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name.split(".")[-1] for a in node.names if a.name.startswith("promptsys."))
        if isinstance(node, ast.ImportFrom) and node.module == "promptsys" or (
                isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module):
            aliases.update(a.asname or a.name for a in node.names)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{module}.py:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    "Redundant with the layer rule, and kept so a cycle is named as one if the numbering is ever changed."
    graph = {m: {t for t, _, _ in _imports(m) if t in LAYERS and t != m} for m in MODULES}
    seen, stack = {}, []
    def visit(m):
        seen[m] = "open"; stack.append(m)
        for t in graph.get(m, ()):
            if seen.get(t) == "open": pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in seen: visit(t)
        seen[m] = "done"; stack.pop()
    for m in MODULES:
        if m not in seen: visit(m)


@pytest.mark.parametrize("module", MODULES)
def test_names_collide_with_nothing(module):
    assert module not in dir(builtins), f"promptsys.{module} shadows the builtin {module}()"
    assert module not in sys.stdlib_module_names, f"promptsys.{module} is named like the standard library's"


@pytest.mark.parametrize("module", MODULES)
def test_methods_are_not_attached_by_assignment(module):
    "`Cls.name = func` at module level hides a method from readers and leaks its name into __all__: use @patch."
    tree = ast.parse((PKG / f"{module}.py").read_text(encoding="utf-8"))
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    funcs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    bad = [f"{module}.py:{n.lineno} {t.value.id}.{t.attr} = {n.value.id}"
           for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
           if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in classes
           and isinstance(n.value, ast.Name) and n.value.id in funcs]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", MODULES)
def test_all_lists_only_public_module_level_names(module):
    tree = ast.parse((PKG / f"{module}.py").read_text(encoding="utf-8"))
    defined = set()
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not any(isinstance(d, ast.Name) and d.id == "patch" for d in n.decorator_list): defined.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                defined.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
    all_ = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)), [])
    assert [x for x in all_ if x.startswith("_")] == []
    assert [x for x in all_ if x not in defined] == [], "__all__ names that are not module-level definitions"


@pytest.mark.parametrize("module", MODULES)
def test_lines_fit_in_120_characters(module):
    # nbdev writes the `__all__` list itself and wraps it a few characters past 120; every other line is ours.
    lines = (PKG / f"{module}.py").read_text(encoding="utf-8").splitlines()
    generated = {i for i, l in enumerate(lines, 1) if l.startswith("__all__ = [")}
    long = [i for i, l in enumerate(lines, 1) if len(l) > 120 and i not in generated]
    assert not long, f"{module}.py lines over 120 characters: {long[:20]}"
