"""Configuration of :class:`~trl_ext.redi.REDITrainer`."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from trl import DPOConfig

from ..prefix_sharing.config import PrefixSharingArguments


@dataclass
class REDIConfig(PrefixSharingArguments, DPOConfig):
    r"""Configuration for [`REDITrainer`], a subclass of TRL's [`~trl.DPOConfig`].

    All DPO arguments are accepted except those of DPO's loss and reference model. REDI replaces
    the DPO loss with

    $$L = -\frac{\log\pi(y_w|x)}{|y_w|} + \alpha\,\frac{\log\pi(y_l|x)}{|y_l|}$$

    so the DPO-only arguments (``beta``, ``loss_type``, ``loss_weights``, ``label_smoothing``,
    ``precompute_ref_log_probs``, ``precompute_ref_batch_size``, ``sync_ref_model``,
    ``ref_model_mixup_alpha``, ``ref_model_sync_steps``, ``ld_alpha``, ``f_divergence_type``,
    ``f_alpha_divergence_coef``, ``discopop_tau``, ``use_weighting``) are not used; setting one of
    them to anything but its default raises a ``ValueError`` naming it.

    Parameters:
        redi_alpha (`float`, *optional*, defaults to `0.8`):
            Weight of the rejected (incorrect) trace's normalised log-likelihood, in ``[0, 1]``.
            ``0`` is length-normalised SFT on the chosen traces; ``1`` is the symmetric objective,
            which tends to collapse (a warning is raised above ``0.9``). The paper uses ``0.8``
            with ``learning_rate=1e-6`` after an SFT stage.
        prefix_sharing (`bool` or `None`, *optional*, defaults to `None`):
            Whether to encode each prompt once for its chosen and rejected traces (one packed row per prompt, see
            [`~trl_ext.PrefixSharingDPOTrainer`]). `None` does where the packed forward runs exactly (its
            construction-time self-check passes) and falls back to the stock forward with a warning elsewhere;
            `True` refuses such a model instead; `False` runs the stock forward.
        prefix_sharing_min_prompt_ratio (`float`, *optional*, defaults to `1.0`):
            Pack a batch only when its prompt tokens are at least this many times its completion tokens, where
            sharing is measured to pay (`benchmarks/prefix_sharing_dpo.py`); `0` packs every batch.

    Example:
        ```py
        >>> from trl_ext import REDIConfig
        >>> args = REDIConfig(output_dir="redi", redi_alpha=0.8, learning_rate=1e-6)
        ```
    """

    redi_alpha: float = field(
        default=0.8,
        metadata={"help": "Weight of the rejected trace's normalised log-likelihood, in [0, 1] (paper: 0.8)."},
    )

    def __post_init__(self):
        self._check_prefix_sharing()
        if isinstance(self.redi_alpha, bool):
            raise ValueError(
                f"redi_alpha={self.redi_alpha!r} is a bool, not a weight; pass a number in [0, 1], e.g. redi_alpha=0.8."
            )
        if not isinstance(self.redi_alpha, (int, float)) or not 0.0 <= self.redi_alpha <= 1.0:
            raise ValueError(
                f"redi_alpha={self.redi_alpha!r} is outside [0, 1]. Use 0.8 (the paper's setting); 0 is plain SFT on "
                "the chosen traces and 1 the symmetric objective."
            )
        if self.redi_alpha > 0.9:
            warnings.warn(
                f"redi_alpha={self.redi_alpha} is in the collapse regime: with alpha near 1 the objective is symmetric "
                "and training tends to push both log-likelihoods down. Consider redi_alpha=0.8.",
                UserWarning,
                stacklevel=3,
            )
        super().__post_init__()
        changed = [name for name in DPO_ONLY_OPTIONS if getattr(self, name) != _dpo_default(name)]
        if changed:
            shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in changed)
            raise ValueError(
                f"REDIConfig got {shown}, but REDI has no reference model, no beta and its own loss, so "
                f"{'this DPO option' if len(changed) == 1 else 'these DPO options'} would be silently ignored. Remove "
                f"{', '.join(changed)} (REDI's only loss knob is redi_alpha), or use trl.DPOTrainer for DPO."
            )


# DPO options that REDI's loss and its missing reference model leave unused.
DPO_ONLY_OPTIONS = (
    "beta",
    "loss_type",
    "loss_weights",
    "label_smoothing",
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "discopop_tau",
    "use_weighting",
)


def _dpo_default(name: str):
    """DPOConfig's default of ``name``, normalised as DPOConfig.__post_init__ normalises it."""
    spec = next(f for f in dataclasses.fields(DPOConfig) if f.name == name)
    value = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    return [value] if name == "loss_type" and isinstance(value, str) else value
