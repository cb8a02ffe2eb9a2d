"""Time one SFT epoch with Q-Tuning against the stock ``SFTTrainer`` on the same data.

Used by ``benchmarks/qtuning_speed.py`` and the quickstart.

Example:
    ```py
    >>> from trl_ext.qtuning.timing import epoch_time
    >>> seconds, tokens = epoch_time(model_path, dataset, scoring="separate", sample_keep_ratio=0.25)
    ```
"""

from __future__ import annotations

import tempfile


def epoch_time(
    model_path: str,
    dataset,
    scoring: str | None = None,
    sample_keep_ratio: float = 0.25,
    token_keep_ratio: float = 0.5,
    batch: int = 32,
) -> tuple[float, int]:
    """Training-loop seconds (``train_runtime``) of one epoch, and tokens that went through forward+backward.

    ``scoring=None`` runs the stock ``SFTTrainer``; ``"reuse"`` or ``"separate"`` runs
    :class:`~trl_ext.QTuningSFTTrainer` at the given ratios.
    """
    from trl import SFTConfig, SFTTrainer

    from ..toy.args import toy_args
    from .config import QTuningConfig
    from .trainer import QTuningSFTTrainer

    common = dict(num_train_epochs=1, per_device_train_batch_size=batch, disable_tqdm=True, learning_rate=1e-4,
                  logging_steps=10_000, dataloader_drop_last=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        if scoring is None:
            trainer = SFTTrainer(model=model_path, args=toy_args(SFTConfig, out, **common), train_dataset=dataset)
        else:
            args = toy_args(QTuningConfig, out, scoring=scoring, sample_keep_ratio=sample_keep_ratio,
                            token_keep_ratio=token_keep_ratio, eu_record_steps=0, **common)  # fmt: skip
            trainer = QTuningSFTTrainer(model=model_path, args=args, train_dataset=dataset)
        output = trainer.train()
    return output.metrics["train_runtime"], trainer._total_train_tokens
