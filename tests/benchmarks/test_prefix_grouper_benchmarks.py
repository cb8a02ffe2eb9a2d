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


@pytest.mark.parametrize("trainer", ["dpo+ref", "redi"])
def test_prefix_sharing_benchmark_measures_a_packed_step(scripts, trainer):
    import prefix_sharing_dpo

    job = dict(trainer=trainer, pr=(48, 16), threads=1, rounds=1, seed=0)
    stock = prefix_sharing_dpo.worker({**job, "shared": False})
    shared = prefix_sharing_dpo.worker({**job, "shared": True})
    assert stock["packed_forwards"] == 0 and shared["packed_forwards"] >= 1
    assert stock["cpu_s"] > 0 and shared["cpu_s"] > 0


def test_prefix_sharing_crossing_is_the_smallest_ratio_that_pays_everywhere(scripts):
    from prefix_sharing_dpo import crossing

    rows = [("redi", 256, 1024, 0.8), ("redi", 256, 256, 1.1), ("dpo+ref", 1024, 1024, 0.95), ("redi", 4096, 64, 3.0)]
    assert crossing(rows).startswith("crossing: shared is faster at every point with P/R >= 64")
    rows[2] = ("dpo+ref", 1024, 1024, 1.2)
    text = crossing(rows)
    assert "P/R >= 1 " in text and "redi P=256 R=1024 (0.80x)" in text


def test_prefix_grouper_benchmarks_build_their_one_layer_models(scripts, tmp_path):
    import prefix_grouper_logps
    import prefix_grouper_window

    grouped = prefix_grouper_logps.build_trainer(True, 4, 16, 2, 64, str(tmp_path))
    assert grouped.model.config.num_attention_heads == 4 and grouped.model.config.num_hidden_layers == 1
    assert grouped.model.config._attn_implementation == "prefix_grouper_sdpa"
    window = prefix_grouper_window.build_trainer(False, 16, 64, str(tmp_path))
    assert window.model.config.sliding_window == 16 and window.model.config.model_type == "mistral"
