"""REDI quality on the toy reasoning task: held-out accuracy of SFT, SFT+REDI, SFT+symmetric REDI, SFT+DPO.

Per seed: SFT once on the correct traces, then each second stage starts from that same SFT
checkpoint with the same pairs, learning rate and steps. Accuracy is greedy exact-answer
accuracy on held-out prompts. Prints a table of means and per-seed values.

    python benchmarks/redi_quality.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import RESULTS, recording  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from recipes.redi_two_stage import REDIScriptArguments, sft_stage  # noqa: E402
from trl_ext.redi import REDIConfig, REDITrainer, build_redi_pairs, positives  # noqa: E402
from trl_ext.toy import (  # noqa: E402
    generation_accuracy,
    make_reasoning_traces,
    pretrained_toy_model_path,
    reasoning_reward,
    toy_args,
)

VARIANTS = ("SFT only", "SFT + REDI (alpha 0.8)", "SFT + REDI (alpha 1.0)", "SFT + DPO (beta 0.1)")


def _report_change(name, before, trainer) -> None:
    """Print how far the second stage moved the weights and its last logged log-likelihoods."""
    delta = max((a - b).abs().max().item() for a, b in zip(before.parameters(), trainer.model.parameters()))
    logs = [h for h in trainer.state.log_history if "loss" in h][-1]
    keys = [k for k in ("logps/chosen", "logps/rejected", "logps_norm/margin", "rewards/margins") if k in logs]
    print(f"  {name}: max |dW| {delta:.3g}; last log " + ", ".join(f"{k} {logs[k]:.3g}" for k in keys), flush=True)


def run_seed(seed: int, a: argparse.Namespace) -> dict[str, float]:
    traces = make_reasoning_traces(a.prompts, seed=seed)
    held_out = make_reasoning_traces(a.eval_prompts, seed=10_000 + seed, traces_per_prompt=1)
    pairs, report = build_redi_pairs(traces)
    recipe = REDIScriptArguments(sft_learning_rate=a.sft_lr, sft_max_steps=a.sft_steps, sft_batch_size=32)
    base_args = toy_args(REDIConfig, f"/tmp/redi_bench/{seed}", seed=seed, disable_tqdm=True, logging_steps=50)
    sft_path = sft_stage(pretrained_toy_model_path(), positives(traces).select_columns(["prompt", "completion"]),
                         base_args, recipe)  # fmt: skip
    # Every second stage loads the SFT checkpoint afresh (copies of a trained model share TRL's patched forward).
    sft_model, tok = AutoModelForCausalLM.from_pretrained(sft_path), AutoTokenizer.from_pretrained(sft_path)
    acc = {VARIANTS[0]: generation_accuracy(sft_model, tok, held_out, reasoning_reward, 48)}
    common = dict(seed=seed, learning_rate=a.lr, max_steps=a.steps, per_device_train_batch_size=16,
                  disable_tqdm=True, logging_steps=50)  # fmt: skip
    for name, alpha in ((VARIANTS[1], 0.8), (VARIANTS[2], 1.0)):
        args = toy_args(REDIConfig, f"/tmp/redi_bench/{seed}/redi{alpha}", redi_alpha=alpha, **common)
        trainer = REDITrainer(model=sft_path, args=args, train_dataset=pairs)
        trainer.train()
        acc[name] = generation_accuracy(trainer.model, tok, held_out, reasoning_reward, 48)
        _report_change(name, sft_model, trainer)
    args = toy_args(DPOConfig, f"/tmp/redi_bench/{seed}/dpo", beta=0.1, **common)
    trainer = DPOTrainer(model=sft_path, args=args, train_dataset=pairs)  # its reference: the SFT checkpoint
    trainer.train()
    acc[VARIANTS[3]] = generation_accuracy(trainer.model, tok, held_out, reasoning_reward, 48)
    _report_change(VARIANTS[3], sft_model, trainer)
    print(f"seed {seed}: {report}; " + ", ".join(f"{k}: {v:.3f}" for k, v in acc.items()), flush=True)
    return acc


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prompts", type=int, default=2048)
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=800)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=200, help="second-stage steps")
    p.add_argument(
        "--lr",
        type=float,
        default=6e-5,
        help="second-stage learning rate, same for REDI and DPO (SFT lr / 50, the paper's ratio)",
    )
    a = p.parse_args()
    start = time.perf_counter()
    runs = [run_seed(s, a) for s in a.seeds]
    print(f"\nToy reasoning task (sum of 3-4 numbers step by step), held-out greedy accuracy, "
          f"{len(a.seeds)} seeds, SFT {a.sft_steps} steps @ {a.sft_lr}, stage 2 {a.steps} steps @ {a.lr}")  # fmt: skip
    header = f"{'variant':<26}{'mean':>8}{'std':>8}  per seed"
    print(header + "\n" + "-" * len(header))
    for v in VARIANTS:
        vals = [r[v] for r in runs]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{v:<26}{statistics.mean(vals):>8.3f}{std:>8.3f}  " + " ".join(f"{x:.3f}" for x in vals))
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    with recording(RESULTS / "redi_quality.txt"):
        main()
