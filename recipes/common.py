"""What every recipe shares, in the order a recipe uses it.

Arguments (``ToyScriptArguments``, ``make_recipe_parser``) and their checks before any work
(``check_run``: a usable ``--output_dir``, no flag the recipe would ignore, a checkpoint to
resume that exists), the model and its tokenizer from TRL's ``ModelConfig`` (``load_model``),
the data (``resolve_dataset``), adapter targets per architecture (``default_target_modules``),
GRPO rewards by name (``get_reward_funcs``), the held-out toy evaluation (``ToyEval``), which
run wrote a checkpoint (``RunRecord``: recorded in every checkpoint, checked before a resume)
and the end of a run (``train``, ``finish``). With no ``--model_name_or_path`` and no
``--dataset_name`` a recipe runs on the embedded toy testbed.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from datasets import Dataset, load_dataset
from huggingface_hub import HfApi
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from peft_ext.hub import add_usage_to_model_card

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
        },
    )


def accelerator_available() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, ROCm, XPU, MPS, ...)."""
    return torch.accelerator.is_available()


class RecipeParser(TrlParser):
    """TRL's parser that also remembers which flags the command line and the ``--config`` YAML gave.

    A flag given with its default value (``--lora_r 16``) is still a flag the user set; :func:`check_run`
    refuses it where the recipe would ignore it. The names are stored on the first parsed object as
    ``given_flags``.
    """

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        args = list(args) if args is not None else sys.argv[1:]
        given = {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}
        if "--config" in args and args.index("--config") + 1 < len(args):
            import yaml

            with open(args[args.index("--config") + 1]) as f:
                config = yaml.safe_load(f)
            given |= set(config) - {"env"} if isinstance(config, dict) else set()
        fields = {f.name for cls in self.dataclass_types for f in dataclasses.fields(cls)}
        given = {g[3:] if g.startswith("no_") and g[3:] in fields else g for g in given} - {"config"}
        output = super().parse_args_and_config(args, *rest, **kwargs)
        output[0].given_flags = frozenset(given)
        return output


def make_recipe_parser(script_args_cls, config_cls, **defaults) -> TrlParser:
    """``TrlParser((script_args_cls, config_cls, ModelConfig))`` with ``--config`` YAML support.

    Without an accelerator, mixed precision defaults to off, since TRL's configs default to
    ``bf16=True`` and transformers refuses that on a CPU; on a GPU TRL's defaults apply.
    ``defaults`` are recipe defaults (e.g. ``dtype="bfloat16"``); flags and YAML override them.
    """
    parser = RecipeParser((script_args_cls, config_cls, ModelConfig))
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


def uses_deepspeed(training_args: TrainingArguments) -> bool:
    """Whether this run trains with DeepSpeed (``--deepspeed`` or ``accelerate launch`` with a DeepSpeed config)."""
    return bool(training_args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def refuse_deepspeed_stages(training_args: TrainingArguments, recipe: str, fix: str) -> None:
    """Refuse, before any training, a recipe that trains several trainers in one process under DeepSpeed.

    accelerate builds one DeepSpeed engine set-up per process: the second trainer's ``Accelerator`` raises
    (``You cannot pass in a deepspeed_plugin when creating a second Accelerator``) after the first one trained.
    """
    if uses_deepspeed(training_args):
        raise ValueError(
            f"{recipe} trains several models one after another in one process, which accelerate does not allow "
            f"under DeepSpeed (one DeepSpeed engine set-up per process). {fix}"
        )


@contextmanager
def whole_model(model, modify: bool = False):
    """``model`` with all its weights gathered under DeepSpeed ZeRO-3 (a collective: every process must enter);
    unchanged otherwise. Evaluation and analysis outside the trainer need this, as ZeRO-3 keeps each process's
    partition only. ``modify=True`` keeps in-place changes (e.g. a merge), written back from process 0."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield model


def model_path(model_args: ModelConfig) -> str:
    """``--model_name_or_path``, or the embedded pretrained toy model when it is not given."""
    if model_args.model_name_or_path:
        return model_args.model_name_or_path
    from peft_trl_testbed import pretrained_toy_model_path

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

    from peft_trl_testbed import arithmetic_reward, reasoning_reward

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
        from peft_trl_testbed import make_reasoning_traces

        if self.task == "arithmetic":
            self.dataset = held_out_arithmetic(self.num_prompts)
        elif self.task == "reasoning":
            seed = HELD_OUT_REASONING_SEED + self.seed
            self.dataset = make_reasoning_traces(self.num_prompts, seed=seed, traces_per_prompt=1)
        else:
            raise ValueError(f"task={self.task!r} is unknown; use 'arithmetic' or 'reasoning'.")

    def __call__(self, model, tokenizer) -> float:
        from peft_trl_testbed import arithmetic_accuracy, generation_accuracy, reasoning_reward

        with whole_model(model):  # under ZeRO-3 every process gathers the weights and evaluates
            if self.task == "arithmetic":
                return arithmetic_accuracy(model, tokenizer, self.dataset)
            return generation_accuracy(model, tokenizer, self.dataset, reasoning_reward, 48)


def held_out_arithmetic(n: int = HELD_OUT_ARITHMETIC["n"]) -> Dataset:
    """The first ``n`` held-out a+b problems (disjoint from the toy pretraining data); training data excludes them."""
    from peft_trl_testbed import make_arithmetic_dataset

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


def check_output_dir(path: str | os.PathLike) -> str:
    """Create ``--output_dir`` if needed; raise a ``ValueError`` naming the path and the problem if it is unusable.

    Refused: an existing file, a path below a file, a folder that cannot be created or written to.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError("--output_dir is empty; pass the folder to write the run to, e.g. --output_dir outputs/run.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"--output_dir {path!r} is an existing file, not a folder; pass a folder path (it is created if missing)."
        )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--output_dir {path!r} lies below {parent!r}, which is a file; pass a folder path.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output_dir {path!r} cannot be created: {err.strerror or err}.") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {path!r} is not writable; pass a folder you can write to.")
    return path


def flag_is_set(args, name: str, given: frozenset | set = frozenset()) -> bool:
    """Whether the flag ``name`` was given (on the command line or in YAML) or differs from its dataclass default."""
    if name in given:
        return True
    spec = next(f for f in dataclasses.fields(args) if f.name == name)
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    return getattr(args, name) != default


# Quantised loading (bitsandbytes) is for QMoRA in mora_sft; the recipes train on the training split only.
QUANTIZATION_FLAGS = (
    "load_in_8bit",
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "use_bnb_nested_quant",
    "bnb_4bit_quant_storage",
)
LORA_FLAGS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_parameters",
    "lora_modules_to_save",
    "lora_task_type",
    "use_rslora",
    "use_dora",
)


def ignored_flags(script_args, model_args: ModelConfig, lora: bool, quantized: bool = False) -> dict[str, str]:
    """The flags every recipe ignores, with the reason, given its data flags, whether it trains LoRA and whether it
    trains on a quantised base (``quantized``: mora_sft's QMoRA)."""
    if not quantized:
        reason = "only mora_sft trains on a quantised base (QMoRA); this recipe loads the model unquantised"
        ignored = dict.fromkeys(QUANTIZATION_FLAGS, reason)
    elif not model_args.load_in_4bit:
        reason = "it configures 4-bit loading, which is used only with --load_in_4bit true"
        ignored = dict.fromkeys(QUANTIZATION_FLAGS[2:], reason)
    else:
        ignored = {}
    ignored |= {
        "dataset_test_split": "the recipes train on the training split and evaluate on held-out toy prompts only",
        "dataset_streaming": "the recipes load --dataset_name in full",
        "ignore_bias_buffers": "it applies to TRL's DPO script only",
    }
    if not script_args.dataset_name:
        for name in ("dataset_config", "dataset_train_split"):
            ignored[name] = "it has no effect without --dataset_name"
    elif getattr(script_args, "num_eval_prompts", 0) > 0:
        ignored["num_eval_prompts"] = "the held-out evaluation runs on the toy data only (pass 0, or drop the flag)"
    if lora and not model_args.use_peft:
        ignored |= {name: "it configures LoRA, which is trained only with --use_peft true" for name in LORA_FLAGS}
    elif not lora:
        ignored |= {name: "this recipe does not train LoRA" for name in ("use_peft", *LORA_FLAGS)}
    return ignored


def refuse_ignored_flags(recipe: str, ignored: dict[str, str], *parsed) -> None:
    """Raise a ``ValueError`` naming the first flag in ``ignored`` that one of the ``parsed`` objects sets."""
    given = getattr(parsed[0], "given_flags", frozenset())
    for args in parsed:
        names = {f.name for f in dataclasses.fields(args)}
        for name, reason in ignored.items():
            if name in names and flag_is_set(args, name, given):
                raise ValueError(
                    f"{recipe}: --{name} {getattr(args, name)!r} would be ignored: {reason}. Remove the flag."
                )


def resume_checkpoint(training_args: TrainingArguments, output_dir: str | None = None) -> str | None:
    """The checkpoint ``--resume_from_checkpoint`` names: a path (which must exist), the latest
    ``checkpoint-*`` in ``output_dir`` for ``true``, or None."""
    value = resume_arg(training_args)
    if not value:
        return None
    if value is True:
        output_dir = output_dir or training_args.output_dir
        found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if found is None:
            raise ValueError(
                f"--resume_from_checkpoint true, but {output_dir!r} holds no {PREFIX_CHECKPOINT_DIR}-* folder to resume "
                "from; pass a checkpoint path, or start without --resume_from_checkpoint."
            )
        return found
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a folder; pass a checkpoint-* folder or true.")
    return value


def check_run(
    recipe: str,
    script_args,
    training_args: TrainingArguments,
    model_args: ModelConfig,
    lora: bool,
    ignored: dict[str, str] | None = None,
    quantized: bool = False,
) -> None:
    """The checks every recipe makes before any work: mixed precision on CPU (:func:`cpu_guard`), a usable
    ``--output_dir``, no flag the recipe would ignore (the common ones and ``ignored``), a checkpoint to resume."""
    cpu_guard(training_args)
    refuse_ignored_flags(
        recipe,
        ignored_flags(script_args, model_args, lora, quantized) | (ignored or {}),
        script_args,
        training_args,
        model_args,
    )
    check_output_dir(training_args.output_dir)


# ----------------------------------------------------------------------------- which run wrote a checkpoint
RECORD_FILE = "recipe.json"
_RUNTIME_KEYS = {"auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}


def _plain(value):
    """A JSON-ready, order-independent form of a config value (sets sorted, enums by value, objects by type)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"<{type(value).__name__}>"  # e.g. SUBNET's masks given as tensors: compared by kind only


def adapter_record(config) -> dict | None:
    """The settings of a PEFT adapter config that shape its weights and training (None for full fine-tuning)."""
    if config is None:
        return None
    return {k: _plain(v) for k, v in sorted(config.to_dict().items()) if k not in _RUNTIME_KEYS}


@dataclass
class RunRecord:
    """Which recipe, method and adapter wrote a checkpoint; saved as ``recipe.json`` in each one.

    Example:
        ```py
        >>> record = RunRecord("mora_sft", "MoRA SFT", adapter=adapter_record(mora_config))
        >>> record.check_resume(training_args)  # before training: refuses another run's checkpoint
        >>> trainer = SFTTrainer(..., callbacks=[record.callback()])
        ```
    """

    recipe: str
    method: str
    adapter: dict | None = None

    def describe(self) -> str:
        adapter = f"{self.adapter['peft_type']} adapter" if self.adapter else "full fine-tuning"
        return f"recipe {self.recipe} ({self.method}, {adapter})"

    def save(self, folder: str | os.PathLike) -> None:
        with open(os.path.join(folder, RECORD_FILE), "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> RunRecord | None:
        path = os.path.join(folder, RECORD_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            data = json.load(f)
        return cls(**{k: data.get(k) for k in ("recipe", "method", "adapter")})

    def check(self, checkpoint: str | os.PathLike, compare_adapter: bool = True) -> None:
        """Raise a ``ValueError`` naming both runs unless ``checkpoint`` was written by this recipe, method and
        (with ``compare_adapter``) adapter config."""
        saved = RunRecord.load(checkpoint)
        if saved is None:
            raise ValueError(
                f"Cannot resume from {os.fspath(checkpoint)!r}: it has no {RECORD_FILE}, so it was not written by a "
                f"recipe of this package (or by an older version), and this run is {self.describe()}. Resume only a "
                "checkpoint this recipe wrote, or start without --resume_from_checkpoint."
            )
        other_kind = compare_adapter and bool(saved.adapter) != bool(self.adapter)
        if (saved.recipe, saved.method) != (self.recipe, self.method) or other_kind:
            raise ValueError(
                f"Cannot resume from {os.fspath(checkpoint)!r}: it was written by {saved.describe()}, but this run is "
                f"{self.describe()}. Continue it with `python -m recipes.{saved.recipe}`, or start this run without "
                "--resume_from_checkpoint (or in another --output_dir)."
            )
        if compare_adapter and saved.adapter != self.adapter:
            keys = sorted(set(saved.adapter) | set(self.adapter))
            diff = "; ".join(
                f"{k}: {saved.adapter.get(k)!r} in the checkpoint, {self.adapter.get(k)!r} now"
                for k in keys
                if saved.adapter.get(k) != self.adapter.get(k)
            )
            raise ValueError(
                f"Cannot resume from {os.fspath(checkpoint)!r}: its {saved.adapter['peft_type']} adapter config differs "
                f"from this run's ({diff}). Resume with the checkpoint's settings, or start a new run in another "
                "--output_dir."
            )

    def check_resume(self, training_args: TrainingArguments, output_dir: str | None = None) -> str | None:
        """The checkpoint to resume (see :func:`resume_checkpoint`), checked with :meth:`check`; None if not resuming."""
        checkpoint = resume_checkpoint(training_args, output_dir)
        if checkpoint is not None:
            self.check(checkpoint)
        return checkpoint

    def callback(self) -> TrainerCallback:
        """A callback that writes this record into every checkpoint the trainer saves."""
        return _RecordCallback(self)


class _RecordCallback(TrainerCallback):
    def __init__(self, record: RunRecord):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            self.record.save(folder)


def resume_arg(training_args: TrainingArguments) -> bool | str | None:
    """``--resume_from_checkpoint`` for ``trainer.train``: a path, True (latest checkpoint in output_dir) or None."""
    value = training_args.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("true", "false", ""):
        return value.lower() == "true" or None
    return value


def train(trainer, checkpoint: str | None = None) -> None:
    """``trainer.train``, resuming from ``checkpoint`` (checked by :meth:`RunRecord.check_resume`) when given."""
    trainer.train(resume_from_checkpoint=checkpoint)


def save_model(trainer, output_dir: str) -> None:
    """``trainer.save_model(output_dir)``; an adapter of a ``peft_ext`` type gets its card's loading instructions."""
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        model_id = trainer.hub_model_id if trainer.args.push_to_hub else None
        add_usage_to_model_card(output_dir, trainer.model, model_id=model_id)


def push_to_hub(trainer, dataset_name: str | None) -> None:
    """``trainer.push_to_hub``, then, for an adapter of a ``peft_ext`` type, its card with the loading instructions.

    Trainer.push_to_hub uploads the card that TRL writes, which does not say that loading the adapter needs
    ``peft_ext``; the section is added to that card and the card uploaded again, in a second commit.
    """
    trainer.push_to_hub(dataset_name=dataset_name)
    folder = trainer.args.output_dir
    revision = getattr(trainer.args, "hub_revision", None)
    on_main = trainer.is_world_process_zero()
    if on_main and add_usage_to_model_card(folder, trainer.model, trainer.hub_model_id, revision=revision):
        HfApi().upload_file(
            path_or_fileobj=os.path.join(folder, "README.md"),
            path_in_repo="README.md",
            repo_id=trainer.hub_model_id,
            token=trainer.args.hub_token,
            revision=revision,
            commit_message="Add how to load this adapter",
        )


def finish(trainer, script_args: ScriptArguments, results: dict, record: RunRecord | None = None) -> dict:
    """Save the model or adapter (and ``record``), push it to the Hub when asked, add the log history to ``results``."""
    results["log_history"] = trainer.state.log_history
    save_model(trainer, trainer.args.output_dir)
    if record is not None and trainer.is_world_process_zero():
        record.save(trainer.args.output_dir)
    if trainer.args.push_to_hub:
        push_to_hub(trainer, script_args.dataset_name)
    return results
