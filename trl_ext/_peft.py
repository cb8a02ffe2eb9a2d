"""Checks of the PEFT adapters a trainer is given, shared by this package's trainers."""

from __future__ import annotations


def refuse_prompt_learning(model, peft_config, trainer_name: str, reason: str) -> None:
    """Raise before training when the adapter is a prompt-learning one (prompt tuning, prefix tuning, P-tuning).

    Checks ``peft_config`` (the trainer's argument) or, without one, the adapters of a model that is
    already a ``PeftModel``. ``reason`` says why the trainer's method cannot use such adapters.

    Example:
        ```py
        >>> refuse_prompt_learning(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        ...                        "QTuningSFTTrainer", "it scores each sample's own tokens")  # raises ValueError
        ```
    """
    configs = [("peft_config", peft_config)] if peft_config is not None else []
    if peft_config is None and isinstance(getattr(model, "peft_config", None), dict):
        configs = [(f"the model's adapter {name!r}", config) for name, config in model.peft_config.items()]
    for where, config in configs:
        if getattr(config, "is_prompt_learning", False):
            kind = getattr(config.peft_type, "value", config.peft_type)
            raise ValueError(
                f"{where} is a {type(config).__name__} (peft_type={kind}), a prompt-learning adapter, which "
                f"{trainer_name} does not support: {reason}. Use an adapter that changes weights (LoRA, MoRA, SUBNET "
                "or another PEFT tuner type) or full fine-tuning (peft_config=None)."
            )
