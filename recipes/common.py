"""What every recipe shares, in the order a recipe uses it.

Arguments (``ToyScriptArguments``, ``make_recipe_parser``), the model and its tokenizer from
TRL's ``ModelConfig`` (``load_model``), the data (``resolve_dataset``), adapter targets per
architecture (``default_target_modules``), GRPO rewards by name (``get_reward_funcs``), the
held-out toy evaluation (``ToyEval``) and the end of a run (``train``, ``finish``). With no
``--model_name_or_path`` and no ``--dataset_name`` a recipe runs on the embedded toy testbed.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, TrainingArguments
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The toy held-out sets: the recipes' training data never contains them.
HELD_OUT_ARITHMETIC = dict(n=200, seed=1)
HELD_OUT_REASONING_SEED = 10_000


@dataclass
class ToyScriptArguments(ScriptArguments):
    """TRL's script arguments plus the size of the held-out toy evaluation.

    Parameters:
        num_eval_prompts (`int`, *optional*, defaults to `200`):
            Held-out toy prompts decoded greedily before and after training when the run uses the toy
            data (no ``--dataset_name``); ``0`` skips the evaluation.
    """

    num_eval_prompts: int = field(
        default=200, metadata={"help": "Held-out toy prompts for the accuracy check on toy data (0: none)."}
    )


@dataclass
class RewardScriptArguments(ToyScriptArguments):
    """Toy script arguments plus GRPO's reward functions, by registry name or ``module:function``."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Rewards: arithmetic_reward (default), reasoning_reward, accuracy_reward, "
            "think_format_reward, or module:function."
        },  # fmt: skip
    )


def accelerator_available() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, ROCm, XPU, MPS, ...)."""
    return torch.accelerator.is_available()


def make_recipe_parser(script_args_cls, config_cls, **defaults) -> TrlParser:
    """``TrlParser((script_args_cls, config_cls, ModelConfig))`` with ``--config`` YAML support.

    Without an accelerator, mixed precision defaults to off, since TRL's configs default to
    ``bf16=True`` and transformers refuses that on a CPU; on a GPU TRL's defaults apply.
    ``defaults`` are recipe defaults (e.g. ``dtype="bfloat16"``); flags and YAML override them.
    """
    parser = TrlParser((script_args_cls, config_cls, ModelConfig))
    if not accelerator_available():
        defaults = {"bf16": False, "fp16": False, **defaults}
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def cpu_guard(training_args: TrainingArguments) -> None:
    """With no accelerator, turn mixed precision off and say so in one log line."""
    if accelerator_available():
        return
    if training_args.bf16 or training_args.fp16:
        training_args.bf16 = training_args.fp16 = False
    print("[recipes] no accelerator found: mixed precision (bf16/fp16) is off, training in the model's dtype on CPU")


def model_path(model_args: ModelConfig) -> str:
    """``--model_name_or_path``, or the embedded pretrained toy model when it is not given."""
    if model_args.model_name_or_path:
        return model_args.model_name_or_path
    from trl_ext.toy import pretrained_toy_model_path

    return pretrained_toy_model_path()


def model_init_kwargs(model_args: ModelConfig, training_args: TrainingArguments | None = None) -> dict:
    """``from_pretrained`` keywords from ``ModelConfig``, as TRL's scripts build them.

    ``--load_in_4bit``/``--load_in_8bit`` load the base through bitsandbytes (on the accelerator, or the CPU).
    """
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(training_args, "trust_remote_code", False),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        # bitsandbytes quantises while loading, onto this process's device
        kwargs["device_map"] = {"": PartialState().local_process_index} if torch.cuda.is_available() else "cpu"
    return kwargs


def load_model(model_args: ModelConfig, training_args: TrainingArguments | None = None, path: str | None = None):
    """The causal LM (``path`` or ``--model_name_or_path`` or the toy default) and its own tokenizer."""
    path = path or model_path(model_args)
    kwargs = model_init_kwargs(model_args, training_args)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=kwargs["revision"], trust_remote_code=kwargs["trust_remote_code"]
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_dataset(script_args: ScriptArguments, default: Dataset | None) -> Dataset:
    """The training split of ``--dataset_name`` (any path or Hub id), or ``default`` (the toy data)."""
    if not script_args.dataset_name:
        return default
    return load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
    )


# Adapter targets per architecture: attention and MLP projections.
TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def default_target_modules(model: PreTrainedModel | PretrainedConfig) -> list[str] | str:
    """The attention and MLP projections of ``model``'s architecture (a model or its config), else ``"all-linear"``."""
    return TARGET_MODULES.get(getattr(model, "config", model).model_type, "all-linear")


def lora_config(model_args: ModelConfig, model: PreTrainedModel | PretrainedConfig):
    """TRL's ``get_peft_config`` (LoRA with ``--use_peft``), targeting the architecture's projections by default."""
    config = get_peft_config(model_args)
    if config is not None and model_args.lora_target_modules is None:
        targets = default_target_modules(model)
        config.target_modules = set(targets) if isinstance(targets, list) else targets
    return config


def _toy_rewards() -> dict:
    from trl.rewards import accuracy_reward, think_format_reward

    from trl_ext.toy import arithmetic_reward, reasoning_reward

    return {
        "arithmetic_reward": arithmetic_reward,  # toy a+b: exact integer answer
        "reasoning_reward": reasoning_reward,  # toy step-by-step traces: `Answer: N`
        "accuracy_reward": accuracy_reward,  # math-verify against a `solution` column
        "think_format_reward": think_format_reward,  # <think>...</think> format
    }


def import_callable(name: str):
    """The function named ``module:function`` (or ``module.function``), importable from the working directory."""
    module, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), attr)


def get_reward_funcs(names: list[str] | None, default: str | None = "arithmetic_reward") -> list:
    """Reward functions by registry name or ``module:function`` (``module.function`` also works, as in TRL)."""
    registry = _toy_rewards()
    names = names or ([default] if default else [])
    if not names:
        raise ValueError(
            f"reward_funcs is empty; pass --reward_funcs with names from {sorted(registry)} or module:function."
        )
    funcs = []
    for name in names:
        if name in registry:
            funcs.append(registry[name])
        elif ":" in name or "." in name:
            funcs.append(import_callable(name))
        else:
            raise ValueError(
                f"reward_funcs entry {name!r} is unknown; use one of {sorted(registry)} or module:function."
            )
    return funcs


@dataclass
class ToyEval:
    """Greedy held-out accuracy on the toy task, out of the training path.

    ``task="arithmetic"``: a+b problems of the toy pretraining run's held-out set;
    ``task="reasoning"``: prompts of the step-by-step reasoning task the traces never contain.

    Example:
        ```py
        >>> evaluate = ToyEval("arithmetic", num_prompts=8)
        >>> accuracy = evaluate(model, tokenizer)
        ```
    """

    task: str = "arithmetic"
    num_prompts: int = 200
    seed: int = 0
    dataset: Dataset = field(init=False, repr=False)

    def __post_init__(self):
        from trl_ext.toy import make_reasoning_traces

        if self.task == "arithmetic":
            self.dataset = held_out_arithmetic(self.num_prompts)
        elif self.task == "reasoning":
            seed = HELD_OUT_REASONING_SEED + self.seed
            self.dataset = make_reasoning_traces(self.num_prompts, seed=seed, traces_per_prompt=1)
        else:
            raise ValueError(f"task={self.task!r} is unknown; use 'arithmetic' or 'reasoning'.")

    def __call__(self, model, tokenizer) -> float:
        from trl_ext.toy import arithmetic_accuracy, generation_accuracy, reasoning_reward

        if self.task == "arithmetic":
            return arithmetic_accuracy(model, tokenizer, self.dataset)
        return generation_accuracy(model, tokenizer, self.dataset, reasoning_reward, 48)


def held_out_arithmetic(n: int = HELD_OUT_ARITHMETIC["n"]) -> Dataset:
    """The first ``n`` held-out a+b problems (disjoint from the toy pretraining data); training data excludes them."""
    from trl_ext.toy import make_arithmetic_dataset

    full = make_arithmetic_dataset(
        max(n, HELD_OUT_ARITHMETIC["n"]),
        seed=HELD_OUT_ARITHMETIC["seed"],
        exclude=make_arithmetic_dataset(800, seed=0),
    )
    return full.select(range(n)) if n < len(full) else full


def toy_eval(script_args: ToyScriptArguments, task: str, seed: int = 0) -> ToyEval | None:
    """A :class:`ToyEval` when the run trains on toy data and asks for held-out prompts, else None."""
    if script_args.dataset_name or script_args.num_eval_prompts <= 0:
        return None
    return ToyEval(task, num_prompts=script_args.num_eval_prompts, seed=seed)


def resume_arg(training_args: TrainingArguments) -> bool | str | None:
    """``--resume_from_checkpoint`` for ``trainer.train``: a path, True (latest checkpoint in output_dir) or None."""
    value = training_args.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("true", "false", ""):
        return value.lower() == "true" or None
    return value


def train(trainer) -> None:
    """``trainer.train``, resuming from ``--resume_from_checkpoint`` when given."""
    trainer.train(resume_from_checkpoint=resume_arg(trainer.args))


def finish(trainer, script_args: ScriptArguments, results: dict) -> dict:
    """Save the model or adapter, push it to the Hub when asked, and add the log history to ``results``."""
    results["log_history"] = trainer.state.log_history
    trainer.save_model(trainer.args.output_dir)
    if trainer.args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return results
