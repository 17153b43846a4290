"""pyproject.toml declares what the code imports, and nothing else; constraints.txt pins what it declares.

The imports are read with ``ast`` from every source file (including imports inside functions,
``importlib.import_module("x")`` and ``pytest.importorskip("x")``), the declarations with ``tomllib``.
"""
from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])

# Distribution -> the top-level module it provides, where the two names differ beyond "-" vs "_".
MODULE_OF = {
    "open-clip-torch": "open_clip",
    "scikit-learn": "sklearn",
    "pillow": "PIL",
    "onnxruntime-gpu": "onnxruntime",
    "tensorrt-cu12": "tensorrt",
    "tensorrt-cu13": "tensorrt",
    "cuda-python": "cuda",
    "cuda-bindings": "cuda",
}
# Declared but never imported by this code: each with the place in the code that needs it, checked below.
RUNTIME_ONLY = {
    "onnxscript": ("bakeoff/export/onnx_export.py", r"dynamo=True", "torch.onnx.export(dynamo=True) imports onnxscript"),
}
# Imported but deliberately not declared: an alternative that the code falls back to.
UNDECLARED_FALLBACKS = {
    "pycuda": "bakeoff/engines/trt_runner.py uses pycuda only where cuda-python (cuda.bindings) is absent",
}
# The installed packages (pyproject's packages.find) and the folders run from the repository root.
FIRST_PARTY = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
PACKAGE_DIRS = (*sorted(FIRST_PARTY), "bench")
TEST_DIRS = ("tests",)


def module_of(dist: str) -> str:
    name = canonicalize_name(dist)
    return MODULE_OF.get(name, name.replace("-", "_"))


def requirements(group: str | None = None) -> list[Requirement]:
    """The core dependencies (``group=None``) or one extra's, less references to this project's own extras."""
    project = PYPROJECT["project"]
    raw = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return [r for r in map(Requirement, raw) if canonicalize_name(r.name) != PROJECT]


def runtime_requirements() -> list[Requirement]:
    """Everything but the test extra: what the code in PACKAGE_DIRS may import."""
    groups = [g for g in PYPROJECT["project"].get("optional-dependencies", {}) if g != "test"]
    return requirements() + [r for g in groups for r in requirements(g)]


@functools.cache
def imported_modules(dirs: tuple[str, ...], optional_too: bool = True) -> dict[str, list[str]]:
    """Top-level module name -> the files that import it (absolute imports only)."""
    found: dict[str, list[str]] = {}
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                      and isinstance(node.args[0].value, str)):
                    func = node.func
                    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                    if called == "import_module" or (optional_too and called == "importorskip"):
                        names = [node.args[0].value]
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(rel)
    return found


def third_party(found: dict[str, list[str]]) -> dict[str, list[str]]:
    local = FIRST_PARTY | {"tests", "bench", "conftest"}
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m not in local}


def test_pyproject_declares_ranges_not_pins():
    assert "<" not in PYPROJECT["project"]["requires-python"], "requires-python must not refuse newer Pythons"
    pinned = [str(r) for g in [None, *PYPROJECT["project"]["optional-dependencies"]] for r in requirements(g)
              if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"exact pins belong in constraints.txt, not pyproject.toml: {pinned}"


@pytest.mark.parametrize("req", runtime_requirements(), ids=str)
def test_every_declared_dependency_is_imported(req):
    dist = canonicalize_name(req.name)
    if dist in RUNTIME_ONLY:
        where, pattern, why = RUNTIME_ONLY[dist]
        assert re.search(pattern, (ROOT / where).read_text()), f"{dist} is declared because {why}: no longer so"
        return
    used = third_party(imported_modules(PACKAGE_DIRS))
    assert module_of(dist) in used, f"{req} is declared in pyproject.toml but no code imports {module_of(dist)}"


def test_test_extra_is_imported_by_the_tests():
    used = third_party(imported_modules(TEST_DIRS))
    unused = [str(r) for r in requirements("test") if module_of(r.name) not in used]
    assert not unused, f"declared in [test] but not imported by any test: {unused}"


def test_every_third_party_import_is_declared():
    runtime = {module_of(r.name) for r in runtime_requirements()}
    missing = {m: sorted(set(f)) for m, f in third_party(imported_modules(PACKAGE_DIRS)).items()
               if m not in runtime and m not in UNDECLARED_FALLBACKS}
    # importorskip marks a test's optional library: only the tests' plain imports must be declared.
    declared_for_tests = runtime | {module_of(r.name) for r in requirements("test")}
    missing.update({m: sorted(set(f)) for m, f in third_party(imported_modules(TEST_DIRS, optional_too=False)).items()
                    if m not in declared_for_tests})
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_onnxruntime_builds_are_alternatives():
    """onnxruntime and onnxruntime-gpu install the same package: no extra may pull both, nor the test extra one."""
    extras = PYPROJECT["project"]["optional-dependencies"]

    def closure(group: str, seen: frozenset = frozenset()) -> set[str]:
        names = set()
        for raw in extras[group]:
            r = Requirement(raw)
            if canonicalize_name(r.name) == PROJECT:
                names |= {n for e in r.extras if e not in seen for n in closure(e, seen | {group})}
            else:
                names.add(canonicalize_name(r.name))
        return names

    for group in extras:
        assert not {"onnxruntime", "onnxruntime-gpu"} <= closure(group), group
    assert not {"onnxruntime", "onnxruntime-gpu"} & closure("test"), "[test] must combine with [cpu] or [gpu]"
    assert not any(canonicalize_name(r.name).startswith("onnxruntime") for r in requirements())


def test_constraints_pin_every_cpu_install_dependency_inside_its_range():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            (spec,) = r.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(r.name)] = spec.version
    for r in requirements() + requirements("cpu") + requirements("test"):
        assert canonicalize_name(r.name) in pins, f"constraints.txt has no pin for {r}"
    for r in runtime_requirements() + requirements("test"):
        name = canonicalize_name(r.name)
        if name in pins:
            assert r.specifier.contains(pins[name], prereleases=True), f"constraints.txt: {name}=={pins[name]}, not {r}"
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text()
