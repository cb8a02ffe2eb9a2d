"""Held-out arithmetic accuracy after SFT on mixed-quality data: Q-Tuning vs full data vs random pruning.

The pretrained toy Llama (~65% on held-out a+b) is fine-tuned on ``make_mixed_quality_sft`` (40% clean
additions, 20% wrong labels, 20% trivial ``a+0``, 20% three-digit multiplications) and scored by greedy
``arithmetic_accuracy`` on clean additions disjoint from the training prompts. Every variant sees the same
batches for the same number of epochs; the pruning variants train on part of each batch:

- full-data SFT: stock ``SFTTrainer``;
- Q-Tuning at ``r_sample x r_token``: ``QTuningSFTTrainer`` (``scoring="separate"``);
- random pruning at the same budget: the same trainer with the selection replaced by a uniform draw of
  ``round(r_sample * B)`` samples, then uniformly random tokens of those dropped down to the same token budget.

The table also breaks the kept samples down by their true quality (read back from the token ids).

    python benchmarks/qtuning_quality.py --seed 0 1 2 --threads 1

It also saves the EU plane of one Q-Tuning run's last epoch (``--plot``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter

from harness import RESULTS, add_common_flags, apply_common_flags, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUALITIES = ("clean", "noise", "easy", "hard")


def quality_of(text: str) -> str:
    """True quality of a rendered mixed-quality example ``"a+b=c"`` / ``"a*b=c"`` (as make_mixed_quality_sft builds)."""
    prompt, _, completion = text.partition("=")
    if "*" in prompt:
        return "hard"
    a, _, b = prompt.partition("+")
    if b == "0":
        return "easy"
    try:
        return "clean" if int(a) + int(b) == int(completion) else "noise"
    except ValueError:
        return "noise"


def make_trainers():
    import torch

    from trl_ext.qtuning import BatchSelection, QTuningSFTTrainer
    from trl_ext.qtuning.batch import sample_ids_from_batch
    from trl_ext.qtuning.scoring import QuadrantAssignment, round_half_up, token_keep_mask

    class QTuningTally(QTuningSFTTrainer):
        """Q-Tuning, counting the true quality of every kept sample (padded batches: one sample per row)."""

        def choose(self, inputs, selection):
            return selection

        def select(self, inputs, log_probs, entropy):
            selection = self.choose(inputs, super().select(inputs, log_probs, entropy))
            texts = self.processing_class.batch_decode(inputs["input_ids"], skip_special_tokens=True)
            for doc in selection.keep_docs.tolist():
                self.kept_quality[quality_of(texts[doc])] += 1
            return selection

    class RandomPruningTrainer(QTuningTally):
        """Same sample count and token budget as Q-Tuning, chosen uniformly at random."""

        def choose(self, inputs, selection):
            num = selection.sample_docs.numel()
            k = min(num, max(1, round_half_up(self.args.sample_keep_ratio * num)))
            keep = torch.zeros(num, dtype=torch.bool)
            keep[torch.randperm(num, generator=self.rng)[:k]] = True
            quadrant = torch.where(keep, 2, 0)  # every kept sample may lose tokens, none is special
            sample_ids, _ = sample_ids_from_batch(inputs)
            scores = torch.rand(sample_ids.shape, generator=self.rng, dtype=torch.float64)
            token_keep = token_keep_mask(
                scores, sample_ids, quadrant, keep, self.args.sample_keep_ratio, self.args.token_keep_ratio
            )
            assignment = QuadrantAssignment(quadrant, keep, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
            return BatchSelection(assignment, selection.ppl, selection.entropy, selection.sample_docs, token_keep)

    return QTuningTally, RandomPruningTrainer


def run(variant, seed, a):
    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from peft_trl_testbed import arithmetic_accuracy, make_arithmetic_dataset, make_mixed_quality_sft, toy_args
    from trl_ext import QTuningConfig

    name, r_s, r_t = variant
    path = a.model_path
    train = make_mixed_quality_sft(a.samples, seed=seed)
    held_out = make_arithmetic_dataset(a.eval_samples, seed=10_000 + seed, exclude=train)
    common = dict(
        num_train_epochs=a.epochs,
        per_device_train_batch_size=a.batch,
        learning_rate=a.lr,
        seed=seed,
        disable_tqdm=True,
        logging_steps=10_000,
        lr_scheduler_type="constant",
    )
    data = train.select_columns(["prompt", "completion"])
    if name == "full-data SFT":
        trainer = SFTTrainer(
            model=path, args=toy_args(SFTConfig, "/tmp/qtuning_quality", **common), train_dataset=data
        )
    else:
        qtuning_cls, random_cls = make_trainers()
        cls = qtuning_cls if name == "Q-Tuning" else random_cls
        plot = a.plot and name == "Q-Tuning" and seed == a.seed[0] and (r_s, r_t) == (0.25, 0.5)
        args = toy_args(
            QTuningConfig,
            "/tmp/qtuning_quality",
            sample_keep_ratio=r_s,
            token_keep_ratio=r_t,
            eu_record_steps=10_000 if plot else 0,
            **common,
        )
        trainer = cls(model=path, args=args, train_dataset=data)
        trainer.kept_quality = Counter()
        trainer.rng = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if getattr(trainer, "eu_records", None):
        last_epoch = [r.step for r in trainer.eu_records][-(len(trainer.eu_records) // a.epochs) :]
        title = f"EU plane of the last epoch, Q-Tuning 25% x 50%, seed {seed}"
        trainer.plot_eu_plane(a.plot, steps=last_epoch, title=title)
    tokenizer = AutoTokenizer.from_pretrained(path)
    accuracy = arithmetic_accuracy(trainer.model, tokenizer, held_out)
    kept = getattr(trainer, "kept_quality", None)
    return accuracy, seconds, kept


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--eval-samples", type=int, default=400)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    add_common_flags(p, RESULTS / "qtuning_quality.txt", seed=[0, 1, 2])
    p.add_argument(
        "--plot",
        default=str(RESULTS / "qtuning_eu_plane.png"),
        help="EU-plane PNG of the last epoch of the first seed's Q-Tuning 25%% x 50%% run ('' to skip)",
    )
    a = apply_common_flags(p.parse_args())

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from peft_trl_testbed import arithmetic_accuracy, make_arithmetic_dataset, make_mixed_quality_sft
    from peft_trl_testbed.pretrain import pretrained_toy_model_path

    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    a.model_path = pretrained_toy_model_path()
    variants = [("full-data SFT", None, None)]
    for r_s, r_t in ((0.25, 0.5), (0.5, 0.7)):
        variants += [("Q-Tuning", r_s, r_t), ("random pruning", r_s, r_t)]

    base = []
    model, tokenizer = AutoModelForCausalLM.from_pretrained(a.model_path), AutoTokenizer.from_pretrained(a.model_path)
    for seed in a.seed:
        held_out = make_arithmetic_dataset(
            a.eval_samples, seed=10_000 + seed, exclude=make_mixed_quality_sft(a.samples, seed=seed)
        )
        base.append(arithmetic_accuracy(model, tokenizer, held_out))

    results = {}
    start = time.perf_counter()
    for seed in a.seed:
        for variant in variants:
            acc, seconds, kept = run(variant, seed, a)
            results.setdefault(variant, []).append((acc, seconds, kept))
            print(
                f"seed {seed} {variant[0]} {variant[1]}x{variant[2]}: accuracy {acc:.3f} ({seconds:.1f}s)", flush=True
            )

    lines = [
        f"pretrained toy Llama, SFT on make_mixed_quality_sft({a.samples}) for {a.epochs} epochs, batch {a.batch}, "
        f"lr {a.lr} constant; held-out: {a.eval_samples} clean a+b problems disjoint from training; "
        f"seeds {a.seed}",
        f"before SFT: accuracy {statistics.mean(base):.3f} (per seed {', '.join(f'{x:.3f}' for x in base)})",
        f"{'method':<16}{'samples x tokens':>18}{'accuracy mean':>15}{'std':>7}{'per seed':>24}{'train (s)':>11}"
        f"   kept samples by quality (clean/noise/easy/hard)",
    ]
    for variant in variants:
        name, r_s, r_t = variant
        accs = [r[0] for r in results[variant]]
        secs = statistics.mean(r[1] for r in results[variant])
        budget = "100% x 100%" if r_s is None else f"{r_s:.0%} x {r_t:.0%}"
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        composition = "-"
        if results[variant][0][2] is not None:
            total = Counter()
            for r in results[variant]:
                total.update(r[2])
            n = sum(total.values())
            composition = " / ".join(f"{total[q] / n:.0%}" for q in QUALITIES)
        per_seed = ", ".join(f"{x:.3f}" for x in accs)
        lines.append(
            f"{name:<16}{budget:>18}{statistics.mean(accs):>15.3f}{std:>7.3f}{per_seed:>24}{secs:>11.1f}   {composition}"
        )
    lines.append("training data by quality: 40% / 20% / 20% / 20% (clean/noise/easy/hard), in expectation")
    lines.append(f"total benchmark wall time {time.perf_counter() - start:.0f}s")
    text = "\n".join(lines)
    print(text)
    write_results(a.output, text)


if __name__ == "__main__":
    main()
