"""SFT with Q-Tuning joint sample and token pruning.

    python -m recipes.qtuning_sft --output_dir outputs/qtuning --num_train_epochs 1
    python -m recipes.qtuning_sft --config recipes/configs/qtuning_sft.yaml
    python -m recipes.qtuning_sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name TIGER-Lab/MathInstruct \\
        --sample_keep_ratio 0.25 --token_keep_ratio 0.5 --bf16 true

Defaults to the embedded pretrained toy model and the toy mixed-quality SFT set (clean,
wrong-label, trivially easy and hard examples), reports held-out accuracy before and after,
and writes the EU-plane plot of the last recorded batches to ``<output_dir>/eu_plane.png``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ScriptArguments, TrlParser

from recipes.common import finish, is_toy_run, resolve_dataset, resolve_model
from trl_ext import QTuningConfig, QTuningSFTTrainer
from trl_ext.toy import arithmetic_accuracy, make_arithmetic_dataset, make_mixed_quality_sft


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: the embedded toy model."})


def main(
    script_args: ScriptArguments, model_args: ModelArguments, training_args: QTuningConfig, callbacks=None
) -> dict:
    model_path = resolve_model(model_args.model_name_or_path)
    toy = is_toy_run(script_args, model_args.model_name_or_path)
    train = resolve_dataset(script_args, make_mixed_quality_sft(1024, seed=training_args.seed) if toy else None)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    results = {}
    held_out = make_arithmetic_dataset(200, seed=1, exclude=make_arithmetic_dataset(800, seed=0)) if toy else None
    if toy:
        results["accuracy_before"] = arithmetic_accuracy(model, tokenizer, held_out)
    trainer = QTuningSFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                                callbacks=callbacks)  # fmt: skip
    trainer.train()
    if toy:
        results["accuracy_after"] = arithmetic_accuracy(trainer.model, tokenizer, held_out)
    if trainer.eu_records:
        path = os.path.join(training_args.output_dir, "eu_plane.png")
        trainer.plot_eu_plane(path)
        results["eu_plane"] = path
    finish(trainer, script_args, results)
    print(f"[qtuning] { {k: v for k, v in results.items() if k != 'log_history'} }")
    return results


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, ModelArguments, QTuningConfig))
    main(*parser.parse_args_and_config())
