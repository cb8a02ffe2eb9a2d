"""Prefix grouping under 2 CPU processes (gloo) gives the loss and gradients of one process on the global batch."""

from pathlib import Path

import pytest
from distributed_helpers import run_distributed
from prefix_grouper_helpers import assert_close
from safetensors.torch import load_file

SCRIPT = str(Path(__file__).with_name("_prefix_grouper_distributed.py"))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.safetensors"
        run_distributed(SCRIPT, str(out), str(world), nproc=world)  # the script asserts its world size
        results[world] = load_file(out)
    single, double = results[1], results[2]
    assert single.keys() == double.keys()
    assert double["grouped/loss"].abs().item() > 0
    for key in single:
        if key.startswith("grouped/"):
            assert_close(double[key], single[key], what=f"2 processes vs 1: {key}")
            assert_close(double[key], double[key.replace("grouped/", "stock/")], what=f"grouped vs stock: {key}")
