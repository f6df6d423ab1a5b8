"""The code's layout: imports run one way, and nothing that serves a trained model pulls in the training code."""

import ast
import os

from conftest import ROOT

MODULES = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
TRAINING_CODE = {"training", "model_setup", "distributed", "checkpoints", "sampler", "feature_cache"}


def project_imports(module: str) -> set[str]:
    """The project's modules that `module` imports, at its top or inside a function."""
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in MODULES:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
    return found


def reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for imported in project_imports(todo.pop()) - seen:
            seen.add(imported)
            todo.append(imported)
    return seen


def test_no_module_imports_a_module_that_imports_it_back():
    cycles = sorted(module for module in MODULES if module in reachable(module))
    assert not cycles, f"import cycles through {cycles}"


def test_what_serves_a_trained_model_never_imports_the_training_code():
    for module in ("inference", "eval_vlm", "gradio_vlm", "eval_lmms", "conversation", "model"):
        assert not reachable(module) & TRAINING_CODE, (module, reachable(module) & TRAINING_CODE)


def test_the_installed_project_lists_every_module_and_nothing_edits_sys_path():
    """`pip install -e .` makes exactly pyproject.toml's modules importable: one left out would import from the
    repository root only. And with the project installed, no file needs to put a folder on sys.path."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["py-modules"])
    assert listed == MODULES, (sorted(MODULES - listed), sorted(listed - MODULES))
    edits = [os.path.relpath(os.path.join(folder, name), ROOT)
             for folder, _, names in os.walk(ROOT) if "/." not in folder
             for name in names if name.endswith(".py")
             and "sys.path.insert" in open(os.path.join(folder, name), encoding="utf-8").read()]
    assert edits == ["tests/test_layout.py"], edits  # this file, which names it
