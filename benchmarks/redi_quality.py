"""REDI quality on the toy reasoning task, the paper's way: a teacher's own traces, one SFT checkpoint, paired seeds.

The question (Xu et al., 2025): from the same SFT checkpoint, does REDI on (correct, incorrect)
teacher pairs raise accuracy more than SFT alone, and more than DPO? Per seed:

1. traces: ``--negatives teacher`` samples 4 traces per prompt from the toy teacher
   (``peft_trl_testbed.toy_teacher_path``: the pretrained toy model fine-tuned briefly, right on about
   two sampled traces in three) at temperature 0.8 over ``--prompts`` toy prompts, labels each with
   ``check_reasoning_answer`` and builds pairs with ``traces_to_pairs`` (first correct + first
   incorrect trace per prompt). ``--negatives slipped`` uses ``make_reasoning_traces``' synthetic
   traces instead (wrong = a correct trace with one slipped step);
2. the student (the plain pretrained toy model, weaker than the teacher) is fine-tuned once on the
   correct traces (SFT, ``--sft-steps`` at ``--sft-lr``);
3. from that one SFT checkpoint, each second stage runs ``--steps`` steps at ``--lr`` (SFT lr / 50,
   the paper's ratio of 5e-5 to 1e-6) on the same pairs: REDI at each ``--redi-alphas`` and DPO
   (beta 0.1, reference = the SFT checkpoint).

Accuracy is greedy exact-answer accuracy on ``--eval-prompts`` held-out prompts. The table gives per
variant the mean, standard deviation and 95% confidence interval (t distribution) over seeds, and
the paired per-seed differences REDI - SFT and REDI - DPO.

    python benchmarks/redi_quality.py --negatives teacher --threads 1
    python benchmarks/redi_quality.py --negatives slipped --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import RESULTS, add_common_flags, apply_common_flags, recording  # noqa: E402

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom (standard tables), so the
# benchmark needs no scipy.
T975 = tuple(
    float(t)
    for t in "12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145 2.131 "
    "2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 2.045 2.042".split()
)


def mean_ci(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and the two ends of the 95% t-distribution confidence interval."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0, float("nan"), float("nan")
    std = statistics.stdev(values)
    df = len(values) - 1
    t = T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df  # beyond 30 df the normal value plus a small term
    half = t * std / len(values) ** 0.5
    return mean, std, mean - half, mean + half


def _quiet(trainer):
    """Drop the per-log print of ``disable_tqdm`` runs; the table is what matters."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _traces(seed: int, a: argparse.Namespace):
    """(traces, pairs, report) for one seed, from the teacher or the slipped-step generator."""
    from peft_trl_testbed import check_reasoning_answer, make_reasoning_traces, toy_teacher_path
    from trl_ext.redi import generate_traces, traces_to_pairs

    if a.negatives == "slipped":
        traces = make_reasoning_traces(a.prompts, seed=seed)
        pairs, report = traces_to_pairs(traces)
    else:
        prompts = make_reasoning_traces(a.prompts, seed=seed, traces_per_prompt=1).select_columns(["prompt", "answer"])
        traces, trace_report = generate_traces(
            toy_teacher_path(),
            prompts,
            check_reasoning_answer,
            num_traces_per_prompt=4,
            temperature=a.temperature,
            max_new_tokens=48,
            seed=seed,
            progress=False,
        )
        pairs, report = traces_to_pairs(traces, trace_report)
    return traces, pairs, report


def _sft(model_path: str, train, seed: int, a: argparse.Namespace) -> str:
    """Stage 1, the recipe's own: SFT on the correct traces, saved so every second stage loads it afresh."""
    from peft_trl_testbed import toy_args
    from recipes.redi_two_stage import REDIScriptArguments, sft_stage
    from trl_ext.redi import REDIConfig

    stage_args = toy_args(REDIConfig, f"{a.workdir}/{a.negatives}/{seed}", seed=seed, disable_tqdm=True)
    script_args = REDIScriptArguments(sft_learning_rate=a.sft_lr, sft_max_steps=a.sft_steps, sft_batch_size=32)
    return sft_stage(model_path, train, stage_args, script_args)


def run_seed(seed: int, a: argparse.Namespace, variants: list[tuple[str, float | None]]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from peft_trl_testbed import (
        generation_accuracy,
        make_reasoning_traces,
        pretrained_toy_model_path,
        reasoning_reward,
        toy_args,
    )
    from trl_ext.redi import REDIConfig, REDITrainer, positives

    start = time.perf_counter()
    traces, pairs, report = _traces(seed, a)
    held_out = make_reasoning_traces(a.eval_prompts, seed=10_000 + seed, traces_per_prompt=1)
    sft_path = _sft(pretrained_toy_model_path(), positives(traces).select_columns(["prompt", "completion"]), seed, a)
    tok = AutoTokenizer.from_pretrained(sft_path)

    def accuracy(model) -> float:
        return generation_accuracy(model, tok, held_out, reasoning_reward, 48)

    acc = {"SFT only": accuracy(AutoModelForCausalLM.from_pretrained(sft_path))}
    common = dict(
        seed=seed,
        learning_rate=a.lr,
        max_steps=a.steps,
        per_device_train_batch_size=16,
        disable_tqdm=True,
        logging_steps=a.steps,
    )
    for name, alpha in variants[1:]:
        out = f"{a.workdir}/{a.negatives}/{seed}/{name}"
        if alpha is None:  # DPO; its reference model is the SFT checkpoint
            trainer = DPOTrainer(
                model=sft_path, args=toy_args(DPOConfig, out, beta=0.1, **common), train_dataset=pairs
            )
        else:
            args = toy_args(REDIConfig, out, redi_alpha=alpha, **common)
            trainer = REDITrainer(model=sft_path, args=args, train_dataset=pairs)
        _quiet(trainer).train()
        acc[name] = accuracy(trainer.model)
    print(f"seed {seed} ({time.perf_counter() - start:.0f} s): {report.to_dict()}", flush=True)
    print("  " + ", ".join(f"{k}: {v:.3f}" for k, v in acc.items()), flush=True)
    return acc


def table(runs: list[dict[str, float]], variants: list[str], a: argparse.Namespace) -> list[str]:
    n = len(runs)
    lines = [
        f"held-out greedy accuracy ({a.eval_prompts} prompts), {n} seeds {a.seed}, 95% CI from the t distribution",
        f"{'variant':<26}{'mean':>7}{'std':>7}{'95% CI':>17}  per seed",
    ]
    for v in variants:
        vals = [r[v] for r in runs]
        mean, std, lo, hi = mean_ci(vals)
        lines.append(
            f"{v:<26}{mean:>7.3f}{std:>7.3f}  [{lo:>6.3f}, {hi:>6.3f}]  " + " ".join(f"{x:.3f}" for x in vals)
        )
    lines += ["", f"paired differences per seed (same SFT checkpoint, same pairs), {n} seeds", lines[1]]
    redi = [v for v in variants if v.startswith("SFT + REDI")]
    for r in redi:
        for base in ("SFT only", "SFT + DPO (beta 0.1)"):
            diffs = [run[r] - run[base] for run in runs]
            mean, std, lo, hi = mean_ci(diffs)
            label = f"{r.removeprefix('SFT + ')} - {'SFT' if base == 'SFT only' else 'DPO'}"
            lines.append(
                f"{label:<26}{mean:>+7.3f}{std:>7.3f}  [{lo:>+6.3f}, {hi:>+6.3f}]  "
                + " ".join(f"{x:+.3f}" for x in diffs)
            )
    return lines


def verdict(runs: list[dict[str, float]], name: str, base: str) -> str:
    _, _, lo, hi = mean_ci([r[name] - r[base] for r in runs])
    if lo > 0:
        return f"{name} beats {base}: the 95% CI of the paired difference is above 0."
    if hi < 0:
        return f"{name} is WORSE than {base}: the 95% CI of the paired difference is below 0."
    return f"{name} does not beat {base} detectably: the 95% CI of the paired difference includes 0."


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--negatives",
        choices=("teacher", "slipped"),
        default="teacher",
        help="teacher: the toy teacher's own wrong traces; slipped: synthetic one-slipped-step traces",
    )
    p.add_argument("--prompts", type=int, default=2048, help="training prompts (4 traces each)")
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="teacher sampling temperature")
    p.add_argument("--sft-steps", type=int, default=800)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=100, help="second-stage steps, the same for every variant")
    p.add_argument("--lr", type=float, default=6e-5, help="second-stage learning rate for REDI and DPO (SFT lr / 50)")
    p.add_argument("--redi-alphas", type=float, nargs="+", default=[0.8, 1.0])
    p.add_argument("--workdir", default="/tmp/redi_quality")
    add_common_flags(p, RESULTS / "redi_quality_<negatives>.txt", seed=[0, 1, 2, 3, 4])
    a = apply_common_flags(p.parse_args())
    a.output = Path(str(a.output).replace("<negatives>", a.negatives))

    import datasets
    from transformers import logging

    from peft_trl_testbed import teacher_metrics, toy_teacher_path

    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    variants = [("SFT only", None)] + [
        (f"SFT + REDI (alpha {x:.1f})" if round(x, 1) == x else f"SFT + REDI (alpha {x:g})", x) for x in a.redi_alphas
    ]
    variants.append(("SFT + DPO (beta 0.1)", None))
    names = [v for v, _ in variants]
    with recording(a.output):
        start = time.perf_counter()
        if a.negatives == "teacher":
            m = teacher_metrics(toy_teacher_path())
            print(
                f"teacher {toy_teacher_path()}: held-out greedy {m['heldout_accuracy_greedy']:.3f}, "
                f"sampled at T={m['temperature']} {m['heldout_accuracy_sampled']:.3f} (its own 200 prompts); "
                f"built in {m['train_seconds']} s"
            )
        runs = [run_seed(s, a, variants) for s in a.seed]
        negatives = (
            f"the toy teacher's own sampled traces (4 per prompt, T={a.temperature:g})"
            if a.negatives == "teacher"
            else "synthetic traces, wrong = one slipped step (make_reasoning_traces)"
        )
        print(
            f"\nToy reasoning task (sum of 3-4 numbers step by step); negatives: {negatives}; {a.prompts} prompts; "
            f"student: pretrained toy model; SFT {a.sft_steps} steps @ {a.sft_lr:g} (batch 32) on the correct "
            f"traces; stage 2: {a.steps} steps @ {a.lr:g} (batch 16) for every variant, from the same SFT checkpoint"
        )
        print("\n".join(table(runs, names, a)))
        print()
        for name in names[1:-1]:
            print(verdict(runs, name, "SFT only"))
            print(verdict(runs, name, "SFT + DPO (beta 0.1)"))
        print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
