"""Dependencies point one way: peft_ext never needs TRL, the testbed is light, library code never imports it,
recipes never import benchmarks or tests, benchmarks never import tests, and the wheel ships the libraries only."""

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict:
    """Run ``code`` in a new interpreter (repository root first on the path); parse the JSON it prints last."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


LOADED = 'sorted(m for m in sys.modules if m.split(".")[0] in ("trl", "trl_ext", "peft_ext", "peft_trl_testbed"))'


def test_peft_ext_imports_nothing_from_trl():
    loaded = _run(f"import json, sys, peft_ext; print(json.dumps({LOADED}))")
    assert [m for m in loaded if m.split(".")[0] in ("trl", "trl_ext")] == []


def test_testbed_loads_no_trainer_and_registers_nothing():
    probe = _run(
        f"""
import json, sys
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
def registries():
    return [sorted(AttentionInterface._global_mapping), sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)]
stock = registries()
import peft_trl_testbed
print(json.dumps({{"modules": {LOADED}, "stock": stock, "after": registries()}}))
"""
    )
    assert all(m.split(".")[0] == "peft_trl_testbed" for m in probe["modules"]), probe["modules"]
    assert probe["after"] == probe["stock"]


def test_trl_ext_loads_trainers_on_first_use():
    probe = _run(
        f"""
import json, sys
import trl_ext
bare = {LOADED}
from trl_ext import REDITrainer
print(json.dumps({{"bare": bare, "redi": {LOADED}}}))
"""
    )
    assert probe["bare"] == ["trl_ext"]
    assert "trl_ext.redi.trainer" in probe["redi"] and "trl_ext.qtuning.trainer" not in probe["redi"]


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports in code (docstring examples excluded)."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", ["peft_ext", "trl_ext"])
def test_library_code_never_imports_the_testbed_recipes_or_benchmarks(package):
    offenders = {}
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        bad = {
            m
            for m in _imported_modules(path)
            if m.startswith(("peft_trl_testbed", "recipes", "benchmarks", "tests"))
            or (package == "peft_ext" and m.split(".")[0] in ("trl", "trl_ext"))
        }
        if bad:
            offenders[str(path.relative_to(REPO_ROOT))] = sorted(bad)
    assert offenders == {}


def test_peft_ext_docstrings_do_not_use_trl():
    hits = [
        f"{path.relative_to(REPO_ROOT)}:{n}"
        for path in sorted((REPO_ROOT / "peft_ext").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\b(from|import)\s+trl(_ext)?\b|\btrl_ext\.", line)
    ]
    assert hits == []


@pytest.mark.parametrize(
    "directory, forbidden",
    [
        ("recipes", ("benchmarks", "tests")),
        ("benchmarks", ("tests",)),
        ("peft_trl_testbed", ("recipes", "benchmarks", "tests")),
    ],
)
def test_scripts_import_only_downwards(directory, forbidden):
    offenders = {}
    for path in sorted((REPO_ROOT / directory).rglob("*.py")):
        bad = {m for m in _imported_modules(path) if m.split(".")[0] in forbidden}
        if bad:
            offenders[str(path.relative_to(REPO_ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_import_scan_sees_function_level_and_relative_imports(tmp_path):
    """The scan above must catch an import inside a function, or it would pass on the quickstart's old layout."""
    path = REPO_ROOT / "recipes" / "quickstart.py"
    found = _imported_modules(path)
    assert "recipes.timing" in found and "recipes.common.ToyEval" in found


def test_the_wheel_ships_the_libraries_and_the_testbed_only(tmp_path):
    """Build the wheel from a copy of the checkout (a build writes build/ and egg-info beside the sources), without
    dependencies, and list its top-level names. Where setuptools is installed the build reuses it (no isolation, no
    network); elsewhere pip fetches the build backend as usual."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", "outputs", ".*_cache")
    shutil.copytree(REPO_ROOT, source, ignore=ignore)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--no-cache-dir", "-q"]
    out = subprocess.run([*pip, "-w", str(tmp_path), str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    print(f"wheel {wheel.name}: top-level names {sorted(top)}")
    assert top == {"peft_ext", "trl_ext", "peft_trl_testbed"}
