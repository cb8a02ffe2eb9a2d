"""Configuration of the Prefix Grouper GRPO trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig


@dataclass
class PrefixGrouperGRPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`PrefixGrouperGRPOTrainer`]: every [`~trl.GRPOConfig`] parameter, plus the knobs
    of the shared-prefix forward. The trainer also accepts a plain [`~trl.GRPOConfig`], which behaves like this class
    with its defaults.

    Parameters:
        > Parameters that control the shared-prefix forward

        prefix_grouper (`bool`, *optional*, defaults to `True`):
            Whether to compute the per-token log-probs (policy, old and reference) with one packed row per group of
            completions that share a prompt, encoding the prompt once. With `False` the trainer computes exactly what
            [`~trl.GRPOTrainer`] computes, the stock way, which is handy for side-by-side comparisons.
        prefix_grouper_max_completions (`int` or `None`, *optional*, defaults to `None`):
            Largest number of completions packed behind one copy of a prompt. Larger groups are split into several
            rows, each repeating the prompt. `None` uses the number of rows TRL scores per forward
            (`per_device_train_batch_size` for the old and reference log-probs, the whole local batch for the loss),
            so a packed forward never holds more completions than the stock one.

        > Parameters whose default differs from [`~trl.GRPOConfig`]

        disable_dropout (`bool`, *optional*, defaults to `True`):
            Whether to switch off the model's dropout modules. The trainer refuses a model whose forward is random in
            training mode (completions would share one dropout mask on their prompt, where the stock rows draw one
            each), so dropout is off by default here, as in [`~trl.DPOConfig`].

    Example:
        ```py
        >>> from trl_ext import PrefixGrouperGRPOConfig
        >>> args = PrefixGrouperGRPOConfig(output_dir="out", num_generations=8, prefix_grouper_max_completions=16)
        ```
    """

    prefix_grouper: bool = field(
        default=True,
        metadata={"help": "Whether to compute the log-probs with the shared-prefix forward (one row per prompt)."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Whether to disable dropout in the model (the grouped forward needs a deterministic one)."},
    )
    prefix_grouper_max_completions: int | None = field(
        default=None,
        metadata={
            "help": "Largest number of completions packed behind one copy of a prompt; `None` uses the number of "
            "rows TRL scores per forward."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.prefix_grouper_max_completions is not None and self.prefix_grouper_max_completions < 1:
            raise ValueError(
                f"prefix_grouper_max_completions={self.prefix_grouper_max_completions} must be a positive number of "
                "completions, or None to follow TRL's per-forward batch."
            )
