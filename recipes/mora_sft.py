"""SFT with a MoRA adapter (PEFT type MORA).

    python -m recipes.mora_sft --output_dir outputs/mora --max_steps 100
    python -m recipes.mora_sft --config recipes/configs/mora_sft.yaml
    python -m recipes.mora_sft --load_in_4bit --bnb_4bit_quant_type nf4 --use_bnb_nested_quant true
    python -m recipes.mora_sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \\
        --mora_r 8 --mora_type rotation --dtype bfloat16 --push_to_hub true

Defaults to the embedded pretrained toy model and the toy arithmetic data; on the toy data
it reports held-out accuracy before and after training (``--num_eval_prompts``). Any model
trains on the toy data when no ``--dataset_name`` is given; the adapter targets the
architecture's attention and MLP projections unless ``--mora_target_modules`` is set.
``--load_in_4bit`` (or ``--load_in_8bit``) loads the base through bitsandbytes and trains M on
the frozen quantised weights (QMoRA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from trl import ModelConfig, SFTConfig, SFTTrainer

from peft_ext import MoraConfig, ReMoraCallback
from peft_ext.mora.layer import MoraLayer
from peft_ext.mora.ops import resolve_mora_type
from peft_trl_testbed import make_arithmetic_dataset
from recipes.common import (
    RunRecord,
    ToyScriptArguments,
    adapter_record,
    check_run,
    default_target_modules,
    finish,
    held_out_arithmetic,
    load_model,
    make_recipe_parser,
    resolve_dataset,
    toy_eval,
    train,
    whole_model,
)


@dataclass
class MoraScriptArguments(ToyScriptArguments):
    """Script arguments plus the MoRA adapter's (see :class:`~peft_ext.MoraConfig`)."""

    mora_r: int = field(default=8, metadata={"help": "LoRA-equivalent rank budget r."})
    mora_type: str = field(default="rotation", metadata={"help": "truncation, sharing, decoupling or rotation."})
    mora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt (default: the architecture's attention and MLP projections)."},
    )
    mora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    remora_every_n_steps: int | None = field(default=None, metadata={"help": "Enable ReMoRA with this period."})


def main(script_args: MoraScriptArguments, training_args: SFTConfig, model_args: ModelConfig, callbacks=None) -> dict:
    check_run("mora_sft", script_args, training_args, model_args, lora=False, quantized=True)
    remora = None
    if script_args.remora_every_n_steps:
        remora = ReMoraCallback(every_n_steps=script_args.remora_every_n_steps)
        remora.next_type(resolve_mora_type(script_args.mora_type))  # fails here, not at the first restart
    model, tokenizer = load_model(model_args, training_args)
    evaluate = toy_eval(script_args, "arithmetic")
    # Toy data: fresh a+b problems, disjoint from the held-out ones.
    exclude = held_out_arithmetic(max(script_args.num_eval_prompts, 200))
    train_dataset = resolve_dataset(script_args, make_arithmetic_dataset(1500, seed=2, exclude=exclude))
    config = MoraConfig(
        r=script_args.mora_r,
        mora_type=script_args.mora_type,
        mora_dropout=script_args.mora_dropout,
        target_modules=script_args.mora_target_modules or default_target_modules(model),
    )
    record = RunRecord("mora_sft", "MoRA SFT", adapter_record(config))
    checkpoint = record.check_resume(training_args)  # before any training: only this run's own checkpoints
    if model_args.load_in_4bit or model_args.load_in_8bit:  # QMoRA: M trains on the frozen quantised base
        model = prepare_model_for_kbit_training(model, training_args.gradient_checkpointing)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    results = {"dtype": str(model.dtype)}
    if evaluate:
        results["accuracy_before"] = evaluate(model, tokenizer)
    callbacks = [*(callbacks or []), record.callback()]
    if remora:
        callbacks.append(remora)
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks
    )
    train(trainer, checkpoint)
    if evaluate:
        results["accuracy_after"] = evaluate(trainer.model, tokenizer)
    results["trainable_params"], results["all_params"] = model.get_nb_trainable_parameters()
    # MoRA's point: a high-rank update at LoRA's parameter count. Rank of one merged update:
    layer = next(m for m in model.modules() if isinstance(m, MoraLayer))
    with whole_model(layer):  # M is partitioned under ZeRO-3
        results["update_rank"] = int(torch.linalg.matrix_rank(layer.get_delta_weight("default").float()))
    results["lora_rank_same_params"] = script_args.mora_r
    finish(trainer, script_args, results, record)
    print(f"[mora] { {k: v for k, v in results.items() if k != 'log_history'} }")
    return results


def make_parser():
    """The recipe's ``TrlParser``: ``MoraScriptArguments``, ``SFTConfig`` and ``ModelConfig``, with ``--config``."""
    return make_recipe_parser(MoraScriptArguments, SFTConfig)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
