"""Configuration of the shared-prefix preference trainers."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

# Prompt/completion token ratio from which the packed step was faster than the stock one at every measured point
# (benchmarks/results/prefix_sharing_dpo.txt, "crossing": P/R >= 1; below it, at P/R <= 1/4, some points were slower
# and used more memory); below it the stock forward runs.
DEFAULT_MIN_PROMPT_RATIO = 1.0


@dataclass
class PrefixSharingArguments:
    """The two knobs of the shared-prefix forward, shared by [`PrefixSharingDPOConfig`] and
    [`~trl_ext.REDIConfig`] (documented in their docstrings)."""

    prefix_sharing: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to encode each prompt once for its chosen and rejected completions (policy and reference "
            "forwards). True requires it (models it cannot run exactly are refused), None uses it where it runs "
            "exactly and the stock forward elsewhere, False runs exactly the stock trainer."
        },
    )
    prefix_sharing_min_prompt_ratio: float = field(
        default=DEFAULT_MIN_PROMPT_RATIO,
        metadata={
            "help": "Pack a batch only when its prompt tokens are at least this many times its completion tokens "
            "(where sharing is measured to pay); 0 packs every batch that shares a prompt."
        },
    )

    def _check_prefix_sharing(self) -> None:
        if self.prefix_sharing is not None and not isinstance(self.prefix_sharing, bool):
            raise ValueError(f"prefix_sharing={self.prefix_sharing!r} must be True, False or None (automatic).")
        ratio = self.prefix_sharing_min_prompt_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 0:
            raise ValueError(
                f"prefix_sharing_min_prompt_ratio={ratio!r} must be a number >= 0: the prompt/completion token ratio "
                f"from which batches are packed (default {DEFAULT_MIN_PROMPT_RATIO}; 0 packs every batch)."
            )


@dataclass
class PrefixSharingDPOConfig(PrefixSharingArguments, DPOConfig):
    r"""
    Configuration class for the [`PrefixSharingDPOTrainer`]: every [`~trl.DPOConfig`] parameter, plus the knobs of
    the shared-prefix forward. The trainer also accepts a plain [`~trl.DPOConfig`], which behaves like this class with
    its defaults.

    Parameters:
        > Parameters that control the shared-prefix forward

        prefix_sharing (`bool` or `None`, *optional*, defaults to `True`):
            Whether to compute the policy and reference log-probs with one packed row per prompt, ``[prompt; chosen;
            rejected]``, encoding the prompt once instead of once per completion. With `True`, a model or option the
            packed forward cannot run exactly is refused when the trainer is built. With `None` such a run falls back
            to the stock forward, with a warning. With `False` the trainer computes exactly what
            [`~trl.DPOTrainer`] computes, the stock way.
        prefix_sharing_min_prompt_ratio (`float`, *optional*, defaults to `1.0`):
            A batch is packed only when its prompt tokens are at least this many times its completion tokens. Short
            prompts save less than the packing costs; the default is the crossing point measured by
            `benchmarks/prefix_sharing_dpo.py`. `0` packs every batch in which some prompt is shared.

    Example:
        ```py
        >>> from trl_ext import PrefixSharingDPOConfig
        >>> args = PrefixSharingDPOConfig(output_dir="out", beta=0.1, prefix_sharing_min_prompt_ratio=0.0)
        ```
    """

    prefix_sharing: bool | None = field(
        default=True,
        metadata={
            "help": "Whether to encode each prompt once for its chosen and rejected completions (policy and reference "
            "forwards). True requires it, None uses it where it runs exactly, False runs exactly the stock trainer."
        },
    )

    def __post_init__(self):
        self._check_prefix_sharing()
        super().__post_init__()
