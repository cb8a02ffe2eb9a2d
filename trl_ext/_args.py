"""Turning a plain TRL/transformers config into a method's config, as TRL's trainers do."""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from ._compat import unmask_tokens


def convert_args(args, config_cls, trainer_name: str, carry: type | None = None, **overrides):
    """``args`` as an instance of ``config_cls`` (a subclass of ``args``' class, e.g. ``SFTConfig`` -> ``QTuningConfig``).

    Every value of ``args`` is carried over, as ``SFTTrainer`` does with a plain ``TrainingArguments``;
    the fields ``config_cls`` adds keep their defaults (the method's defaults, e.g. ``redi_alpha=0.8``).
    Anything that is not a ``TrainingArguments`` is refused with a ``TypeError``. ``carry`` limits what is
    carried over to its fields: ``carry=TrainingArguments`` between sibling configs (``DPOConfig`` ->
    ``SFTConfig``), whose same-named fields such as ``loss_type`` mean different things. ``overrides``
    replace carried-over values before ``config_cls`` checks them (e.g. a derived stage's ``output_dir``).
    """
    if isinstance(args, config_cls) and not overrides:
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"args is a {type(args).__name__}; {trainer_name} takes a {config_cls.__name__} (or a TRL/transformers "
            "config, which it converts), e.g. args=" + f"{config_cls.__name__}(output_dir=...)."
        )
    init_fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    if carry is not None:
        init_fields &= {f.name for f in dataclasses.fields(carry)}
    values = unmask_tokens({k: v for k, v in args.to_dict().items() if k in init_fields}, args)
    return config_cls(**{**values, **overrides})
