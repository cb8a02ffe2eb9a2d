"""RL-selected subnetwork: full GRPO, select the weights it changed, retrain only those from the base.

    python -m recipes.subnet_grpo --output_dir outputs/subnet --max_steps 40
    python -m recipes.subnet_grpo --config recipes/configs/subnet_grpo.yaml
    python -m recipes.subnet_grpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name my/math \\
        --reward_funcs my_rewards:accuracy --selection_tol 1e-5

Steps: (1) full-parameter GRPO from the base in ``--dtype`` (bfloat16 by default in this
recipe, the paper's setting, where updates below the dtype's resolution leave weights
bit-identical); (2) diff base and tuned checkpoints shard by shard at ``--selection_tol`` and
plot update sparsity by layer; (3) retrain only the selected entries (PEFT type SUBNET) from
the base with the same data, seed and steps; (4) compare rewards and the fraction of
identical weights, and save the subnetwork adapter (values + compact indices, safetensors).
Rewards are registry names (``arithmetic_reward`` by default on the toy data) or ``module:function``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer, ModelConfig

from peft_ext import SubnetConfig, diff_checkpoints
from peft_ext.subnet import analysis
from peft_trl_testbed import make_arithmetic_dataset
from recipes.common import (
    RewardScriptArguments,
    RunRecord,
    adapter_record,
    check_run,
    get_reward_funcs,
    load_model,
    make_recipe_parser,
    model_init_kwargs,
    push_to_hub,
    refuse_deepspeed_stages,
    resolve_dataset,
    resume_arg,
    save_model,
    toy_eval,
)


@dataclass
class SubnetScriptArguments(RewardScriptArguments):
    """Script arguments plus the rewards and the subnetwork selection."""

    selection_tol: float = field(default=1e-5, metadata={"help": "Absolute tolerance of an unchanged weight."})
    plot: str | None = field(default=None, metadata={"help": "Sparsity PNG path (default <output_dir>/...)."})


def _with_output_dir(args: GRPOConfig, path: Path, push_to_hub: bool | None = None) -> GRPOConfig:
    """A copy of ``args`` writing to ``path`` (a copy, since re-running the config's checks fails on derived fields)."""
    new = copy.deepcopy(args)
    new.output_dir = str(path)
    if push_to_hub is not None:
        new.push_to_hub = push_to_hub
    return new


def stage_checkpoints(resume: bool | str | None, out: Path) -> dict[str, str | None]:
    """The checkpoint each stage (``full``, ``subnet``) resumes from, or None where it trains from the start.

    ``true``: each stage's latest checkpoint (at least one must exist). A path: it must be a checkpoint
    in one of the stage folders; that stage resumes from it. A path in ``full/`` retrains the subnetwork
    from the start (its masks come from the full run), a path in ``subnet/`` resumes the full stage from
    its latest checkpoint. Any other path is refused rather than ignored.
    """
    stages = {name: out / name for name in ("full", "subnet")}
    latest = {name: get_last_checkpoint(str(d)) if d.is_dir() else None for name, d in stages.items()}
    if not resume:
        return {name: None for name in stages}
    if resume is True:
        if not any(latest.values()):
            raise ValueError(
                f"--resume_from_checkpoint true, but neither stage folder ({stages['full']}, {stages['subnet']}) "
                "holds a checkpoint-* folder; start without --resume_from_checkpoint."
            )
        return latest
    path = Path(resume).resolve()
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not a folder; pass a checkpoint-* folder or true.")
    if path.parent == stages["full"].resolve():
        return {"full": str(path), "subnet": None}
    if path.parent == stages["subnet"].resolve():
        return {"full": latest["full"], "subnet": str(path)}
    raise ValueError(
        f"--resume_from_checkpoint {resume!r} is not a checkpoint of this run's stages: subnet_grpo resumes from "
        f"{stages['full']}/checkpoint-* (full GRPO) or {stages['subnet']}/checkpoint-* (subnetwork). Pass one of "
        "those, or true for each stage's latest."
    )


def _mean_reward(trainer, last: int = 10) -> float:
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h][-last:]
    return sum(rewards) / max(len(rewards), 1)


def main(
    script_args: SubnetScriptArguments, training_args: GRPOConfig, model_args: ModelConfig, callbacks=None
) -> dict:
    check_run("subnet_grpo", script_args, training_args, model_args, lora=False)
    refuse_deepspeed_stages(
        training_args,
        "recipes.subnet_grpo (full GRPO, then the subnetwork's GRPO)",
        "Launch it with recipes/accelerate_configs/multi_gpu.yaml, or train the subnetwork alone with DeepSpeed: "
        "make masks with `python -m peft_ext.subnet diff` and train a SubnetConfig(mask_source=masks) adapter "
        "with TRL's GRPOTrainer.",
    )
    out = Path(training_args.output_dir)
    full_record = RunRecord("subnet_grpo", "full GRPO")
    resume = stage_checkpoints(resume_arg(training_args), out)
    if resume["full"]:
        full_record.check(resume["full"])
    if resume["subnet"]:  # the adapter config is checked once the masks are known, before that stage trains
        RunRecord("subnet_grpo", "SUBNET GRPO").check(resume["subnet"], compare_adapter=False)
    model, tokenizer = load_model(model_args, training_args)
    train_dataset = resolve_dataset(script_args, make_arithmetic_dataset(320, seed=0))
    rewards = get_reward_funcs(
        script_args.reward_funcs, default=None if script_args.dataset_name else "arithmetic_reward"
    )
    evaluate = toy_eval(script_args, "arithmetic")

    # The diff is taken against the base in the training dtype: the cast alone is not an update.
    base = str(out / "base")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    load = model_init_kwargs(model_args, training_args) | {"revision": None}  # base is a local folder

    print("[subnet] 1/3 full-parameter GRPO")
    full_args = _with_output_dir(training_args, out / "full", push_to_hub=False)
    full = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base, **load),
        reward_funcs=rewards,
        args=full_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[full_record.callback()],
    )
    # Each stage checkpoints in its own folder; a resumed run resumes each from its latest checkpoint.
    full.train(resume_from_checkpoint=resume["full"])
    full.save_model(str(out / "full"))
    full_record.save(out / "full")

    print("[subnet] 2/3 selecting the subnetwork from the checkpoint diff")
    diff = diff_checkpoints(base, str(out / "full"), tol=script_args.selection_tol)
    plot = script_args.plot or str(out / "subnet_sparsity.png")
    analysis.plot_sparsity(diff.tensors, plot, title=f"GRPO updates (|dw| > {script_args.selection_tol:g})")
    print(analysis.sparsity_report(diff.tensors, title="update sparsity by layer"))
    # TRL's GRPO computes log-probs from lm_head.weight directly, so it refuses an adapter there.
    masks = {n: m for n, m in diff.masks.items() if m.dim() == 2 and not n.startswith("lm_head")}

    print("[subnet] 3/3 retraining only the subnetwork from the base")
    subnet_config = SubnetConfig(mask_source=masks)
    sub_record = RunRecord("subnet_grpo", "SUBNET GRPO", adapter_record(subnet_config))
    if resume["subnet"]:
        sub_record.check(resume["subnet"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, **load), subnet_config)
    trainable, total = model.get_nb_trainable_parameters()
    sub_args = _with_output_dir(training_args, out / "subnet")
    sub = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=sub_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), sub_record.callback()],
    )
    sub.train(resume_from_checkpoint=resume["subnet"])
    save_model(sub, str(out / "subnet"))
    sub_record.save(out / "subnet")
    if training_args.push_to_hub:
        push_to_hub(sub, script_args.dataset_name)

    merged = model.merge_and_unload()
    full_state = full.model.state_dict()
    same = sum(int((p == full_state[n]).sum()) for n, p in merged.state_dict().items() if n in full_state)
    numel = sum(p.numel() for n, p in merged.state_dict().items() if n in full_state)
    adapter_bytes = os.path.getsize(out / "subnet" / "adapter_model.safetensors")
    dense_bytes = sum(m.numel() for m in masks.values()) * torch.finfo(model.dtype).bits // 8
    results = {
        "dtype": str(model.dtype),
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
    if evaluate:
        results["accuracy_full"] = evaluate(full.model, tokenizer)
        results["accuracy_subnet"] = evaluate(merged, tokenizer)
    print(f"[subnet] { {k: v for k, v in results.items() if not k.endswith('log_history')} }")
    return results


def make_parser():
    """The recipe's ``TrlParser``: ``SubnetScriptArguments``, ``GRPOConfig`` and ``ModelConfig`` (dtype bf16)."""
    return make_recipe_parser(SubnetScriptArguments, GRPOConfig, dtype="bfloat16")


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
