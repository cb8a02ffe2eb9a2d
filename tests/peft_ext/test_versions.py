"""The supported upstream range: one table, matching pyproject and the lower-bounds pins, enforced at import."""

import importlib
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from peft_ext import _versions
from peft_ext._versions import SUPPORTED, UnsupportedVersionError, is_supported, require_supported_versions

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_bounds_equal_the_table():
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {req.name: req.specifier for req in map(Requirement, deps) if req.name in SUPPORTED}
    assert declared == {name: SpecifierSet(f">={low},<{high}") for name, (low, high) in SUPPORTED.items()}


def test_lower_bounds_file_pins_the_lowest_supported_releases():
    lines = (REPO_ROOT / ".ci" / "lower-bounds.txt").read_text().splitlines()
    pins = {req.name: str(req.specifier) for req in (Requirement(line) for line in lines if line and line[0] != "#")}
    assert {name: pins.get(name) for name in SUPPORTED} == {name: f"=={low}" for name, (low, _) in SUPPORTED.items()}
    # every other pin is a pyproject lower bound too, so the job installs the oldest declared releases
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lowest = {req.name: min(s.version for s in req.specifier if s.operator == ">=") for req in map(Requirement, deps)}
    assert {name: pin for name, pin in pins.items() if name not in SUPPORTED} == {
        name: f"=={lowest[name]}" for name in pins if name not in SUPPORTED
    }


@pytest.mark.parametrize(
    "version, supported",
    [
        ("1.16.0", True),
        ("1.16.0", True),
        ("1.16.3", True),
        ("1.16.1.dev0", True),
        ("1.14.2", False),  # no fused LM head (see the README)
        ("1.15.0", False),  # its fused LM head needs Triton on every device (see the README)
        ("1.16.0rc1", False),  # a pre-release of the lower bound comes before it
        ("1.17.0", False),
        ("1.17.0.dev0", False),  # a pre-release of the next minor is not a 1.16 release
        ("2.0.0", False),
        ("not-a-version", False),
    ],
)
def test_trl_range_edges(version, supported):
    assert SUPPORTED["trl"] == ("1.16.0", "1.17")  # the edges below are written for this range
    assert is_supported("trl", version) is supported


def fake_versions(monkeypatch, **versions):
    """Make the version lookup report ``versions`` (None: not installed), the real one for the rest."""
    real = _versions.installed_version
    monkeypatch.setattr(_versions, "installed_version", lambda name: versions.get(name, real(name)))


def test_error_names_installed_version_range_and_pip_command(monkeypatch):
    fake_versions(monkeypatch, trl="1.14.2", peft="0.22.0", accelerate=None)
    with pytest.raises(UnsupportedVersionError) as raised:
        require_supported_versions(["trl", "transformers", "peft", "accelerate"], package="trl_ext")
    assert str(raised.value).splitlines() == [
        "trl_ext (peft-trl-ext) does not support the installed trl, peft, accelerate:",
        "  trl 1.14.2: supported is trl>=1.16.0,<1.17",
        "  peft 0.22.0: supported is peft>=0.21.0,<0.22",
        "  accelerate (not installed): supported is accelerate>=1.12.0,<1.17",
        'Install a supported release: pip install "trl>=1.16.0,<1.17" "peft>=0.21.0,<0.22" "accelerate>=1.12.0,<1.17"',
    ]
    assert isinstance(raised.value, ImportError)


def test_installed_releases_are_supported():
    require_supported_versions(list(SUPPORTED), package="peft_ext")


def fresh_import(monkeypatch, module, *stale):
    """Import ``module`` again from scratch; the cached modules come back after the test."""
    for name in (module, *stale):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(module)


def test_import_peft_ext_refuses_an_unsupported_peft(monkeypatch):
    fake_versions(monkeypatch, peft="0.20.0")
    with pytest.raises(UnsupportedVersionError, match=r'peft 0\.20\.0: .*\n.*pip install "peft>=0\.21\.0,<0\.22"$'):
        fresh_import(monkeypatch, "peft_ext")


@pytest.mark.parametrize("name", ["PrefixGrouperGRPOTrainer", "QTuningSFTTrainer", "REDITrainer"])
def test_trl_ext_trainers_refuse_an_unsupported_trl(monkeypatch, name):
    fake_versions(monkeypatch, trl="1.17.0")
    subpackage = {"PrefixGrouperGRPOTrainer": "prefix_grouper", "QTuningSFTTrainer": "qtuning", "REDITrainer": "redi"}
    trl_ext = fresh_import(monkeypatch, "trl_ext", "trl_ext._supported", f"trl_ext.{subpackage[name]}")
    with pytest.raises(UnsupportedVersionError, match=r'trl 1\.17\.0: .*\n.*pip install "trl>=1\.16\.0,<1\.17"$'):
        getattr(trl_ext, name)
