"""Every benchmark takes the harness's common flags and writes its results file under the harness's header."""

import argparse
import ast
import os
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import harness  # noqa: E402

SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.stem not in ("__init__", "harness", "readme_tables"))


def _called(path: Path) -> set[str]:
    """Names of the functions ``path`` calls (``f(...)`` and ``module.f(...)``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_benchmark_takes_the_common_flags_and_writes_the_header(script):
    called = _called(script)
    assert {"add_common_flags", "apply_common_flags"} <= called, "parse the flags through harness.add_common_flags"
    assert called & {"write_results", "recording", "results_header"}, "write the results file through the harness"
    own = {"--output", "--threads", "--seed", "--rounds", "--out", "--seeds", "--repeats"}
    text = script.read_text()
    retyped = sorted(flag for flag in own if f'add_argument("{flag}"' in text)
    assert retyped == [], f"{script.name} defines {retyped} itself"


def test_common_flags_parse_check_and_apply(monkeypatch, tmp_path):
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        parser = harness.add_common_flags(argparse.ArgumentParser(), tmp_path / "r.txt", rounds=3)
        args = harness.apply_common_flags(parser.parse_args(["--threads", "1", "--seed", "5"]))
        assert (args.output, args.threads, args.seed, args.rounds) == (tmp_path / "r.txt", 1, 5, 3)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))
        with pytest.raises(SystemExit, match="--rounds must be at least 1, got 0"):
            harness.apply_common_flags(parser.parse_args(["--rounds", "0"]))
        with pytest.raises(SystemExit, match="--threads must be at least 1, got 0"):
            harness.apply_common_flags(parser.parse_args(["--threads", "0"]))
        with pytest.raises(SystemExit, match=r"--seed must be in \[0, 2\*\*32\), got -1"):
            harness.apply_common_flags(parser.parse_args(["--seed", "-1"]))
        with pytest.raises(SystemExit, match="is a folder; name the results file"):
            harness.apply_common_flags(parser.parse_args(["--output", str(tmp_path)]))
        (tmp_path / "file").write_text("")
        with pytest.raises(SystemExit, match="cannot create its folder"):
            harness.apply_common_flags(parser.parse_args(["--output", str(tmp_path / "file" / "r.txt")]))
        several = harness.add_common_flags(argparse.ArgumentParser(), tmp_path / "r.txt", threads=[1, 2], seed=[0, 1])
        args = harness.apply_common_flags(several.parse_args(["--threads", "2", "4", "--seed", "3"]))
        assert (args.threads, args.seed, hasattr(args, "rounds")) == ([2, 4], [3], False)
        assert os.environ["OMP_NUM_THREADS"] == "1"  # a list is applied by each run, not here
    finally:  # later tests run at the default thread count and RNG state
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def test_the_header_names_the_command_commit_versions_and_threads(tmp_path):
    path = harness.write_results(tmp_path / "r.txt", "body", argv=[str(BENCHMARKS / "x.py"), "--threads", "1"])
    lines = path.read_text().splitlines()
    keys = [line.split(":")[0] for line in lines if line.startswith("#")]
    assert keys == [
        "# command",
        "# git commit",
        "# versions",
        "# cpu",
        "# threads",
        "# load average (1, 5, 15 min) at start",
        "# date",
    ]
    assert lines[0] == "# command: python benchmarks/x.py --threads 1" and lines[-1] == "body"


def test_the_commit_is_marked_modified_by_code_changes_only(tmp_path, monkeypatch):
    """A regeneration run rewrites results files and README tables; only a change to code marks the commit."""
    import subprocess

    def git(*args):
        command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for name in ("code.py", "README.md", "benchmarks/results/a.txt"):
        (tmp_path / name).write_text("v1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    monkeypatch.setattr(harness, "ROOT", tmp_path)
    (tmp_path / "README.md").write_text("v2\n")
    (tmp_path / "benchmarks" / "results" / "a.txt").write_text("v2\n")
    assert not harness.git_commit().endswith("+uncommitted changes")
    (tmp_path / "code.py").write_text("v2\n")
    assert harness.git_commit().endswith("+uncommitted changes")
