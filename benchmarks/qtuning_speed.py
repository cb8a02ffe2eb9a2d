"""Epoch wall time of QTuningSFTTrainer (both scoring modes) against the stock SFTTrainer, side by side.

Every variant trains the same model (a random toy Llama, by default 256 wide x 4 layers) for one
epoch over the same data (step-by-step reasoning traces, ~60-90 tokens each) with the same batch
size. Rounds interleave the variants, so load from other processes on the machine hits them alike;
the table gives the median epoch time over the rounds (``train_runtime``: the training loop only,
not tokenisation or model loading) and the ratio to the stock trainer.

    python benchmarks/qtuning_speed.py --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from harness import RESULTS, add_common_flags, apply_common_flags, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = [
    ("SFTTrainer (stock)", None, None, None),
    ("Q-Tuning reuse", "reuse", 0.25, 0.5),
    ("Q-Tuning separate", "separate", 0.25, 0.5),
    ("Q-Tuning reuse", "reuse", 0.5, 0.7),
    ("Q-Tuning separate", "separate", 0.5, 0.7),
]


def run_epoch(variant, path, data, a) -> tuple[float, float]:
    from recipes.timing import epoch_time

    _, scoring, r_s, r_t = variant
    return epoch_time(
        path, data, scoring=scoring, sample_keep_ratio=r_s or 1.0, token_keep_ratio=r_t or 1.0, batch=a.batch
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--samples", type=int, default=256, help="training examples (one epoch)")
    add_common_flags(p, RESULTS / "qtuning_speed.txt", rounds=3, rounds_help="interleaved rounds of every variant")
    a = apply_common_flags(p.parse_args())

    import datasets
    import torch
    from transformers.utils import logging

    from peft_trl_testbed import make_reasoning_traces, toy_model_path

    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = toy_model_path(arch="llama", hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=8)
    data = make_reasoning_traces(a.samples // 4, seed=a.seed).select_columns(["prompt", "completion"])
    times = {i: [] for i in range(len(VARIANTS))}
    tokens = {}
    start = time.perf_counter()
    for r in range(a.rounds):
        for i, variant in enumerate(VARIANTS):
            seconds, tokens[i] = run_epoch(variant, path, data, a)
            times[i].append(seconds)
            print(
                f"round {r + 1}/{a.rounds} {variant[0]} {variant[2] or 1:.2f}x{variant[3] or 1:.2f}: {seconds:.2f}s",
                flush=True,
            )
    lines = [
        f"toy Llama {a.hidden} wide x {a.layers} layers, {a.samples} reasoning traces, batch {a.batch}, "
        f"1 epoch ({a.samples // a.batch} steps), CPU fp32, torch threads {torch.get_num_threads()}, "
        f"median of {a.rounds} interleaved rounds",
        f"{'trainer':<20}{'samples x tokens':>18}{'epoch (s)':>11}{'vs stock':>10}{'min..max (s)':>16}"
        f"{'fwd+bwd tokens':>16}",
    ]
    stock = statistics.median(times[0])
    for i, (name, _, r_s, r_t) in enumerate(VARIANTS):
        med = statistics.median(times[i])
        budget = "-" if r_s is None else f"{r_s:.0%} x {r_t:.0%}"
        lines.append(
            f"{name:<20}{budget:>18}{med:>11.2f}{med / stock:>9.2f}x{min(times[i]):>8.2f}..{max(times[i]):<6.2f}"
            f"{tokens[i]:>16}"
        )
    lines.append(f"goal: separate at 25% x 50% <= 0.60x stock; measured {statistics.median(times[2]) / stock:.2f}x")
    lines.append(f"total benchmark wall time {time.perf_counter() - start:.0f}s")
    text = "\n".join(lines)
    print(text)
    write_results(a.output, text)


if __name__ == "__main__":
    main()
