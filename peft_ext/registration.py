"""Register a third-party tuner type with PEFT.

PEFT's public ``register_peft_method`` fills PEFT's ``PEFT_TYPE_TO_*`` mappings, but only accepts
names that already exist in the ``PeftType`` enum, so a package outside PEFT first has to add its
member to that enum (:func:`peft_ext._compat.add_peft_type`). :func:`register_tuner` does both steps,
once, after checking that the private PEFT hooks the tuners rely on are still there
(:func:`peft_ext._compat.check_peft_hooks`).
"""

from __future__ import annotations

from peft.utils import PeftType
from peft.utils.peft_types import register_peft_method

from ._compat import add_peft_type, check_peft_hooks


def register_tuner(*, name: str, config_cls, model_cls, prefix: str) -> PeftType:
    """Make ``config_cls``/``model_cls`` a PEFT tuner type named ``name.upper()``.

    Safe to call more than once (re-imports, notebooks). After it runs,
    ``get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModel*`` resolve the
    type from its saved ``adapter_config.json`` like any built-in type.

    Example:
        ```py
        # peft_ext/mora/__init__.py
        register_tuner(name="mora", config_cls=MoraConfig, model_cls=MoraModel, prefix="mora_")
        ```
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    check_peft_hooks()
    peft_type = add_peft_type(name.upper())
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is config_cls:
        return peft_type
    if registered is not None:
        raise KeyError(
            f"PEFT type {peft_type.value} is already registered to {registered.__name__}; "
            f"cannot also register {config_cls.__name__}."
        )
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type
