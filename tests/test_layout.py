"""The repo's shape, so it stays readable as it grows: scripts only run and library modules are only imported,
imports between root modules point one way, model.py and losses.py stand alone, and no function is longer than a
screen. Read from the source with ast; nothing is imported or run."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train_sft", "train_grpo", "distill", "sample"}
MODULES = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}


def _tree(name):
    with open(os.path.join(ROOT, name + ".py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def _repo_imports(name):
    """The root modules `name` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & MODULES - {name}


def test_scripts_are_never_imported_but_by_distills_sequence_mode():
    assert SCRIPTS <= MODULES
    edges = {(a, b) for a in MODULES for b in _repo_imports(a) if b in SCRIPTS}
    assert edges == {("distill", "train_sft")}  # distill --mode=sequence calls train_sft.main(**keywords)


def test_architecture_and_formulas_import_nothing_of_the_repo():
    assert _repo_imports("model") == set() and _repo_imports("losses") == set()


def test_library_imports_point_one_way():
    graph = {m: _repo_imports(m) for m in MODULES}
    done, visiting = set(), []

    def visit(m):  # depth-first; meeting a module still on the path is a cycle
        assert m not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(m):] + [m])}"
        if m not in done:
            visiting.append(m)
            for n in graph[m]:
                visit(n)
            visiting.pop()
            done.add(m)

    for m in sorted(graph):
        visit(m)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_function_fits_on_a_screen(name):
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(_tree(name))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 100]
    assert not long, f"{name}.py: functions over 100 lines: {long}"
