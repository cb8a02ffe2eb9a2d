"""The main job on the embedded default: ``python -m recipes.quickstart [--output_dir DIR]`` (repository root).

Runs all five methods on the offline toy testbed (a tiny Llama pretrained on addition,
cached on disk) through their recipes' command lines, each beside its baseline, and prints one results
table in which every figure is measured in this run, then what those figures show. Writes
``training_curves.png`` (each method against its baseline on the same axes), the Q-Tuning EU
plane, the subnetwork's update sparsity by layer and ``results.json``. It prints its own
duration; the README gives the one measured on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CURVE_POINTS = 5  # held-out evaluations per training run in the curves figure


def _callback_cls():
    from transformers import TrainerCallback

    class HeldOutCurve(TrainerCallback):
        """Held-out accuracy of the model being trained, at step 0 and every ``every`` steps."""

        def __init__(self, evaluate, every: int):
            self.evaluate, self.every, self.points = evaluate, max(1, every), []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.points.append((0, self.evaluate(model)))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0 or state.global_step == state.max_steps:
                self.points.append((state.global_step, self.evaluate(model)))

    return HeldOutCurve


def _argv(output_dir: Path, **flags) -> list[str]:
    """A recipe's command line: the toy testbed's CPU defaults (``TOY_DEFAULTS``) plus ``flags``."""
    from peft_trl_testbed import TOY_DEFAULTS

    argv = ["--output_dir", str(output_dir)]
    for name, value in {**TOY_DEFAULTS, **flags}.items():
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def _run(recipe, argv: list[str], callbacks=None) -> dict:
    """``recipe.main`` on the arguments its own parser makes of ``argv``."""
    return recipe.main(*recipe.make_parser().parse_args_and_config(args=argv), callbacks=callbacks)


def _toy(out: Path) -> tuple[list, dict]:
    from peft_trl_testbed import pretrain_metrics, pretrained_toy_model_path

    print("[quickstart] toy testbed: tiny Llama pretrained on a+b (cached after the first run)")
    path = pretrained_toy_model_path()
    m = pretrain_metrics(path)
    spec = m["config"]["model"]
    row = [
        "toy testbed",
        f"Llama {spec['hidden_size']}d x {spec['num_hidden_layers']}L from scratch",
        "held-out acc",
        f"{m['heldout_accuracy_before']:.1%} (untrained)",
        f"{m['heldout_accuracy']:.1%}",
        f"pretrained in {m['train_seconds']:.0f} s ({m['config']['steps']} steps, {m['threads']} thread(s))",
    ]
    return row, {"path": path, **m}


def _mora(out: Path) -> tuple[list, dict]:
    from recipes import mora_sft

    r = _run(
        mora_sft,
        _argv(
            out / "mora",
            mora_r=8,
            mora_type="rotation",
            max_steps=150,
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            logging_steps=10,
        ),
    )
    row = [
        "MoRA (rotation, r=8)",
        f"SFT, {r['trainable_params']:,} params",
        "held-out acc",
        f"{r['accuracy_before']:.1%}",
        f"{r['accuracy_after']:.1%}",
        f"update rank {r['update_rank']}; LoRA r={r['lora_rank_same_params']} at equal params has rank <= "
        f"{r['lora_rank_same_params']}",
    ]
    r["curves"] = {"MoRA SFT": _logged(r["log_history"], "loss")}
    return row, r


def _subnet(out: Path) -> tuple[list, dict]:
    from recipes import subnet_grpo

    r = _run(
        subnet_grpo,
        _argv(
            out / "subnet",
            plot=out / "subnet_sparsity.png",
            num_eval_prompts=0,
            max_steps=30,
            per_device_train_batch_size=32,
            num_generations=8,
            max_completion_length=6,
            learning_rate=1e-5,
            beta=0.0,
            logging_steps=5,
        ),
    )
    row = [
        "RL subnetwork",
        f"GRPO on {r['density']:.1%} of weights",
        "train reward (last 10 steps)",
        f"full {r['full_reward']:.3f}",
        f"subnet {r['subnet_reward']:.3f}",
        f"{r['identical']:.1%} weights identical to full run; adapter {r['adapter_ratio']:.2f}x dense bytes",
    ]
    r["curves"] = {
        "full GRPO": _logged(r["full_log_history"], "reward"),
        "subnetwork only": _logged(r["log_history"], "reward"),
    }
    return row, r


def _prefix_grouper(out: Path) -> tuple[list, dict]:
    from trl import GRPOConfig, GRPOTrainer

    from peft_trl_testbed import arithmetic_reward, make_arithmetic_dataset, pretrained_toy_model_path, toy_args
    from recipes import prefix_grouper_grpo
    from recipes.common import held_out_arithmetic
    from recipes.timing import logprob_speedup

    common = dict(
        max_steps=40,
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=6,
        learning_rate=1e-4,
        beta=0.0,
        logging_steps=5,
    )
    r = _run(prefix_grouper_grpo, _argv(out / "prefix_grouper", **common))
    # The stock trainer on the same model, data and settings.
    train = make_arithmetic_dataset(1000, seed=3, exclude=held_out_arithmetic())
    stock = GRPOTrainer(
        model=pretrained_toy_model_path(),
        reward_funcs=arithmetic_reward,
        train_dataset=train,
        args=toy_args(GRPOConfig, out / "grpo_stock", **common),
    )
    stock.train()
    stock_rewards = _logged(stock.state.log_history, "reward")
    speed = logprob_speedup(prompt_len=512, completion_len=32, group=8)
    r.update(speedup=speed, stock_reward_first=stock_rewards[1][0], stock_reward_last=stock_rewards[1][-1])
    row = [
        "Prefix Grouper GRPO",
        "full model, G=8",
        "sampled reward (first -> last log)",
        f"stock {r['stock_reward_first']:.3f} -> {r['stock_reward_last']:.3f}",
        f"grouped {r['reward_first']:.3f} -> {r['reward_last']:.3f}",
        f"log-prob fwd+bwd {speed['speedup']:.2f}x faster (ideal {speed['ideal']:.2f}x) at P=512 R=32 G=8",
    ]
    r["curves"] = {"stock GRPOTrainer": stock_rewards, "PrefixGrouperGRPOTrainer": _logged(r["log_history"], "reward")}
    return row, r


def _redi(out: Path) -> tuple[list, dict]:
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from peft_trl_testbed import pretrained_toy_model_path, toy_args
    from recipes import redi_two_stage
    from recipes.common import ToyEval
    from recipes.timing import step_time_ratio_vs_dpo

    stage2 = dict(max_steps=100, per_device_train_batch_size=16, learning_rate=6e-5, logging_steps=10)
    held_out = ToyEval("reasoning", num_prompts=200)
    tokenizer = AutoTokenizer.from_pretrained(pretrained_toy_model_path())
    HeldOutCurve = _callback_cls()

    def curve():
        return HeldOutCurve(lambda m: held_out(m, tokenizer), stage2["max_steps"] // (CURVE_POINTS - 1))

    redi_curve, dpo_curve = curve(), curve()
    # The paper's pipeline on a small scale: the toy teacher (cached after its first run) answers 1024
    # toy problems 4 times at T=0.8; its traces are labelled, paired, and the student is trained on them.
    print("[quickstart] REDI: sampling traces from the toy teacher (trained once, then cached)")
    argv = _argv(
        out / "redi",
        teacher_model_name_or_path="toy",
        num_traces_per_prompt=4,
        num_toy_prompts=1024,
        teacher_max_new_tokens=48,
        sft_max_steps=800,
        num_eval_prompts=200,
        **stage2,
    )
    if (out / "redi").exists():  # the recipe never overwrites traces: a rerun replaces the quickstart's own run
        shutil.rmtree(out / "redi")
    r = _run(redi_two_stage, argv, callbacks=[redi_curve])
    # DPO from the same SFT checkpoint, pairs and settings, for comparison.
    sft_path = str(out / "redi" / "sft")
    pairs = load_from_disk(str(out / "redi" / "pairs"))
    dpo = DPOTrainer(
        model=sft_path, args=toy_args(DPOConfig, out / "dpo", **stage2), train_dataset=pairs, callbacks=[dpo_curve]
    )
    dpo.train()
    r["accuracy_dpo"] = dpo_curve.points[-1][1]
    ratio = r["step_time_vs_dpo"] = step_time_ratio_vs_dpo(sft_path, steps=4)
    traces = r["data"]["traces"]
    row = [
        "REDI (alpha 0.8)",
        f"teacher traces -> SFT -> REDI on {r['pairs']} pairs",
        "held-out acc",
        f"{r['accuracy_after_sft']:.1%} (SFT)",
        f"REDI {r['accuracy_after_redi']:.1%}, DPO {r['accuracy_dpo']:.1%}",
        f"step time {ratio:.2f}x DPO's (no reference model); teacher right on {traces['correct_fraction']:.0%} "
        "of traces",
    ]
    r["curves"] = {"DPO (beta 0.1)": _unzip(dpo_curve.points), "REDI (alpha 0.8)": _unzip(redi_curve.points)}
    return row, r


def _seed_conclusions(path: str = "benchmarks/results/redi_quality_teacher_10seeds.txt") -> list[str]:
    """The multi-seed conclusions of the REDI experiment, quoted from its results file when it is present."""
    file = Path(__file__).resolve().parent.parent / path
    if not file.exists():
        return []
    found = [
        line.strip()
        for line in file.read_text().splitlines()
        if line.startswith("SFT + REDI (alpha 0.8) ") and ":" in line
    ]
    return [f"Across seeds ({path}): {line}" for line in found]


def _qtuning(out: Path) -> tuple[list, dict]:
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from peft_trl_testbed import (
        make_mixed_quality_sft,
        make_reasoning_traces,
        pretrained_toy_model_path,
        toy_args,
        toy_model_path,
    )
    from recipes import qtuning_sft
    from recipes.common import ToyEval
    from recipes.timing import epoch_time

    held_out = ToyEval("arithmetic", num_prompts=200)
    tokenizer = AutoTokenizer.from_pretrained(pretrained_toy_model_path())
    HeldOutCurve = _callback_cls()
    steps_per_epoch = 1024 // 32

    def curve():
        return HeldOutCurve(lambda m: held_out(m, tokenizer), steps_per_epoch // (CURVE_POINTS - 1))

    q_curve, full_curve = curve(), curve()
    argv = _argv(
        out / "qtuning",
        num_train_epochs=1,
        per_device_train_batch_size=32,
        learning_rate=3e-4,
        sample_keep_ratio=0.25,
        token_keep_ratio=0.5,
        logging_steps=4,
    )
    r = _run(qtuning_sft, argv, callbacks=[q_curve])
    # The same epoch on all the data with the stock trainer, for comparison.
    stock_args = toy_args(
        SFTConfig,
        out / "sft_full",
        num_train_epochs=1,
        per_device_train_batch_size=32,
        learning_rate=3e-4,
        logging_steps=4,
    )
    full = SFTTrainer(
        model=pretrained_toy_model_path(),
        args=stock_args,
        train_dataset=make_mixed_quality_sft(1024, seed=0),
        callbacks=[full_curve],
    )
    full.train()
    r["accuracy_full_sft"] = full_curve.points[-1][1]
    # Compute saved, measured where compute dominates overheads: one epoch on a 256-wide, 4-layer toy Llama.
    path = toy_model_path(arch="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8)
    data = make_reasoning_traces(64, seed=0).select_columns(["prompt", "completion"])
    stock, _ = epoch_time(path, data)
    separate, _ = epoch_time(path, data, scoring="separate", sample_keep_ratio=0.25, token_keep_ratio=0.5)
    r["time_ratio"] = separate / stock
    row = [
        "Q-Tuning (25% x 50%)",
        "SFT on mixed-quality data",
        "held-out acc",
        f"{r['accuracy_before']:.1%}",
        f"Q-Tuning {r['accuracy_after']:.1%}, full-data SFT {r['accuracy_full_sft']:.1%}",
        f"epoch time {r['time_ratio']:.2f}x stock SFT (256-wide model)",
    ]
    r["curves"] = {"full-data SFT": _unzip(full_curve.points), "Q-Tuning (25% x 50%)": _unzip(q_curve.points)}
    return row, r


def _logged(log_history: list[dict], key: str) -> tuple[list, list]:
    logs = [h for h in log_history if key in h and "step" in h and "train_runtime" not in h]
    return [h["step"] for h in logs], [h[key] for h in logs]


def _unzip(points: list[tuple]) -> tuple[list, list]:
    return [p[0] for p in points], [p[1] for p in points]


# Per method: panel title, x label, y label.
PANELS = {
    "MoRA": ("MoRA SFT (rotation, r=8)", "optimizer step", "training loss (completion tokens)"),
    "Subnetwork": ("Subnetwork vs full GRPO", "GRPO step", "mean reward of sampled completions"),
    "Prefix Grouper": ("Prefix Grouper vs stock GRPO", "GRPO step", "mean reward of sampled completions"),
    "REDI": ("REDI vs DPO, from one SFT checkpoint", "second-stage step", "held-out accuracy (greedy, exact answer)"),
    "Q-Tuning": ("Q-Tuning vs full-data SFT", "optimizer step (1 epoch)", "held-out a+b accuracy (greedy)"),
}


def _plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PANELS if results.get(n, {}).get("curves")]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.remove()
    # The baseline comes first and is drawn solid; the method dashed on top, so identical curves stay visible.
    styles = [dict(linestyle="-", marker="o", linewidth=2.5, alpha=0.6), dict(linestyle="--", marker="x")]
    for ax, name in zip(axes.flat, names):
        title, xlabel, ylabel = PANELS[name]
        for style, (label, (x, y)) in zip(styles * 2, results[name]["curves"].items()):
            ax.plot(x, y, markersize=4, label=label, **style)
        if name == "REDI":
            ax.axhline(results[name]["accuracy_after_sft"], color="grey", linestyle=":", label="SFT checkpoint")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _compare(a: float, b: float, tol: float = 0.005) -> str:
    return "above" if a > b + tol else "below" if a < b - tol else "level with"


def findings(results: dict) -> list[str]:
    """Plain statements of what this run measured, each computed from its numbers."""
    lines = []
    if "toy" in results:
        t = results["toy"]
        lines.append(
            f"The toy model went from {t['heldout_accuracy_before']:.1%} to {t['heldout_accuracy']:.1%} "
            "held-out accuracy in pretraining."
        )
    if "MoRA" in results:
        r = results["MoRA"]
        lines.append(
            f"MoRA's merged update has rank {r['update_rank']} with {r['trainable_params']:,} trainable "
            f"values; held-out accuracy {r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%}."
        )
    if "Subnetwork" in results:
        r = results["Subnetwork"]
        lines.append(
            f"Retraining only the {r['density']:.1%} of weights full GRPO changed gave a mean reward "
            f"{_compare(r['subnet_reward'], r['full_reward'], 0.02)} the full run's "
            f"({r['subnet_reward']:.3f} vs {r['full_reward']:.3f}, last 10 steps)."
        )
    if "Prefix Grouper" in results:
        r = results["Prefix Grouper"]
        lines.append(
            f"Prefix Grouper's log-prob pass took {1 / r['speedup']['speedup']:.2f}x the stock CPU time; "
            f"final logged rewards: grouped {r['reward_last']:.3f}, stock {r['stock_reward_last']:.3f}."
        )
    if "REDI" in results:
        r = results["REDI"]
        lines.append(
            f"From the SFT checkpoint ({r['accuracy_after_sft']:.1%}), REDI ended "
            f"{_compare(r['accuracy_after_redi'], r['accuracy_after_sft'])} it ({r['accuracy_after_redi']:.1%}) "
            f"and DPO {_compare(r['accuracy_dpo'], r['accuracy_after_sft'])} it ({r['accuracy_dpo']:.1%}); "
            f"REDI ended {_compare(r['accuracy_after_redi'], r['accuracy_dpo'])} DPO, at "
            f"{r['step_time_vs_dpo']:.2f}x its step time. One run does not settle the order."
        )
    if "Q-Tuning" in results:
        r = results["Q-Tuning"]
        lines.append(
            f"Q-Tuning ended {_compare(r['accuracy_after'], r['accuracy_full_sft'])} full-data SFT "
            f"({r['accuracy_after']:.1%} vs {r['accuracy_full_sft']:.1%}) at {r['time_ratio']:.2f}x its "
            "epoch time."
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/quickstart", help="where results and plots are written")
    args = parser.parse_args(argv)
    from recipes.common import check_output_dir

    out = Path(check_output_dir(args.output_dir))

    import datasets
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    start = time.perf_counter()
    rows, results = [], {}
    steps = (
        ("toy", _toy),
        ("MoRA", _mora),
        ("Subnetwork", _subnet),
        ("Prefix Grouper", _prefix_grouper),
        ("REDI", _redi),
        ("Q-Tuning", _qtuning),
    )
    for name, run in steps:
        print(f"\n[quickstart] {name}")
        t0 = time.perf_counter()
        row, results[name] = run(out)
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)

    _plot_curves(results, out / "training_curves.png")
    header = ["method", "what it trained", "metric", "before / baseline", "after", "what it buys"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    table = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
        for row in [header, ["-" * w for w in widths], *rows]
    ]
    total = time.perf_counter() - start
    measured = findings(results)
    print("\n" + "\n".join(table))
    print("\nMeasured in this run:\n" + "\n".join(f"- {line}" for line in measured))
    quoted = _seed_conclusions() if "REDI" in results else []
    if quoted:
        print("\nFrom the benchmarks' results files:\n" + "\n".join(f"- {line}" for line in quoted))
    print(
        f"\ntotal {total:.0f} s with {torch.get_num_threads()} torch thread(s); plots: {out / 'training_curves.png'}, "
        f"{out / 'qtuning' / 'eu_plane.png'}, {out / 'subnet_sparsity.png'}"
    )
    drop = ("log_history", "full_log_history")
    summary = {n: {k: v for k, v in r.items() if k not in drop} for n, r in results.items()}
    (out / "results.json").write_text(
        json.dumps(
            {
                "table": table,
                "findings": measured,
                "quoted": quoted,
                "results": summary,
                "seconds": total,
                "threads": torch.get_num_threads(),
            },
            indent=2,
            default=str,
        )
    )
    return summary


if __name__ == "__main__":
    main()
