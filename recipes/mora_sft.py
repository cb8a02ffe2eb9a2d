"""SFT with a MoRA adapter (PEFT type MORA).

    python -m recipes.mora_sft --output_dir outputs/mora --max_steps 100
    python -m recipes.mora_sft --config recipes/configs/mora_sft.yaml
    python -m recipes.mora_sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \\
        --mora_r 8 --mora_type rotation --bf16 true --push_to_hub true

Defaults to the embedded pretrained toy model and the toy arithmetic data, and then reports
held-out accuracy before and after training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ScriptArguments, SFTConfig, SFTTrainer, TrlParser

from peft_ext import MoraConfig, ReMoraCallback
from peft_ext.mora.layer import MoraLayer
from recipes.common import finish, is_toy_run, resolve_dataset, resolve_model
from trl_ext.toy import arithmetic_accuracy, make_arithmetic_dataset


@dataclass
class MoraArguments:
    """Model and MoRA adapter arguments."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: the embedded toy model."})
    mora_r: int = field(default=8, metadata={"help": "LoRA-equivalent rank budget r."})
    mora_type: str = field(default="rotation", metadata={"help": "truncation, sharing, decoupling or rotation."})
    mora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Modules to adapt."},
    )
    mora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    remora_every_n_steps: int | None = field(default=None, metadata={"help": "Enable ReMoRA with this period."})


def main(script_args: ScriptArguments, mora_args: MoraArguments, training_args: SFTConfig) -> dict:
    model_path = resolve_model(mora_args.model_name_or_path)
    toy = is_toy_run(script_args, mora_args.model_name_or_path)
    # Toy default: held-out problems of the toy pretraining run, and fresh training problems disjoint from them.
    held_out = make_arithmetic_dataset(200, seed=1, exclude=make_arithmetic_dataset(800, seed=0)) if toy else None
    train = resolve_dataset(script_args, make_arithmetic_dataset(1500, seed=2, exclude=held_out) if toy else None)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    config = MoraConfig(r=mora_args.mora_r, mora_type=mora_args.mora_type,
                        target_modules=mora_args.mora_target_modules, mora_dropout=mora_args.mora_dropout)  # fmt: skip
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    results = {}
    if toy:
        results["accuracy_before"] = arithmetic_accuracy(model, tokenizer, held_out)
    callbacks = (
        [ReMoraCallback(every_n_steps=mora_args.remora_every_n_steps)] if mora_args.remora_every_n_steps else []
    )
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                         callbacks=callbacks)  # fmt: skip
    trainer.train()
    if toy:
        results["accuracy_after"] = arithmetic_accuracy(trainer.model, tokenizer, held_out)
    results["trainable_params"], results["all_params"] = model.get_nb_trainable_parameters()
    # MoRA's point: a high-rank update at LoRA's parameter count. Rank of one merged update:
    layer = next(m for m in model.modules() if isinstance(m, MoraLayer))
    results["update_rank"] = int(torch.linalg.matrix_rank(layer.get_delta_weight("default").float()))
    results["lora_rank_same_params"] = mora_args.mora_r
    finish(trainer, script_args, results)
    print(f"[mora] { {k: v for k, v in results.items() if k != 'log_history'} }")
    return results


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, MoraArguments, SFTConfig))
    main(*parser.parse_args_and_config())
