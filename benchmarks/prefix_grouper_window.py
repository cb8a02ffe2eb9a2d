"""Sliding-window layers: time and peak memory of GRPO's log-prob step, Prefix Grouper vs the stock trainer.

Both sides run the trainers' own ``_get_per_token_logps_and_entropies`` (TRL's fused LM head, entropies on) on one
group, a ``P``-token prompt and ``G`` completions of ``R`` tokens, then backpropagate the summed log-probs. The model
is one random Mistral decoder layer (fp32, ``sdpa``, every layer sliding-window) of hidden size 1024 and MLP 4096,
16 heads x 64 with 4 KV heads, and the toy vocabulary. The stock side runs transformers' sliding-window mask through
SDPA; the grouped side runs the split attention's windowed fused kernels (``merged`` on CPU).

Method:
- every (round, side) runs in a fresh worker process; rounds alternate stock and grouped workers, so machine load
  hits both sides alike;
- time is the worker's process CPU time of one log-prob forward+backward after a warm-up at a small shape (robust
  to other load on the machine); wall time is reported beside it;
- peak memory is the growth of the worker's peak resident set (``resource.getrusage(...).ru_maxrss``, which sees
  torch's allocations, unlike ``tracemalloc``) over its value after the model, inputs and warm-up: activations,
  masks, saved tensors, gradients and temporaries of the measured step;
- the two sides' log-probs are compared, so the figures are for an exact run.

Usage:
    python benchmarks/prefix_grouper_window.py                      # P=2048, R=2048, G=8, window 512
    python benchmarks/prefix_grouper_window.py --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import RESULTS, add_common_flags, apply_common_flags, write_results

HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM, KV_HEADS = 1024, 4096, 16, 64, 4


def build_trainer(grouped: bool, window: int, max_len: int, output_dir: str, seed: int = 0):
    """A stock or grouped GRPO trainer around one random sliding-window Mistral layer (fp32, sdpa), in train mode."""
    from recipes.timing import make_trainer

    shape = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, sliding_window=window)
    model, _ = harness.one_layer_model("mistral", HEADS, HEAD_DIM, KV_HEADS, max_len, seed, **shape)
    return make_trainer(grouped, model, output_dir)


def worker(job: dict) -> dict:
    """Measure one side in this process; save its log-probs to ``job["logps"]``."""
    import torch

    from recipes.timing import logprob_step, one_group

    torch.set_num_threads(job["threads"])
    prompt_len, completion_len, group = job["plg"]
    trainer = build_trainer(
        job["grouped"], job["window"], prompt_len + completion_len + 8, tempfile.mkdtemp(), job["seed"]
    )
    vocab, eos = trainer.model.config.vocab_size, trainer.processing_class.eos_token_id
    logprob_step(trainer, *one_group(64, 16, 2, vocab, eos), 16)  # warm-up at a small shape
    input_ids, mask = one_group(prompt_len, completion_len, group, vocab, eos)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, mask, completion_len, compute_entropy=True
    )
    logps.sum().backward()
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024  # ru_maxrss is in KiB
    torch.save(logps.detach(), job["logps"])
    return {"cpu_s": cpu, "wall_s": wall, "peak_mb": peak_mb}


def run_worker(job: dict) -> dict:
    return harness.run_worker(__file__, job)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=2048, help="P, prompt tokens")
    parser.add_argument("--completion", type=int, default=2048, help="R, tokens per completion")
    parser.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--window", type=int, default=512, help="the layer's sliding_window")
    add_common_flags(
        parser, RESULTS / "prefix_grouper_window.txt", rounds=2, rounds_help="rounds of (stock, grouped) workers"
    )
    argv = sys.argv[1:] if argv is None else argv
    cli = harness.parse_or_work(parser, argv, worker)
    if cli is None:
        return

    import torch

    apply_common_flags(cli)
    plg = (cli.prompt, cli.completion, cli.group)
    results = {"stock": [], "grouped": []}
    diff = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(cli.rounds):
            logps = {}
            for side in ("stock", "grouped") if round_ % 2 == 0 else ("grouped", "stock"):
                path = str(Path(tmp) / f"{side}.pt")
                job = {
                    "grouped": side == "grouped",
                    "plg": plg,
                    "window": cli.window,
                    "threads": cli.threads,
                    "seed": cli.seed,
                    "logps": path,
                }
                results[side].append(run_worker(job))
                logps[side] = torch.load(path)
                print(f"round {round_ + 1} {side}: {results[side][-1]}", flush=True)
            diff = max(diff, (logps["stock"] - logps["grouped"]).abs().max().item())

    def best(side, key):
        return min(r[key] for r in results[side])

    def median(side, key):
        return statistics.median(r[key] for r in results[side])

    lines = [
        f"model: one Mistral decoder layer, sliding_window={cli.window}, hidden {HIDDEN}, MLP {INTERMEDIATE}, "
        f"{HEADS} heads x {HEAD_DIM} ({KV_HEADS} KV heads), fp32, sdpa; toy vocabulary",
        f"batch: one group, P={cli.prompt}, R={cli.completion}, G={cli.group}; log-prob forward (with entropies) + "
        "backward through each trainer's _get_per_token_logps_and_entropies",
        f"method: one fresh worker process per (round, side) with torch threads = OMP_NUM_THREADS = {cli.threads} "
        f"(the header's thread line is the parent's), {cli.rounds} rounds alternating the order; time = "
        "process CPU seconds of the measured step; peak = growth of ru_maxrss over its value after model, inputs "
        "and warm-up",
        f"max |log-prob difference| stock vs grouped: {diff:.2e}",
        "",
        f"{'side':<8} {'CPU s (best)':>12} {'CPU s (median)':>14} {'wall s (best)':>13} {'peak MB (median)':>16}",
    ]
    for side in ("stock", "grouped"):
        lines.append(
            f"{side:<8} {best(side, 'cpu_s'):>12.2f} {median(side, 'cpu_s'):>14.2f} {best(side, 'wall_s'):>13.2f} "
            f"{median(side, 'peak_mb'):>16.0f}"
        )
    speed = best("stock", "cpu_s") / best("grouped", "cpu_s")
    memory = harness.ratio_text(median("grouped", "peak_mb"), median("stock", "peak_mb"))
    verdict = "not measured" if memory == "n/a" else "met" if float(memory) <= 1 else "MISSED"
    lines += [
        "",
        f"speed (stock / grouped CPU time, best): {speed:.2f}x   target >= 1.00x: {'met' if speed >= 1 else 'MISSED'}",
        f"memory (grouped / stock peak, median): {memory}   target <= 1.00: {verdict}",
    ]
    print("\n".join(lines))
    print(f"saved to {write_results(cli.output, chr(10).join(lines), argv=[__file__, *argv])}")


if __name__ == "__main__":
    main()
