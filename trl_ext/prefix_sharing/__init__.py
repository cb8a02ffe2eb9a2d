"""Prefix sharing for preference training: DPO and REDI encode each prompt once for chosen and rejected.

The preference rows of one prompt are packed as a Prefix Grouper group of two completions (see :mod:`.pairs`) and
scored with its split attention; the outputs come back in the stock layout (see :mod:`.forward`), so TRL's own DPO
code computes every loss type, the reference log-ratios and the metrics.

Example:
    ```py
    >>> from trl_ext import PrefixSharingDPOConfig, PrefixSharingDPOTrainer  # instead of DPOConfig, DPOTrainer
    >>> from peft_trl_testbed import make_reasoning_preferences, pretrained_toy_model_path, toy_args
    >>> args = toy_args(PrefixSharingDPOConfig, "out", max_steps=1)
    >>> trainer = PrefixSharingDPOTrainer(model=pretrained_toy_model_path(), args=args,
    ...                                   train_dataset=make_reasoning_preferences(16))
    >>> trainer.train()
    ```
"""

from .. import _supported  # noqa: F401  (refuses unsupported upstream releases before TRL is imported)
from .config import DEFAULT_MIN_PROMPT_RATIO, PrefixSharingArguments, PrefixSharingDPOConfig
from .forward import SharingRule, install_prefix_sharing
from .pairs import PackedPairs, pack_pairs, unpack
from .trainer import PrefixSharingDPOTrainer, PrefixSharingMixin, check_pair_prompts

__all__ = [
    "DEFAULT_MIN_PROMPT_RATIO",
    "PackedPairs",
    "PrefixSharingArguments",
    "PrefixSharingDPOConfig",
    "PrefixSharingDPOTrainer",
    "PrefixSharingMixin",
    "SharingRule",
    "check_pair_prompts",
    "install_prefix_sharing",
    "pack_pairs",
    "unpack",
]
