"""The main job on the embedded default: ``python -m recipes.quickstart [--output-dir DIR]``.

Runs all five methods on the offline toy testbed (a tiny Llama pretrained on addition,
cached on disk) through their recipes, prints one results table and writes PNG plots:
training curves, the Q-Tuning EU plane and the subnetwork's update sparsity by layer.
About 3-5 minutes on 2 CPU cores, the first run included (it pretrains the toy model).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _mora(out: Path) -> tuple[list, dict]:
    from trl import ScriptArguments, SFTConfig

    from recipes.mora_sft import MoraArguments, main
    from trl_ext.toy import toy_args

    args = toy_args(SFTConfig, out / "mora", max_steps=150, per_device_train_batch_size=32, learning_rate=3e-3,
                    lr_scheduler_type="cosine", logging_steps=10)  # fmt: skip
    r = main(ScriptArguments(), MoraArguments(mora_r=8, mora_type="rotation"), args)
    row = ["MoRA (rotation, r=8)", f"SFT, {r['trainable_params']:,} params", "held-out acc",
           f"{r['accuracy_before']:.1%}", f"{r['accuracy_after']:.1%}",
           f"update rank {r['update_rank']} vs LoRA {r['lora_rank_same_params']} at equal params"]  # fmt: skip
    return row, r


def _subnet(out: Path) -> tuple[list, dict]:
    from trl import GRPOConfig

    from recipes.subnet_grpo import SubnetRecipeArguments, main
    from trl_ext.toy import toy_args

    args = toy_args(GRPOConfig, out / "subnet", max_steps=30, per_device_train_batch_size=32, num_generations=8,
                    max_completion_length=6, learning_rate=1e-5, beta=0.0, logging_steps=5)  # fmt: skip
    r = main(SubnetRecipeArguments(plot=str(out / "subnet_sparsity.png")), args)
    row = ["RL subnetwork", f"GRPO on {r['density']:.1%} of weights", "train reward",
           f"full {r['full_reward']:.3f}", f"subnet {r['subnet_reward']:.3f}",
           f"{r['identical']:.1%} weights identical to full run; adapter {r['adapter_ratio']:.2f}x dense bytes"]  # fmt: skip
    return row, r


def _prefix_grouper(out: Path) -> tuple[list, dict]:
    from trl import ScriptArguments

    from recipes.prefix_grouper_grpo import GRPORecipeArguments, main
    from trl_ext import PrefixGrouperGRPOConfig
    from trl_ext.prefix_grouper.timing import logprob_speedup
    from trl_ext.toy import toy_args

    args = toy_args(PrefixGrouperGRPOConfig, out / "prefix_grouper", max_steps=60, per_device_train_batch_size=32,
                    num_generations=8, max_completion_length=6, learning_rate=1e-4, beta=0.0,
                    logging_steps=10)  # fmt: skip
    r = main(ScriptArguments(), GRPORecipeArguments(), args)
    speed = logprob_speedup(prompt_len=512, completion_len=32, group=8)
    r["speedup"] = speed
    row = ["Prefix Grouper GRPO", "full model, G=8", "sampled reward", f"{r['reward_first']:.3f}",
           f"{r['reward_last']:.3f}",
           f"log-prob fwd+bwd {speed['speedup']:.2f}x faster (ideal {speed['ideal']:.2f}x) at P=512 R=32 G=8"]  # fmt: skip
    return row, r


def _redi(out: Path) -> tuple[list, dict]:
    from trl import DPOConfig, DPOTrainer

    from recipes.redi_two_stage import REDIRecipeArguments, main
    from trl_ext import REDIConfig
    from trl_ext.redi import build_redi_pairs
    from trl_ext.redi.timing import step_time_ratio_vs_dpo
    from trl_ext.toy import generation_accuracy, make_reasoning_traces, reasoning_reward, toy_args

    stage2 = dict(max_steps=100, per_device_train_batch_size=16, learning_rate=6e-5, logging_steps=10)
    args = toy_args(REDIConfig, out / "redi", **stage2)
    recipe = REDIRecipeArguments(num_toy_prompts=2048, sft_max_steps=800, num_eval_prompts=200)
    r = main(recipe, args)
    # DPO from the same SFT checkpoint, pairs and settings, for comparison.
    sft_path = str(out / "redi" / "sft")
    pairs, _ = build_redi_pairs(make_reasoning_traces(2048, seed=0))
    dpo = DPOTrainer(model=sft_path, args=toy_args(DPOConfig, out / "dpo", **stage2), train_dataset=pairs)
    dpo.train()
    held_out = make_reasoning_traces(200, seed=10_000, traces_per_prompt=1)
    r["accuracy_dpo"] = generation_accuracy(dpo.model, dpo.processing_class, held_out, reasoning_reward, 48)
    ratio = r["step_time_vs_dpo"] = step_time_ratio_vs_dpo(sft_path, steps=4)
    row = ["REDI (alpha 0.8)", f"SFT then REDI on {r['pairs']} pairs", "held-out acc",
           f"{r['accuracy_after_sft']:.1%} (SFT)", f"{r['accuracy_after_redi']:.1%} (DPO {r['accuracy_dpo']:.1%})",
           f"step time {ratio:.2f}x DPO's (no reference model)"]  # fmt: skip
    return row, r


def _qtuning(out: Path) -> tuple[list, dict]:
    from trl import ScriptArguments, SFTConfig, SFTTrainer

    from recipes.qtuning_sft import ModelArguments, main
    from trl_ext import QTuningConfig
    from trl_ext.qtuning.timing import epoch_time
    from trl_ext.toy import (
        arithmetic_accuracy,
        make_arithmetic_dataset,
        make_mixed_quality_sft,
        make_reasoning_traces,
        pretrained_toy_model_path,
        toy_args,
        toy_model_path,
    )

    args = toy_args(QTuningConfig, out / "qtuning", num_train_epochs=1, per_device_train_batch_size=32,
                    learning_rate=3e-4, sample_keep_ratio=0.25, token_keep_ratio=0.5, logging_steps=4)  # fmt: skip
    r = main(ScriptArguments(), ModelArguments(), args)
    # The same epoch on all the data with the stock trainer, for comparison.
    stock_args = toy_args(SFTConfig, out / "sft_full", num_train_epochs=1, per_device_train_batch_size=32,
                          learning_rate=3e-4, logging_steps=4)  # fmt: skip
    model_path = pretrained_toy_model_path()
    full = SFTTrainer(model=model_path, args=stock_args, train_dataset=make_mixed_quality_sft(1024, seed=0))
    full.train()
    held_out = make_arithmetic_dataset(200, seed=1, exclude=make_arithmetic_dataset(800, seed=0))
    r["accuracy_full_sft"] = arithmetic_accuracy(full.model, full.processing_class, held_out)
    # Compute saved, measured where compute dominates overheads: one epoch on a 256-wide, 4-layer toy Llama.
    path = toy_model_path(arch="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8)
    data = make_reasoning_traces(64, seed=0).select_columns(["prompt", "completion"])
    stock, _ = epoch_time(path, data)
    separate, _ = epoch_time(path, data, scoring="separate", sample_keep_ratio=0.25, token_keep_ratio=0.5)
    r["time_ratio"] = separate / stock
    row = ["Q-Tuning (25% x 50%)", "SFT on mixed-quality data", "held-out acc", f"{r['accuracy_before']:.1%}",
           f"{r['accuracy_after']:.1%} (full-data SFT {r['accuracy_full_sft']:.1%})",
           f"epoch time {r['time_ratio']:.2f}x stock SFT (256-wide model)"]  # fmt: skip
    return row, r


def _plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if results[n].get("log_history")]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        logs = [h for h in results[name]["log_history"] if "loss" in h]
        key = "reward" if any("reward" in h for h in logs) else "loss"
        ax.plot([h["step"] for h in logs], [h[key] for h in logs], marker="o", markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/quickstart", help="where results and plots are written")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    from trl_ext.toy import pretrain_metrics, pretrained_toy_model_path

    start = time.perf_counter()
    print("[quickstart] toy testbed: tiny Llama pretrained on a+b (cached after the first run)")
    metrics = pretrain_metrics(pretrained_toy_model_path())
    rows = [["toy testbed", "Llama 64d x 2L from scratch", "held-out acc", "0%",
             f"{metrics['heldout_accuracy']:.1%}", f"pretrained in {metrics['train_seconds']:.0f} s"]]  # fmt: skip
    results = {}
    steps = (("MoRA", _mora), ("Subnetwork", _subnet), ("Prefix Grouper", _prefix_grouper), ("REDI", _redi),
             ("Q-Tuning", _qtuning))  # fmt: skip
    for name, run in steps:
        print(f"\n[quickstart] {name}")
        t0 = time.perf_counter()
        row, results[name] = run(out)
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)

    _plot_curves(results, out / "training_curves.png")
    header = ["method", "what it trained", "metric", "before", "after", "what it buys"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s; plots: {out / 'training_curves.png'}, {out / 'qtuning' / 'eu_plane.png'}, "
          f"{out / 'subnet_sparsity.png'}")  # fmt: skip
    summary = {n: {k: v for k, v in r.items() if k != "log_history"} for n, r in results.items()}
    (out / "results.json").write_text(json.dumps({"rows": rows, "results": summary, "seconds": total}, indent=2,
                                                 default=str))  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
