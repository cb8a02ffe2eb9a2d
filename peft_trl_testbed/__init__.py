"""The offline toy testbed shared by tests, recipes and benchmarks.

Tiny random causal LMs (Llama, Qwen2, GPT-2) saved like Hub repos, a local character-level
tokenizer with a chat template, synthetic datasets with verifiable answers, and a cached
arithmetic pretraining run. Nothing here downloads anything.

Example:
    ```py
    >>> from transformers import AutoModelForCausalLM
    >>> from peft_trl_testbed import make_arithmetic_dataset, arithmetic_reward, pretrained_toy_model_path
    >>> model = AutoModelForCausalLM.from_pretrained(pretrained_toy_model_path(arch="llama"))
    >>> train = make_arithmetic_dataset(256)
    ```
"""

from .args import TOY_DEFAULTS, toy_args
from .data import (
    DEFAULT_MAX_OPERAND,
    arithmetic_reward,
    check_reasoning_answer,
    extract_int,
    make_arithmetic_dataset,
    make_mixed_quality_sft,
    make_reasoning_preferences,
    make_reasoning_traces,
    make_uuid_dataset,
    reasoning_reward,
    uuid_char_accuracy,
)
from .models import (
    ARCHITECTURES,
    ToyModelSpec,
    build_toy_model,
    build_toy_moe_model,
    cache_dir,
    save_toy_model,
    toy_model_path,
)
from .pretrain import (
    PretrainConfig,
    arithmetic_accuracy,
    generation_accuracy,
    load_pretrained_toy,
    pretrain_datasets,
    pretrain_metrics,
    pretrain_toy_model,
    pretrained_toy_model_path,
)
from .teacher import TeacherConfig, teacher_metrics, toy_teacher_path, train_toy_teacher
from .tokenizer import CHAT_TEMPLATE, build_toy_tokenizer

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "DEFAULT_MAX_OPERAND",
    "PretrainConfig",
    "TeacherConfig",
    "TOY_DEFAULTS",
    "ToyModelSpec",
    "arithmetic_accuracy",
    "arithmetic_reward",
    "build_toy_model",
    "build_toy_tokenizer",
    "cache_dir",
    "check_reasoning_answer",
    "extract_int",
    "generation_accuracy",
    "load_pretrained_toy",
    "make_arithmetic_dataset",
    "make_mixed_quality_sft",
    "make_reasoning_preferences",
    "make_reasoning_traces",
    "make_uuid_dataset",
    "pretrain_datasets",
    "pretrain_metrics",
    "pretrain_toy_model",
    "pretrained_toy_model_path",
    "reasoning_reward",
    "save_toy_model",
    "teacher_metrics",
    "toy_args",
    "toy_model_path",
    "toy_teacher_path",
    "train_toy_teacher",
    "uuid_char_accuracy",
]
