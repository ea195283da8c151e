"""Imports run one way: no module of the package imports itself back through others, and no library module
imports a command-line module (igf/filter.py only parses flags and calls the API)."""
import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "igf")
COMMAND_LINES = {"filter", "distil"}  # python -m igf.filter, igf.distil; igf.assets is a library with a __main__


def package_imports():
    """{module: modules of the package it imports (relative imports, at any depth: lazy ones count too)}."""
    out = {}
    for name in sorted(os.listdir(PACKAGE)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(PACKAGE, name), encoding="utf-8").read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        out[name[:-3]] = deps
    return out


def test_no_import_circle_and_no_library_imports_a_command_line():
    imports = package_imports()
    assert {"learner", "contexts", "filter", "paths", "artifacts"} <= set(imports)

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for dep in imports.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert [m for m in imports if m in reachable(m)] == []
    assert [m for m, deps in imports.items() if deps & COMMAND_LINES] == []
    assert "contexts" in imports["learner"] and "learner" in imports["filter"]  # data -> learner -> command line
    assert "distillation" in imports["learner"] and "learner" in imports["distil"]
