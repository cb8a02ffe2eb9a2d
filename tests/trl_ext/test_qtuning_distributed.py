"""Two processes select on their own slices and train like one process accumulating the two slices."""

import json

import pytest
import torch
from distributed_helpers import run_distributed
from safetensors.torch import load_file


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["separate"])  # the mode that calls the DDP model twice
def test_two_processes_match_one_process_selecting_per_half_batch(tmp_path, scoring):
    script = __file__.replace("test_qtuning_distributed.py", "_qtuning_distributed.py")
    one, two = tmp_path / "one" / "w.safetensors", tmp_path / "two" / "w.safetensors"
    one.parent.mkdir()
    two.parent.mkdir()
    run_distributed(script, str(one), "1", scoring, nproc=1)
    run_distributed(script, str(two), "2", scoring, nproc=2)

    # Each process scored only its own 4 samples; one process scored the same two slices as micro-batches.
    single = json.loads((tmp_path / "one" / "w.safetensors.rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"w.safetensors.rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["ppl"]) for r in single["records"]] == [4, 4]
    assert [[len(r["ppl"]) for r in rank["records"]] for rank in ranks] == [[4], [4]]
    for micro, rank in zip(single["records"], ranks):
        assert sorted(rank["records"][0]["ppl"]) == pytest.approx(sorted(micro["ppl"]), rel=1e-5)
        assert sorted(rank["records"][0]["quadrant"]) == sorted(micro["quadrant"])
    # The logged counts are summed over processes, like over accumulated micro-batches (averaged).
    assert ranks[0]["log"]["qtuning/samples"] == 8 and single["log"]["qtuning/samples"] == 4
    assert ranks[0]["log"]["qtuning/kept_samples"] == 4 and single["log"]["qtuning/kept_samples"] == 2

    w1, w2 = load_file(one), load_file(two)
    assert w1["loss"].item() == pytest.approx(w2["loss"].item(), rel=1e-5)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6, msg=name)
