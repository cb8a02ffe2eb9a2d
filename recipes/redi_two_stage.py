"""REDI, two stages: SFT on the teacher's correct traces, then REDI on (correct, incorrect) pairs.

Defaults to the embedded toy model and the toy step-by-step traces; any model path or Hub
id and any trace dataset with ``prompt``/``completion``/``answer`` columns (and optionally a
boolean ``correct`` column, else traces are labelled with the verifier) work too.

    python -m recipes.redi_two_stage --output_dir outputs/redi --max_steps 100
    python -m recipes.redi_two_stage --config recipes/configs/redi.yaml
    python -m recipes.redi_two_stage --model_name_or_path Qwen/Qwen2.5-Math-1.5B \\
        --dataset_name my/traces --sft_learning_rate 5e-5 --learning_rate 1e-6 --bf16 true
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer, TrlParser

from recipes.common import finish
from trl_ext.redi import REDIConfig, REDITrainer, build_redi_pairs, label_traces, math_verify_checker, positives
from trl_ext.toy import (
    check_reasoning_answer,
    generation_accuracy,
    make_reasoning_traces,
    pretrained_toy_model_path,
    reasoning_reward,
)


@dataclass
class REDIRecipeArguments:
    """Recipe arguments; the REDI stage's own arguments are those of :class:`~trl_ext.REDIConfig`."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model path or Hub id; default: the embedded pretrained toy model."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Trace dataset (path or Hub id); default: toy step-by-step traces."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name to use."})
    num_toy_prompts: int = field(default=512, metadata={"help": "Prompts in the default toy trace set."})
    verifier: str = field(
        default="math",
        metadata={
            "help": "Trace verifier when there is no `correct` column: 'math' (math-verify, boxed answers) or "
            "'toy' (the toy task's `Answer: N` checker)."
        },
    )
    max_trace_length: int | None = field(default=None, metadata={"help": "Drop traces longer than this (tokens)."})
    sft_learning_rate: float = field(default=3e-3, metadata={"help": "Stage-1 (SFT) learning rate."})
    sft_max_steps: int = field(default=800, metadata={"help": "Stage-1 (SFT) optimisation steps."})
    sft_batch_size: int = field(default=32, metadata={"help": "Stage-1 (SFT) per-device batch size."})
    skip_sft: bool = field(default=False, metadata={"help": "Start REDI directly from model_name_or_path."})
    num_eval_prompts: int = field(default=200, metadata={"help": "Held-out toy prompts for the accuracy check."})


def load_traces(recipe: REDIRecipeArguments, seed: int = 0) -> Dataset:
    """Teacher traces with a boolean ``correct`` column."""
    if recipe.dataset_name is None:
        return make_reasoning_traces(recipe.num_toy_prompts, seed=seed)
    traces = load_dataset(recipe.dataset_name, split=recipe.dataset_split)
    if "correct" not in traces.column_names:
        verifiers = {"math": math_verify_checker, "toy": check_reasoning_answer}
        if recipe.verifier not in verifiers:
            raise ValueError(f"verifier={recipe.verifier!r} is unknown; use one of {sorted(verifiers)}.")
        traces = label_traces(traces, verifier=verifiers[recipe.verifier])
    return traces


def sft_stage(model_path: str, train: Dataset, args: REDIConfig, recipe: REDIRecipeArguments) -> str:
    """Stage 1: SFT on positive traces. Saves the model and tokenizer; returns their path.

    Later stages load from this path: a trained model object carries TRL's patched forward,
    which ``copy.deepcopy`` does not re-bind, so copies would silently share weights.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    sft_args = SFTConfig(
        output_dir=os.path.join(args.output_dir, "sft"),
        learning_rate=recipe.sft_learning_rate,
        max_steps=recipe.sft_max_steps,
        per_device_train_batch_size=recipe.sft_batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, recipe.sft_max_steps // 10),
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to=args.report_to,
        logging_steps=max(1, recipe.sft_max_steps // 10),
        save_strategy="no",
        seed=args.seed,
        dataloader_pin_memory=args.dataloader_pin_memory,
        disable_tqdm=args.disable_tqdm,
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(sft_args.output_dir)
    tokenizer.save_pretrained(sft_args.output_dir)
    return sft_args.output_dir


def redi_stage(model_path: str, pairs: Dataset, args: REDIConfig, callbacks=None) -> REDITrainer:
    """Stage 2: REDI on preference pairs, starting from ``model_path``. Returns the trained trainer."""
    trainer = REDITrainer(model=model_path, args=args, train_dataset=pairs, callbacks=callbacks)
    trainer.train()
    return trainer


def main(recipe: REDIRecipeArguments, args: REDIConfig, callbacks=None) -> dict:
    model_path = recipe.model_name_or_path or pretrained_toy_model_path()
    traces = load_traces(recipe, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pairs, report = build_redi_pairs(traces, max_length=recipe.max_trace_length, tokenizer=tokenizer)
    print(f"[redi] {report}")
    if not recipe.skip_sft:
        sft_data = positives(traces).select_columns(["prompt", "completion"])
        model_path = sft_stage(model_path, sft_data, args, recipe)
    results = {"pairs": report.pairs, "dropped": dict(report.dropped)}
    held_out = None
    if recipe.dataset_name is None:
        held_out = make_reasoning_traces(recipe.num_eval_prompts, seed=10_000 + args.seed, traces_per_prompt=1)
        model = AutoModelForCausalLM.from_pretrained(model_path)
        results["accuracy_after_sft"] = generation_accuracy(model, tokenizer, held_out, reasoning_reward, 48)
    trainer = redi_stage(model_path, pairs, args, callbacks)
    if held_out is not None:
        results["accuracy_after_redi"] = generation_accuracy(trainer.model, tokenizer, held_out, reasoning_reward, 48)
    finish(trainer, recipe, results)
    results["model_path"] = args.output_dir
    print(f"[redi] { {k: v for k, v in results.items() if k != 'log_history'} }")
    return results


if __name__ == "__main__":
    parser = TrlParser((REDIRecipeArguments, REDIConfig))
    recipe_args, redi_args = parser.parse_args_and_config()
    main(recipe_args, redi_args)
