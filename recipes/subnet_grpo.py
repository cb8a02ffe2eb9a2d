"""RL-selected subnetwork: full GRPO, select the weights it changed, retrain only those from the base.

    python -m recipes.subnet_grpo --output_dir outputs/subnet --max_steps 40
    python -m recipes.subnet_grpo --config recipes/configs/subnet_grpo.yaml
    python -m recipes.subnet_grpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name my/math \\
        --reward_funcs my_rewards.accuracy --selection_tol 1e-5

Steps: (1) full-parameter GRPO from the base in ``--weights_dtype`` (bf16 by default, the
paper's setting, where updates below the dtype's resolution leave weights bit-identical);
(2) diff base and tuned checkpoints shard by shard at ``--selection_tol`` and plot update
sparsity by layer; (3) retrain only the selected entries (PEFT type SUBNET) from the base
with the same data, seed and steps; (4) compare rewards and the fraction of identical
weights, and save the subnetwork adapter (values + compact indices, safetensors).
"""

from __future__ import annotations

import copy
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, TrlParser

from peft_ext import SubnetConfig, diff_checkpoints
from peft_ext.subnet import analysis
from recipes.common import resolve_model
from trl_ext.toy import arithmetic_reward, make_arithmetic_dataset


@dataclass
class SubnetRecipeArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: the embedded toy model."})
    dataset_name: str | None = field(default=None, metadata={"help": "Prompt dataset; default: toy arithmetic."})
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["trl_ext.toy.data.arithmetic_reward"],
        metadata={"help": "Reward functions as importable 'module.function' names."},
    )
    weights_dtype: str = field(default="bfloat16", metadata={"help": "Dtype of the trained weights."})
    selection_tol: float = field(default=1e-5, metadata={"help": "Absolute tolerance of an unchanged weight."})
    plot: str | None = field(default=None, metadata={"help": "Sparsity PNG path (default <output_dir>/...)."})


def _import(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _with_output_dir(args: GRPOConfig, path: Path, push_to_hub: bool | None = None) -> GRPOConfig:
    """A copy of ``args`` writing to ``path`` (a copy, since re-running the config's checks fails on derived fields)."""
    new = copy.deepcopy(args)
    new.output_dir = str(path)
    if push_to_hub is not None:
        new.push_to_hub = push_to_hub
    return new


def _mean_reward(trainer, last: int = 10) -> float:
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h][-last:]
    return sum(rewards) / max(len(rewards), 1)


def main(recipe: SubnetRecipeArguments, args: GRPOConfig) -> dict:
    from datasets import load_dataset

    out = Path(args.output_dir)
    dtype = getattr(torch, recipe.weights_dtype)
    source = resolve_model(recipe.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if recipe.dataset_name:
        train = load_dataset(recipe.dataset_name, split=recipe.dataset_split)
        rewards = [_import(name) for name in recipe.reward_funcs]
    else:
        train, rewards = make_arithmetic_dataset(320, seed=0), [arithmetic_reward]

    # The diff is taken against the base in the training dtype: the cast alone is not an update.
    base = str(out / "base")
    AutoModelForCausalLM.from_pretrained(source, dtype=dtype).save_pretrained(base)
    tokenizer.save_pretrained(base)

    print("[subnet] 1/3 full-parameter GRPO")
    full_args = _with_output_dir(args, out / "full", push_to_hub=False)
    full = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=dtype), reward_funcs=rewards,
                       args=full_args, train_dataset=train, processing_class=tokenizer)  # fmt: skip
    full.train()
    full.save_model(str(out / "full"))

    print("[subnet] 2/3 selecting the subnetwork from the checkpoint diff")
    diff = diff_checkpoints(base, str(out / "full"), tol=recipe.selection_tol)
    plot = recipe.plot or str(out / "subnet_sparsity.png")
    analysis.plot_sparsity(diff.tensors, plot, title=f"GRPO updates (|dw| > {recipe.selection_tol:g})")
    print(analysis.sparsity_report(diff.tensors, title="update sparsity by layer"))
    # TRL's GRPO computes log-probs from lm_head.weight directly, so it refuses an adapter there.
    masks = {n: m for n, m in diff.masks.items() if m.dim() == 2 and not n.startswith("lm_head")}

    print("[subnet] 3/3 retraining only the subnetwork from the base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), SubnetConfig(mask_source=masks))
    trainable, total = model.get_nb_trainable_parameters()
    sub = GRPOTrainer(model=model, reward_funcs=rewards, args=_with_output_dir(args, out / "subnet"),
                      train_dataset=train, processing_class=tokenizer)  # fmt: skip
    sub.train()
    sub.save_model(str(out / "subnet"))
    if args.push_to_hub:
        sub.push_to_hub(dataset_name=recipe.dataset_name)

    merged = model.merge_and_unload()
    full_state = full.model.state_dict()
    same = sum(int((p == full_state[n]).sum()) for n, p in merged.state_dict().items() if n in full_state)
    numel = sum(p.numel() for n, p in merged.state_dict().items() if n in full_state)
    adapter_bytes = os.path.getsize(out / "subnet" / "adapter_model.safetensors")
    dense_bytes = sum(m.numel() for m in masks.values()) * torch.finfo(dtype).bits // 8
    results = {
        "density": diff.fraction_changed,
        "trainable": trainable,
        "total_params": total,
        "full_reward": _mean_reward(full),
        "subnet_reward": _mean_reward(sub),
        "identical": same / numel,
        "adapter_bytes": adapter_bytes,
        "adapter_ratio": adapter_bytes / dense_bytes,
        "plot": plot,
        "log_history": sub.state.log_history,
        "full_log_history": full.state.log_history,
    }
    print(f"[subnet] { {k: v for k, v in results.items() if k != 'log_history'} }")
    return results


if __name__ == "__main__":
    parser = TrlParser((SubnetRecipeArguments, GRPOConfig))
    main(*parser.parse_args_and_config())
