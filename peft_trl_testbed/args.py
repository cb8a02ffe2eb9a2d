"""CPU-friendly TRL configs for the toy testbed.

TRL's configs default to ``bf16=True`` and activation (gradient) checkpointing, which a CPU-only
machine rejects or does not need. :func:`toy_args` builds any TRL config class with defaults that
suit tiny models on CPU, and lets every field be overridden.
"""

from __future__ import annotations

# TrainingArguments renamed these fields (in every supported transformers the old names warn and lose to the new)
RENAMED = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}

TOY_DEFAULTS = dict(
    bf16=False,
    activation_checkpointing=False,
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
    for old, new in RENAMED.items():  # an override under the old name must not lose to the new-name default
        if old in overrides:
            if new in overrides and overrides[new] != overrides[old]:
                raise ValueError(f"{old}={overrides[old]!r} and {new}={overrides[new]!r} disagree; pass only {new}.")
            overrides[new] = overrides.pop(old)
    return config_cls(output_dir=str(output_dir), **{**TOY_DEFAULTS, **overrides})
