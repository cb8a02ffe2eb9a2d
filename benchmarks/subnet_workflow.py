"""The subnetwork paper's workflow on the toy arithmetic task, end to end, with a printed report.

1. full-parameter GRPO (TRL's GRPOTrainer) on the pretrained toy model, weights in bf16;
2. how many parameters it updated (|w' - w| > 1e-5, and the relative 1e-3 criterion);
3. the subnetwork = the entries it changed; retrain only those from the base with the same
   data, seeds and steps (SUBNET tuner);
4. compare reward and the fraction of identical weights with the full run;
5. contrast: SFT's update sparsity on the same model and budget, and mask overlaps.

Run: ``python benchmarks/subnet_workflow.py`` (a few minutes on CPU). The report is printed and
saved to ``benchmarks/results/subnet_workflow.txt`` (plot: ``subnet_workflow_sparsity.png``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from harness import RESULTS, ROOT, add_common_flags, apply_common_flags, write_results  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from peft_ext.subnet import (  # noqa: E402
    SubnetConfig,
    SubnetWarmupCallback,
    analysis,
    diff_checkpoints,
    ops,
    top_fraction_masks,
)
from peft_trl_testbed.data import arithmetic_reward, make_arithmetic_dataset  # noqa: E402
from peft_trl_testbed.pretrain import arithmetic_accuracy, pretrained_toy_model_path  # noqa: E402

LINES: list[str] = []


def log(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


def load(path: str, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def grpo_args(out: str, steps: int, seed: int, lr: float) -> GRPOConfig:
    return GRPOConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=4,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: the full and the subnet run see the same per-entry gradients
        beta=0.0,
        temperature=1.0,
        seed=seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )


def mean_reward(trainer, last: int) -> float:
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return sum(rewards[-last:]) / len(rewards[-last:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    add_common_flags(parser, RESULTS / "subnet_workflow.txt")
    args = apply_common_flags(parser.parse_args())
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()

    base_path = pretrained_toy_model_path(arch="llama", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train = make_arithmetic_dataset(320, seed=0)
    held_out = make_arithmetic_dataset(100, seed=1, exclude=train)
    dtype = getattr(torch, args.dtype)
    try:  # bf16 weights on CPU (the paper's setting); fall back to fp32 if this torch build cannot
        load(base_path, dtype)(input_ids=torch.tensor([[5, 6]])).logits.sum().backward()
    except (RuntimeError, TypeError) as err:
        log(f"{args.dtype} unavailable on this CPU ({err}); using fp32")
        dtype = torch.float32
    tol = 1e-5
    log("# Subnetwork workflow on the toy arithmetic task")
    log(
        f"model: pretrained toy llama ({base_path}), weights in {str(dtype).replace('torch.', '')}; "
        f"GRPO {args.steps} steps x 32 completions (4 prompts x 8), lr {args.lr}, AdamW, no clipping, seed {args.seed}"
    )
    base_acc = arithmetic_accuracy(load(base_path, dtype), tokenizer, held_out)
    log(f"held-out greedy accuracy of the base model: {base_acc:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        # diff against the base in the training dtype: the fp32 -> bf16 cast alone is not an update
        base = f"{tmp}/base"
        load(base_path, dtype).save_pretrained(base)
        # ---------------------------------------------------------------- 1. full GRPO
        model = load(base, dtype)
        warm_update, warm_grad = SubnetWarmupCallback("update"), SubnetWarmupCallback("grad")
        t = time.perf_counter()
        full = GRPOTrainer(
            model=model,
            reward_funcs=arithmetic_reward,
            args=grpo_args(f"{tmp}/full", args.steps, args.seed, args.lr),
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[warm_update, warm_grad],
        )
        full.remove_callback(PrinterCallback)
        full.train()
        full_time = time.perf_counter() - t
        model.save_pretrained(f"{tmp}/full_model")
        full_acc = arithmetic_accuracy(model, tokenizer, held_out)
        full_reward = mean_reward(full, 10)
        first_reward = mean_reward(full, args.steps)  # whole-run mean for reference

        # ---------------------------------------------------------------- 2. what it updated
        diff = diff_checkpoints(base, f"{tmp}/full_model", tol=tol, compute_rank=True, progress=False)
        rel = diff_checkpoints(base, f"{tmp}/full_model", tol=1e-3, relative=True, keep_masks=False, progress=False)
        log("")
        log("## 1. Full-parameter GRPO")
        log(
            f"train reward: mean {first_reward:.3f} over the run, {full_reward:.3f} over the last 10 steps; "
            f"held-out accuracy {base_acc:.2f} -> {full_acc:.2f}; {full_time:.0f}s"
        )
        log(
            f"parameters updated: {100 * diff.fraction_changed:.2f}% (|dw| > {tol:g}), "
            f"{100 * rel.fraction_changed:.2f}% (relative, |dw| > 1e-3 max(|w|,|w'|)); "
            f"update sparsity {100 * (1 - diff.fraction_changed):.2f}%"
        )
        log(analysis.sparsity_report(diff.tensors, title=f"GRPO update sparsity (tol {tol:g})"))
        png = args.output.with_name(args.output.stem + "_sparsity.png")
        plot = Path(analysis.plot_sparsity(diff.tensors, str(png), "GRPO updates")).resolve()
        log(f"plot: {plot.relative_to(ROOT) if plot.is_relative_to(ROOT) else plot}")

        # ---------------------------------------------------------------- 3. retrain the subnetwork
        # TRL's GRPO computes log-probs from lm_head.weight directly, so it refuses an adapter there.
        matrices = {n: m for n, m in diff.masks.items() if m.dim() == 2 and not n.startswith("lm_head")}
        others = [t for t in diff.tensors if t.name not in matrices]
        sub_model = get_peft_model(load(base, dtype), SubnetConfig(mask_source=matrices))
        trainable, total = sub_model.get_nb_trainable_parameters()
        t = time.perf_counter()
        sub = GRPOTrainer(
            model=sub_model,
            reward_funcs=arithmetic_reward,
            args=grpo_args(f"{tmp}/sub", args.steps, args.seed, args.lr),
            train_dataset=train,
            processing_class=tokenizer,
        )
        sub.remove_callback(PrinterCallback)
        sub.train()
        sub_time = time.perf_counter() - t
        sub_reward = mean_reward(sub, 10)
        merged = sub_model.merge_and_unload()
        sub_acc = arithmetic_accuracy(merged, tokenizer, held_out)
        log("")
        log("## 2. Retrain only the subnetwork (SUBNET tuner, same data, seeds, steps)")
        log(
            f"trainable values: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); the "
            f"{sum(t.numel for t in others):,} parameters of lm_head (TRL's GRPO refuses adapters there) and the "
            f"norms are not adapted ({sum(t.changed for t in others):,} of them moved in the full run)"
        )
        log(
            f"train reward over the last 10 steps: full {full_reward:.3f} vs subnet {sub_reward:.3f}; "
            f"held-out accuracy: full {full_acc:.2f} vs subnet {sub_acc:.2f}; time {full_time:.0f}s vs {sub_time:.0f}s"
        )
        full_params = dict(model.named_parameters())
        same = same_mask = n_mask = numel = 0
        close = 0
        for name, p in merged.named_parameters():
            a, b = p.detach(), full_params[name].detach()
            equal = a == b
            same += int(equal.sum())
            close += int(((a.float() - b.float()).abs() <= tol).sum())
            numel += a.numel()
            if name in matrices:
                m = matrices[name]
                same_mask += int(equal[m].sum())
                n_mask += int(m.sum())
        log(
            f"weights identical to the full run: {100 * same / numel:.2f}% bit-exact, {100 * close / numel:.2f}% within "
            f"{tol:g} (all parameters); on the subnetwork itself {100 * same_mask / max(1, n_mask):.2f}% bit-exact"
        )

        # ---------------------------------------------------------------- 4. SFT contrast and overlaps
        sft_model = load(base, dtype)
        sft = SFTTrainer(
            model=sft_model,
            args=SFTConfig(
                output_dir=f"{tmp}/sft",
                max_steps=args.steps,
                per_device_train_batch_size=32,
                learning_rate=args.lr,
                lr_scheduler_type="constant",
                max_grad_norm=0.0,
                seed=args.seed,
                report_to="none",
                save_strategy="no",
                use_cpu=True,
                disable_tqdm=True,
            ),
            train_dataset=train,
            processing_class=tokenizer,
        )
        sft.remove_callback(PrinterCallback)
        sft.train()
        sft_model.save_pretrained(f"{tmp}/sft_model")
        sft_diff = diff_checkpoints(base, f"{tmp}/sft_model", tol=tol, progress=False)
        log("")
        log("## 3. Contrast: SFT on the same model (same steps, batch, lr)")
        log(
            f"parameters updated: SFT {100 * sft_diff.fraction_changed:.2f}% vs GRPO {100 * diff.fraction_changed:.2f}% "
            f"(update sparsity {100 * (1 - sft_diff.fraction_changed):.2f}% vs {100 * (1 - diff.fraction_changed):.2f}%)"
        )
        budget = sum(int(m.sum()) for m in matrices.values()) / sum(m.numel() for m in matrices.values())
        grad_masks = warm_grad.masks(density=budget)
        base_weights = {n: -w.detach().float().abs() for n, w in load(base, dtype).named_parameters() if n in matrices}
        small_masks = top_fraction_masks(base_weights, budget)
        rows = [
            ["GRPO diff vs SFT diff", *_overlap(diff.masks, sft_diff.masks)],
            ["GRPO diff vs callback |dw| (tol)", *_overlap(diff.masks, warm_update.masks(tol=tol))],
            ["GRPO diff vs callback sum|g| (same budget)", *_overlap(matrices, grad_masks)],
            ["GRPO diff vs smallest |w0| (same budget)", *_overlap(matrices, small_masks)],
        ]
        log(analysis.format_table(["masks (I1 vs I2)", "o1 %", "o2 %", "jaccard %", "random o1 %"], rows))
    log("")
    log(f"total time {time.perf_counter() - start:.0f}s")
    write_results(args.output, "\n".join(LINES))


def _overlap(m1, m2):
    names = [n for n in m1 if n in m2]
    both = sum(int((m1[n] & m2[n]).sum()) for n in names)
    n1, n2 = sum(int(m1[n].sum()) for n in names), sum(int(m2[n].sum()) for n in names)
    numel = sum(m1[n].numel() for n in names)
    o = ops.mask_overlap(both, n1, n2)
    return [100 * o["o1"], 100 * o["o2"], 100 * o["jaccard"], 100 * n2 / numel]


if __name__ == "__main__":
    main()
