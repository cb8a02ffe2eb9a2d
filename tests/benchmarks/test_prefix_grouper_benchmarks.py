"""The Prefix Grouper benchmark scripts stay runnable: the GPU check's CPU smoke mode and the architecture sweep.

Both run in-process (the scripts import their neighbours as ``harness``, so ``benchmarks/`` goes on the path).
"""

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    # The scripts set torch's thread count and OMP_NUM_THREADS (--threads); later tests compare results across
    # processes at the default, so both come back (monkeypatch restores the variable, or its absence).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gpu_check_smoke_runs_every_section_on_cpu(scripts, tmp_path, monkeypatch):
    import gpu_check

    output = tmp_path / "gpu_check_smoke.txt"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--smoke", "--rounds", "1", "--output", str(output)])
    gpu_check.main()
    text = output.read_text()
    assert text.startswith("# command:") and "section failed" not in text
    matrix = [line for line in text.splitlines() if line.startswith(("| float32", "| bfloat16"))]
    assert len(matrix) == 4  # 2 dtypes x 2 kernels, every cell a verdict
    for line in matrix:
        assert line.count("exact:") == 2 or line.count("ok:") == 2, line
    assert "| 32 | 16 | 4 |" in text and "failed" not in text.split("## 2.")[1].split("## 3.")[0]
    windows = text.split("## 3.")[1]
    assert "CRASH" not in windows and "WRONG" not in windows
    assert windows.count("| mistral") == 1 and windows.count("| gpt_oss") == 1


def test_architecture_sweep_verdicts_and_readme_table(scripts, tmp_path, monkeypatch):
    import prefix_grouper_architectures as sweep

    output = tmp_path / "sweep.txt"
    monkeypatch.setattr(sys, "argv", ["x", "--types", "opt", "bart", "no_such_type", "--output", str(output)])
    sweep.main()
    rows = {name: (verdict, detail) for name, verdict, detail in sweep.parse_results(output)}
    assert rows["opt"][0] == "exact"
    assert rows["bart"][0] == "refused" and "position_ids" in rows["bart"][1]
    assert rows["no_such_type"][0] == "not buildable"
    import readme_tables

    section = readme_tables.prefix_grouper_architectures(output)
    assert "3 model types: 1 exact, 1 refused, 1 not buildable, 0 wrong, 0 crash." in section
    assert "| exact (1) | `opt` |" in section
