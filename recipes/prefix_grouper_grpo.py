"""GRPO with Prefix Grouper: each group's shared prompt is encoded once.

    python -m recipes.prefix_grouper_grpo --output_dir outputs/pg --max_steps 20
    python -m recipes.prefix_grouper_grpo --config recipes/configs/prefix_grouper_grpo.yaml
    python -m recipes.prefix_grouper_grpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K --reward_funcs accuracy_reward --num_generations 8 --dtype bfloat16

Defaults to the embedded pretrained toy model and toy arithmetic prompts with their exact-
answer reward; on the toy data it reports held-out accuracy before and after
(``--num_eval_prompts``). ``--reward_funcs`` takes registry names (``arithmetic_reward``,
``reasoning_reward``, ``accuracy_reward``, ``think_format_reward``) or ``module:function``;
the dataset's columns reach a reward as keyword arguments, as in TRL. ``--use_peft`` trains LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import ModelConfig

from peft_trl_testbed import make_arithmetic_dataset
from recipes.common import (
    RewardScriptArguments,
    RunRecord,
    adapter_record,
    check_run,
    finish,
    get_reward_funcs,
    held_out_arithmetic,
    load_model,
    lora_config,
    make_recipe_parser,
    resolve_dataset,
    toy_eval,
    train,
)
from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer


@dataclass
class PrefixGrouperScriptArguments(RewardScriptArguments):
    """Script arguments plus the rewards; Prefix Grouper's knobs are those of :class:`~trl_ext.PrefixGrouperGRPOConfig`."""


def main(
    script_args: PrefixGrouperScriptArguments,
    training_args: PrefixGrouperGRPOConfig,
    model_args: ModelConfig,
    callbacks=None,
) -> dict:
    check_run("prefix_grouper_grpo", script_args, training_args, model_args, lora=True)
    model, tokenizer = load_model(model_args, training_args)
    peft_config = lora_config(model_args, model)
    record = RunRecord("prefix_grouper_grpo", "Prefix Grouper GRPO", adapter_record(peft_config))
    checkpoint = record.check_resume(training_args)  # before any training: only this run's own checkpoints
    evaluate = toy_eval(script_args, "arithmetic")
    exclude = held_out_arithmetic(max(script_args.num_eval_prompts, 200))
    train_dataset = resolve_dataset(script_args, make_arithmetic_dataset(1000, seed=3, exclude=exclude))
    rewards = get_reward_funcs(
        script_args.reward_funcs, default=None if script_args.dataset_name else "arithmetic_reward"
    )
    results = {"dtype": str(model.dtype)}
    if evaluate:
        results["accuracy_before"] = evaluate(model, tokenizer)
    trainer = PrefixGrouperGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), record.callback()],
        peft_config=peft_config,
    )
    train(trainer, checkpoint)
    if evaluate:
        results["accuracy_after"] = evaluate(trainer.model, tokenizer)
    rewards_logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    if rewards_logged:
        results["reward_first"], results["reward_last"] = rewards_logged[0], rewards_logged[-1]
    finish(trainer, script_args, results, record)
    print(f"[prefix-grouper] { {k: v for k, v in results.items() if k != 'log_history'} }")
    return results


def make_parser():
    """The recipe's ``TrlParser``: ``PrefixGrouperScriptArguments``, ``PrefixGrouperGRPOConfig`` and ``ModelConfig``."""
    return make_recipe_parser(PrefixGrouperScriptArguments, PrefixGrouperGRPOConfig)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
