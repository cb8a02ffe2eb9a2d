"""SFT with Q-Tuning joint sample and token pruning.

    python -m recipes.qtuning_sft --output_dir outputs/qtuning --num_train_epochs 1
    python -m recipes.qtuning_sft --config recipes/configs/qtuning_sft.yaml
    python -m recipes.qtuning_sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name TIGER-Lab/MathInstruct \\
        --sample_keep_ratio 0.25 --token_keep_ratio 0.5 --dtype bfloat16

Defaults to the embedded pretrained toy model and the toy mixed-quality SFT set (clean,
wrong-label, trivially easy and hard examples); on the toy data it reports held-out accuracy
before and after (``--num_eval_prompts``). Writes the EU-plane plot of the last recorded
batches to ``<output_dir>/eu_plane.png``. ``--use_peft`` trains a LoRA adapter instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from trl import ModelConfig

from peft_trl_testbed import make_mixed_quality_sft
from recipes.common import (
    RunRecord,
    ToyScriptArguments,
    adapter_record,
    check_run,
    finish,
    load_model,
    lora_config,
    make_recipe_parser,
    resolve_dataset,
    toy_eval,
    train,
)
from trl_ext import QTuningConfig, QTuningSFTTrainer


@dataclass
class QTuningScriptArguments(ToyScriptArguments):
    """Script arguments; Q-Tuning's own knobs are those of :class:`~trl_ext.QTuningConfig`."""


def main(
    script_args: QTuningScriptArguments, training_args: QTuningConfig, model_args: ModelConfig, callbacks=None
) -> dict:
    check_run("qtuning_sft", script_args, training_args, model_args, lora=True)
    model, tokenizer = load_model(model_args, training_args)
    peft_config = lora_config(model_args, model)
    record = RunRecord("qtuning_sft", "Q-Tuning SFT", adapter_record(peft_config))
    checkpoint = record.check_resume(training_args)  # before any training: only this run's own checkpoints
    evaluate = toy_eval(script_args, "arithmetic")
    train_dataset = resolve_dataset(script_args, make_mixed_quality_sft(1024, seed=training_args.seed))
    results = {"dtype": str(model.dtype)}
    if evaluate:
        results["accuracy_before"] = evaluate(model, tokenizer)
    trainer = QTuningSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), record.callback()],
        peft_config=peft_config,
    )
    train(trainer, checkpoint)
    if evaluate:
        results["accuracy_after"] = evaluate(trainer.model, tokenizer)
    if trainer.eu_records:
        path = os.path.join(training_args.output_dir, "eu_plane.png")
        trainer.plot_eu_plane(path)
        results["eu_plane"] = path
    finish(trainer, script_args, results, record)
    print(f"[qtuning] { {k: v for k, v in results.items() if k != 'log_history'} }")
    return results


def make_parser():
    """The recipe's ``TrlParser``: ``QTuningScriptArguments``, ``QTuningConfig`` and ``ModelConfig``, with ``--config``."""
    return make_recipe_parser(QTuningScriptArguments, QTuningConfig)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
