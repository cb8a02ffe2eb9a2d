"""GRPO with Prefix Grouper: each group's shared prompt is encoded once.

    python -m recipes.prefix_grouper_grpo --output_dir outputs/pg --max_steps 20
    python -m recipes.prefix_grouper_grpo --config recipes/configs/prefix_grouper_grpo.yaml
    python -m recipes.prefix_grouper_grpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K --num_generations 8 --bf16 true

Defaults to the embedded pretrained toy model and toy arithmetic prompts with their exact-
answer reward, and reports held-out accuracy before and after. With another dataset, pass a
reward with ``--reward_funcs module.function`` (the dataset's columns reach it as keyword
arguments, as in TRL).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ScriptArguments, TrlParser

from recipes.common import finish, is_toy_run, resolve_dataset, resolve_model
from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer
from trl_ext.toy import arithmetic_accuracy, arithmetic_reward, make_arithmetic_dataset


@dataclass
class GRPORecipeArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: the embedded toy model."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["trl_ext.toy.data.arithmetic_reward"],
        metadata={"help": "Reward functions as importable 'module.function' names."},
    )


def _import(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def main(script_args: ScriptArguments, recipe: GRPORecipeArguments, training_args: PrefixGrouperGRPOConfig) -> dict:
    model_path = resolve_model(recipe.model_name_or_path)
    toy = is_toy_run(script_args, recipe.model_name_or_path)
    held_out = make_arithmetic_dataset(200, seed=1, exclude=make_arithmetic_dataset(800, seed=0)) if toy else None
    train = resolve_dataset(script_args, make_arithmetic_dataset(1000, seed=3, exclude=held_out) if toy else None)
    rewards = [arithmetic_reward] if toy else [_import(name) for name in recipe.reward_funcs]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    results = {}
    if toy:
        results["accuracy_before"] = arithmetic_accuracy(AutoModelForCausalLM.from_pretrained(model_path), tokenizer,
                                                         held_out)  # fmt: skip
    trainer = PrefixGrouperGRPOTrainer(model=model_path, reward_funcs=rewards, args=training_args,
                                       train_dataset=train, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    if toy:
        results["accuracy_after"] = arithmetic_accuracy(trainer.model, tokenizer, held_out)
    rewards_logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    if rewards_logged:
        results["reward_first"], results["reward_last"] = rewards_logged[0], rewards_logged[-1]
    finish(trainer, script_args, results)
    print(f"[prefix-grouper] { {k: v for k, v in results.items() if k != 'log_history'} }")
    return results


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, GRPORecipeArguments, PrefixGrouperGRPOConfig))
    main(*parser.parse_args_and_config())
