"""CPU-friendly TRL configs for the toy testbed.

TRL's configs default to ``bf16=True`` and gradient checkpointing, which a CPU-only machine
rejects or does not need. :func:`toy_args` builds any TRL config class with defaults that
suit tiny models on CPU, and lets every field be overridden.
"""

from __future__ import annotations

TOY_DEFAULTS = dict(
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    dataloader_num_workers=0,
    dataloader_pin_memory=False,
    seed=0,
)


def toy_args(config_cls, output_dir: str, **overrides):
    """Instantiate ``config_cls`` (e.g. ``trl.SFTConfig``) with CPU defaults plus ``overrides``.

    Example:
        ```py
        >>> from trl import SFTConfig
        >>> args = toy_args(SFTConfig, "out", max_steps=10, learning_rate=1e-3)
        ```
    """
    return config_cls(output_dir=str(output_dir), **{**TOY_DEFAULTS, **overrides})
