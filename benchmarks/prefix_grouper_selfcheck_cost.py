"""What the construction-time self-check of PrefixGrouperGRPOTrainer costs, as a fraction of one training step.

The self-check (``trl_ext.prefix_grouper.selfcheck``) scores a synthetic batch of 4 rows (prompts of 3 and 7
tokens, completions of up to 4) the stock way once and the grouped way twice (whole and in chunks), for the policy
and, with ``beta > 0``, the reference model. It runs once, when the trainer is built. A training step here is one
whole GRPO step of the grouped trainer: generation of G completions, reward, old and reference log-probs, loss,
backward and optimizer step, for one prompt (an arithmetic problem behind a ``--context``-token preamble).

Both are process CPU times at ``--threads`` threads: the step is the fastest of ``--rounds`` steps after a warm-up
step, the self-check the fastest of ``--rounds`` reruns on the trained trainer.

Usage:
    python benchmarks/prefix_grouper_selfcheck_cost.py
    python benchmarks/prefix_grouper_selfcheck_cost.py --rounds 5 --threads 2 --output /tmp/cost.txt
"""

from __future__ import annotations

import argparse
import time

from harness import RESULTS, add_common_flags, apply_common_flags, write_results
from prefix_grouper_step import StepTimer, context_trainer

from peft_trl_testbed import ToyModelSpec

MODELS = {
    "toy model (Llama d=64, 2 layers, 4 heads)": ToyModelSpec(arch="llama"),
    "1 layer, 16 heads x 64 (4 KV), d=1024": ToyModelSpec(
        arch="llama",
        hidden_size=1024,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=4096,
        max_position_embeddings=4096,
    ),
}


def measure(spec: ToyModelSpec, cli) -> tuple[float, float]:
    """(self-check CPU seconds, training-step CPU seconds) of the grouped trainer on ``spec``."""
    timer = StepTimer()
    trainer = context_trainer(True, spec, cli, timer)
    trainer.train()
    checks = []
    for _ in range(cli.rounds):
        trainer._prefix_grouper_unchecked = [trainer.model, trainer.ref_model]
        start = time.process_time()
        trainer._prefix_grouper_self_check()
        checks.append(time.process_time() - start)
    return min(checks), min(timer.cpu[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=256, help="characters (= tokens) of prompt preamble")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=32)
    add_common_flags(
        parser,
        RESULTS / "prefix_grouper_selfcheck_cost.txt",
        rounds=3,
        rounds_help="timed steps (after a warm-up) and self-check reruns",
    )
    cli = apply_common_flags(parser.parse_args())
    lines = [
        f"Self-check (policy + reference model, beta=0.04) vs one GRPO training step of the grouped trainer: prompt "
        f"~{cli.context + 40} tokens, G={cli.generations} completions of <= {cli.completion_length} tokens, fp32, "
        f"{cli.threads} CPU thread(s), process CPU time, fastest of {cli.rounds}",
        "",
        "| model | self-check s | training step s | self-check / step |",
        "|---|---|---|---|",
    ]
    for name, spec in MODELS.items():
        check, step = measure(spec, cli)
        lines.append(f"| {name} | {check:.3f} | {step:.2f} | {check / step:.3f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    print(f"saved to {write_results(cli.output, chr(10).join(lines))}")


if __name__ == "__main__":
    main()
