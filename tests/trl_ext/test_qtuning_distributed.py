"""Two processes select on their own slices and train like one process accumulating the two slices."""

import json

import pytest
import torch
from distributed_helpers import run_distributed
from safetensors.torch import load_file

SCORINGS = ("separate", "reuse")  # both call the DDP model twice: a scoring forward, then the training forward


@pytest.mark.slow
def test_two_processes_match_one_process_selecting_per_half_batch(tmp_path):
    script = __file__.replace("test_qtuning_distributed.py", "_qtuning_distributed.py")
    one, two = tmp_path / "one" / "w", tmp_path / "two" / "w"
    one.parent.mkdir()
    two.parent.mkdir()
    run_distributed(script, str(one), "1", ",".join(SCORINGS), nproc=1)
    run_distributed(script, str(two), "2", ",".join(SCORINGS), nproc=2)

    for scoring in SCORINGS:
        # Each process scored only its own 4 samples; one process scored the same two slices as micro-batches.
        single = json.loads((tmp_path / "one" / f"w.{scoring}.rank0.json").read_text())
        ranks = [json.loads((tmp_path / "two" / f"w.{scoring}.rank{r}.json").read_text()) for r in (0, 1)]
        assert [len(r["ppl"]) for r in single["records"]] == [4, 4], scoring
        assert [[len(r["ppl"]) for r in rank["records"]] for rank in ranks] == [[4], [4]], scoring
        for micro, rank in zip(single["records"], ranks):
            assert sorted(rank["records"][0]["ppl"]) == pytest.approx(sorted(micro["ppl"]), rel=1e-5), scoring
            assert sorted(rank["records"][0]["quadrant"]) == sorted(micro["quadrant"]), scoring
        # The logged counts are summed over processes, like over accumulated micro-batches (averaged).
        assert ranks[0]["log"]["qtuning/samples"] == 8 and single["log"]["qtuning/samples"] == 4, scoring
        assert ranks[0]["log"]["qtuning/kept_samples"] == 4 and single["log"]["qtuning/kept_samples"] == 2, scoring

        w1, w2 = load_file(f"{one}.{scoring}"), load_file(f"{two}.{scoring}")
        assert w1["loss"].item() == pytest.approx(w2["loss"].item(), rel=1e-5), scoring
        for name in w1:
            torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6, msg=f"{scoring}: {name}")
