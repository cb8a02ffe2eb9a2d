"""Configuration of :class:`~trl_ext.redi.REDITrainer`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl import DPOConfig


@dataclass
class REDIConfig(DPOConfig):
    r"""Configuration for [`REDITrainer`], a subclass of TRL's [`~trl.DPOConfig`].

    All DPO arguments are accepted. REDI replaces the DPO loss with

    $$L = -\frac{\log\pi(y_w|x)}{|y_w|} + \alpha\,\frac{\log\pi(y_l|x)}{|y_l|}$$

    so the reference-model arguments (``beta``, ``loss_type``, ``precompute_ref_log_probs``,
    ``sync_ref_model``, ``ld_alpha``, ``f_divergence_type``, ``use_weighting``) are not used.

    Parameters:
        redi_alpha (`float`, *optional*, defaults to `0.8`):
            Weight of the rejected (incorrect) trace's normalised log-likelihood, in ``[0, 1]``.
            ``0`` is length-normalised SFT on the chosen traces; ``1`` is the symmetric objective,
            which tends to collapse (a warning is raised above ``0.9``). The paper uses ``0.8``
            with ``learning_rate=1e-6`` after an SFT stage.

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
