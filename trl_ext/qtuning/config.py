"""Configuration of :class:`~trl_ext.qtuning.QTuningSFTTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

SCORING_MODES = ("reuse", "separate")


@dataclass
class QTuningConfig(SFTConfig):
    r"""Configuration for [`QTuningSFTTrainer`], a subclass of TRL's [`~trl.SFTConfig`].

    All SFT arguments are accepted. Q-Tuning prunes every training mini-batch (per process and per
    gradient-accumulation micro-batch) to ``round(sample_keep_ratio * B)`` samples chosen on the
    Error-Uncertainty plane, then prunes tokens of the "misconception" samples until the batch keeps
    ``sample_keep_ratio * token_keep_ratio`` of its response tokens. The loss is the mean NLL over kept
    tokens. Evaluation is never pruned.

    Parameters:
        sample_keep_ratio (`float`, *optional*, defaults to `0.25`):
            Fraction of each mini-batch's samples that are trained on, in ``(0, 1]``. The paper's headline
            setting is ``0.25`` with ``token_keep_ratio=0.5``.
        token_keep_ratio (`float`, *optional*, defaults to `0.5`):
            In ``(0, 1]``. The batch keeps ``sample_keep_ratio * token_keep_ratio`` of all its response tokens
            (dropped samples' tokens count toward the total); only kept high-perplexity, low-entropy (Q2)
            samples lose tokens. ``1.0`` disables token pruning.
        neighbor_lambda (`float`, *optional*, defaults to `0.5`):
            Weight of the neighbours in the token score
            :math:`s_i = (1-\lambda)\,\mathrm{PPL}_i + \lambda\,(\mathrm{PPL}_{i-1} + \mathrm{PPL}_{i+1})`, in ``[0, 1]``.
        scoring (`str`, *optional*, defaults to `"separate"`):
            How the batch is scored. ``"reuse"`` is the paper's procedure: the training forward's outputs
            score the batch and the loss is masked to kept samples and tokens (no compute saved).
            ``"separate"`` scores with a forward pass without gradient, then runs forward and backward on the
            kept samples only (padding trimmed); pruned tokens stay as context but get no loss. Both give the
            same selection and loss when the model has no active dropout (a Mixture-of-Experts model's
            load-balancing loss is over the rows forwarded: the whole batch, or the kept samples);
            ``"separate"`` is cheaper when ``sample_keep_ratio`` is small.
        eu_record_steps (`int`, *optional*, defaults to `1000`):
            The trainer keeps the EU-plane scores of the last this-many training micro-batches in
            ``trainer.eu_records`` for :meth:`~trl_ext.qtuning.QTuningSFTTrainer.plot_eu_plane`; ``0`` records nothing.

    Example:
        ```py
        >>> from trl_ext import QTuningConfig
        >>> args = QTuningConfig(output_dir="qtuning", sample_keep_ratio=0.25, token_keep_ratio=0.5)
        ```
    """

    sample_keep_ratio: float = field(
        default=0.25,
        metadata={"help": "Fraction of each mini-batch's samples trained on, in (0, 1] (paper: 0.25)."},
    )
    token_keep_ratio: float = field(
        default=0.5,
        metadata={"help": "Fraction of the kept samples' response tokens kept, in (0, 1] (paper: 0.5)."},
    )
    neighbor_lambda: float = field(
        default=0.5,
        metadata={"help": "Weight of the two neighbours' perplexities in the token score, in [0, 1] (paper: 0.5)."},
    )
    scoring: str = field(
        default="separate",
        metadata={
            "help": "'reuse': score with the training forward and mask the loss (the paper's procedure); "
            "'separate': score without gradient, then train on the kept samples only (saves compute).",
            "choices": list(SCORING_MODES),
        },
    )
    eu_record_steps: int = field(
        default=1000,
        metadata={"help": "Keep the EU-plane scores of this many recent micro-batches for plotting (0: none)."},
    )

    def __post_init__(self):
        for name in ("sample_keep_ratio", "token_keep_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(
                    f"{name}={value!r} is outside (0, 1]. It is a fraction of each batch to keep, e.g. "
                    "sample_keep_ratio=0.25, token_keep_ratio=0.5 (the paper's setting); 1.0 disables that pruning."
                )
        lam = self.neighbor_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"neighbor_lambda={lam!r} is outside [0, 1]; use 0.5 (the paper's setting).")
        if self.scoring not in SCORING_MODES:
            raise ValueError(
                f"scoring={self.scoring!r} is not a Q-Tuning scoring mode; choose 'reuse' (the paper's loss masking) "
                "or 'separate' (a no-grad scoring pass, then training on the kept samples only)."
            )
        if (
            isinstance(self.eu_record_steps, bool)
            or not isinstance(self.eu_record_steps, int)
            or self.eu_record_steps < 0
        ):
            raise ValueError(
                f"eu_record_steps={self.eu_record_steps!r} must be a non-negative integer (0 records nothing)."
            )
        super().__post_init__()
        if self.packing and self.packing_strategy == "wrapped":
            raise ValueError(
                "packing=True with packing_strategy='wrapped' cuts samples across rows and lets them attend to each "
                "other, so Q-Tuning cannot score whole samples. Use packing_strategy='bfd' (the default) or "
                "packing=False."
            )
