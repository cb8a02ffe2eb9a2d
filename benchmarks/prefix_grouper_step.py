"""A whole GRPO training step, generation included: PrefixGrouperGRPOTrainer vs the stock trl.GRPOTrainer.

Each step generates ``G`` completions for one long prompt (an arithmetic problem behind a ``--context``-character
preamble), scores them, computes the reference log-probs (``beta > 0``) and takes one optimizer step. Only the
log-prob computations differ between the two trainers; generation is identical, so the step speedup is diluted by
the share of time spent generating.

Times are process CPU time per step (one thread by default, see ``prefix_grouper_logps.py``), the fastest of the
timed steps after one warm-up step, with the wall time beside them.

Usage:
    python benchmarks/prefix_grouper_step.py --quick
    python benchmarks/prefix_grouper_step.py --context 1000 --generations 8 --completion-length 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from harness import RESULTS, add_common_flags, apply_common_flags, write_results
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from peft_trl_testbed import ToyModelSpec, arithmetic_reward, toy_args, toy_model_path
from peft_trl_testbed import make_arithmetic_dataset as arithmetic
from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer


class StepTimer(TrainerCallback):
    """Records CPU and wall time of every optimizer step (generation included)."""

    def __init__(self):
        self.cpu, self.wall = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.cpu.append(time.process_time() - self._cpu)
        self.wall.append(time.perf_counter() - self._wall)


def context_trainer(grouped: bool, spec: ToyModelSpec, cli, timer: StepTimer):
    """A stock or grouped GRPO trainer (beta 0.04, no dropout) on ``cli.rounds + 1`` arithmetic problems behind a
    ``cli.context``-character preamble, ``cli.generations`` completions of up to ``cli.completion_length`` tokens."""
    preamble = ("Context: " + "0123456789 " * cli.context)[: cli.context] + "\n"
    dataset = arithmetic(cli.rounds + 1, seed=cli.seed).map(lambda row: {"prompt": preamble + row["prompt"]})
    config_cls, trainer_cls = (
        (PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer) if grouped else (GRPOConfig, GRPOTrainer)
    )
    args = toy_args(
        config_cls,
        tempfile.mkdtemp(),
        max_steps=cli.rounds + 1,
        per_device_train_batch_size=cli.generations,
        num_generations=cli.generations,
        max_completion_length=cli.completion_length,
        beta=0.04,
        disable_dropout=True,
        disable_tqdm=True,
        logging_steps=1000,
        seed=cli.seed,
    )
    torch.manual_seed(cli.seed)
    return trainer_cls(
        model=toy_model_path(spec),  # a saved random model, so the reference model loads from the same path
        reward_funcs=arithmetic_reward,
        args=args,
        train_dataset=dataset,
        callbacks=[timer],
    )


def run(grouped: bool, cli) -> StepTimer:
    spec = ToyModelSpec(
        arch="llama",
        hidden_size=cli.hidden_size,
        num_hidden_layers=cli.layers,
        num_attention_heads=4,
        max_position_embeddings=4096,
    )
    timer = StepTimer()
    trainer = context_trainer(grouped, spec, cli, timer)
    trainer.train()
    return timer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timed steps, 32-token completions, its own file")
    parser.add_argument("--context", type=int, default=1000, help="characters (= tokens) of prompt preamble")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    add_common_flags(
        parser, RESULTS / "prefix_grouper_step.txt", rounds=3, rounds_help="timed steps (after a warm-up)"
    )
    cli = parser.parse_args()
    if cli.quick:
        cli.rounds, cli.completion_length = 2, 32
        if cli.output == parser.get_default("output"):
            cli.output = RESULTS / "prefix_grouper_step_quick.txt"
    apply_common_flags(cli)

    timers = {name: run(name == "grouped", cli) for name in ("stock", "grouped")}
    cpu = {name: min(t.cpu[1:]) for name, t in timers.items()}
    wall = {name: min(t.wall[1:]) for name, t in timers.items()}
    lines = [
        f"GRPO training step incl. generation, toy Llama d={cli.hidden_size} L={cli.layers}, prompt ~{cli.context + 40} "
        f"tokens, G={cli.generations} completions of <= {cli.completion_length} tokens, beta=0.04, "
        f"{cli.threads} CPU thread(s); fastest of {cli.rounds} steps after a warm-up",
        f"{'trainer':>8} | {'cpu s/step':>10} {'wall s/step':>11}",
        f"{'stock':>8} | {cpu['stock']:>10.2f} {wall['stock']:>11.2f}",
        f"{'grouped':>8} | {cpu['grouped']:>10.2f} {wall['grouped']:>11.2f}",
        f"{'speedup':>8} | {cpu['stock'] / cpu['grouped']:>9.2f}x {wall['stock'] / wall['grouped']:>10.2f}x",
    ]
    print("\n".join(lines))
    output = write_results(cli.output, "\n".join(lines))
    print(f"saved to {output}")


if __name__ == "__main__":
    main()
