"""REDI, two stages: SFT on the teacher's correct traces, then REDI on (correct, incorrect) pairs.

Defaults to the embedded toy model and the toy step-by-step traces; any model path or Hub
id and any trace dataset with ``prompt``/``completion``/``answer`` columns (and optionally a
boolean ``correct`` column, else traces are labelled with ``--verifier``) work too. Both
stages read one parsed :class:`~trl_ext.REDIConfig`; stage 1's ``SFTConfig`` is derived from
it, with ``--sft_learning_rate``, ``--sft_max_steps`` and ``--sft_batch_size`` and
``output_dir=<output_dir>/sft``.

    python -m recipes.redi_two_stage --output_dir outputs/redi --max_steps 100
    python -m recipes.redi_two_stage --config recipes/configs/redi.yaml
    python -m recipes.redi_two_stage --model_name_or_path Qwen/Qwen2.5-Math-1.5B \\
        --dataset_name my/traces --sft_learning_rate 5e-5 --learning_rate 1e-6 --dtype bfloat16
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset
from transformers import AutoConfig, AutoTokenizer, TrainingArguments
from trl import ModelConfig, SFTConfig, SFTTrainer

from recipes.common import (
    ToyScriptArguments,
    cpu_guard,
    finish,
    load_model,
    lora_config,
    make_recipe_parser,
    model_init_kwargs,
    model_path,
    resume_arg,
    toy_eval,
    train,
)
from trl_ext._args import convert_args
from trl_ext.redi import REDIConfig, REDITrainer, build_redi_pairs, label_traces, math_verify_checker, positives
from trl_ext.toy import check_reasoning_answer, make_reasoning_traces


@dataclass
class REDIScriptArguments(ToyScriptArguments):
    """Script arguments plus the traces and stage 1 (SFT); stage 2's are those of :class:`~trl_ext.REDIConfig`."""

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


def load_traces(script_args: REDIScriptArguments, seed: int = 0) -> Dataset:
    """Teacher traces with a boolean ``correct`` column: ``--dataset_name``, or the toy traces."""
    if not script_args.dataset_name:
        return make_reasoning_traces(script_args.num_toy_prompts, seed=seed)
    traces = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
    )
    if "correct" not in traces.column_names:
        verifiers = {"math": math_verify_checker, "toy": check_reasoning_answer}
        if script_args.verifier not in verifiers:
            raise ValueError(f"verifier={script_args.verifier!r} is unknown; use one of {sorted(verifiers)}.")
        traces = label_traces(traces, verifier=verifiers[script_args.verifier])
    return traces


def sft_config(args: REDIConfig, script_args: REDIScriptArguments) -> SFTConfig:
    """Stage 1's ``SFTConfig``: the parsed ``REDIConfig``'s ``TrainingArguments`` values (use_cpu, bf16, seed,
    ...) with the ``--sft_*`` flags, a cosine schedule and ``output_dir=<output_dir>/sft``; SFT's own fields
    keep SFT's defaults."""
    steps = script_args.sft_max_steps
    return convert_args(
        args,
        SFTConfig,
        "the SFT stage",
        carry=TrainingArguments,
        output_dir=os.path.join(args.output_dir, "sft"),
        learning_rate=script_args.sft_learning_rate,
        max_steps=steps,
        per_device_train_batch_size=script_args.sft_batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, steps // 10),
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        resume_from_checkpoint=None,
        push_to_hub=False,
    )


def sft_stage(
    model_path: str,
    train_dataset: Dataset,
    args: REDIConfig,
    script_args: REDIScriptArguments,
    model_args: ModelConfig | None = None,
) -> str:
    """Stage 1: SFT on positive traces. Saves the model and tokenizer; returns their path.

    Later stages load from this path: a trained model object carries TRL's patched forward,
    which ``copy.deepcopy`` does not re-bind, so copies would silently share weights.
    """
    sft_args = sft_config(args, script_args)
    model, tokenizer = load_model(model_args or ModelConfig(), sft_args, path=model_path)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(sft_args.output_dir)
    tokenizer.save_pretrained(sft_args.output_dir)
    return sft_args.output_dir


def redi_stage(
    model_path: str, pairs: Dataset, args: REDIConfig, model_args: ModelConfig | None = None, callbacks=None
) -> REDITrainer:
    """Stage 2: REDI on preference pairs, starting from ``model_path``. Returns the trained trainer."""
    model_args = model_args or ModelConfig()
    args.model_init_kwargs = model_init_kwargs(model_args, args) | (args.model_init_kwargs or {})
    trainer = REDITrainer(model=model_path, args=args, train_dataset=pairs, callbacks=callbacks,
                          peft_config=lora_config(model_args, AutoConfig.from_pretrained(model_path)))  # fmt: skip
    train(trainer)
    return trainer


def main(script_args: REDIScriptArguments, training_args: REDIConfig, model_args: ModelConfig, callbacks=None) -> dict:
    cpu_guard(training_args)
    path = model_path(model_args)
    traces = load_traces(script_args, seed=training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs, report = build_redi_pairs(traces, max_length=script_args.max_trace_length, tokenizer=tokenizer)
    print(f"[redi] {report}")
    sft_path = os.path.join(training_args.output_dir, "sft")
    if resume_arg(training_args) and os.path.exists(os.path.join(sft_path, "config.json")):
        print(f"[redi] resuming stage 2: stage 1's model is already saved in {sft_path}")
        path = sft_path
    elif not script_args.skip_sft:
        sft_data = positives(traces).select_columns(["prompt", "completion"])
        path = sft_stage(path, sft_data, training_args, script_args, model_args)
    results = {"pairs": report.pairs, "dropped": dict(report.dropped)}
    evaluate = toy_eval(script_args, "reasoning", seed=training_args.seed)
    if evaluate:
        model, _ = load_model(model_args, training_args, path=path)
        results["accuracy_after_sft"] = evaluate(model, tokenizer)
    trainer = redi_stage(path, pairs, training_args, model_args, callbacks)
    results["dtype"] = str(trainer.model.dtype)
    if evaluate:
        results["accuracy_after_redi"] = evaluate(trainer.model, tokenizer)
    finish(trainer, script_args, results)
    results["model_path"] = training_args.output_dir
    print(f"[redi] { {k: v for k, v in results.items() if k != 'log_history'} }")
    return results


def make_parser():
    """The recipe's ``TrlParser``: ``REDIScriptArguments``, ``REDIConfig`` and ``ModelConfig``, with ``--config``."""
    return make_recipe_parser(REDIScriptArguments, REDIConfig)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
