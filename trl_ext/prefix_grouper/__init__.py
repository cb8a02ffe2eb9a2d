"""Prefix Grouper: shared-prefix forward for GRPO, as a drop-in `trl.GRPOTrainer` subclass.

The per-token log-probs of the ``G`` completions of a prompt are computed on one packed row, encoding the prompt
once (see :mod:`.layout` for the row and :mod:`.attention` for the split attention).

Example:
    ```py
    >>> from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer  # instead of GRPOConfig, GRPOTrainer
    >>> from peft_trl_testbed import arithmetic_reward, make_arithmetic_dataset, toy_args, toy_model_path
    >>> args = toy_args(PrefixGrouperGRPOConfig, "out", max_steps=1, per_device_train_batch_size=8, num_generations=8)
    >>> trainer = PrefixGrouperGRPOTrainer(model=toy_model_path(), reward_funcs=arithmetic_reward, args=args,
    ...                                    train_dataset=make_arithmetic_dataset(16))
    >>> trainer.train()
    ```
"""

from .. import _supported  # noqa: F401  (refuses unsupported upstream releases before TRL is imported)
from .attention import (
    GroupedAttentionLayout,
    install_grouped_attention,
    materialized_split_attention,
    register_grouped_attention,
    split_attention,
)
from .config import PrefixGrouperGRPOConfig
from .layout import PackedGroups, attention_allowed, chunk_groups, find_groups, pack_groups, split_groups, ungroup
from .trainer import PrefixGrouperGRPOTrainer

__all__ = [
    "GroupedAttentionLayout",
    "PackedGroups",
    "PrefixGrouperGRPOConfig",
    "PrefixGrouperGRPOTrainer",
    "attention_allowed",
    "chunk_groups",
    "find_groups",
    "install_grouped_attention",
    "materialized_split_attention",
    "pack_groups",
    "register_grouped_attention",
    "split_attention",
    "split_groups",
    "ungroup",
]
