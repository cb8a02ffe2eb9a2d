"""Register a third-party tuner type with PEFT.

PEFT's own ``register_peft_method`` only accepts names that already exist in the
``PeftType`` enum, so a package outside PEFT first has to add its member to that enum.
:func:`register_tuner` does both steps, once, and is the single place where this package
touches PEFT's registration internals. If those internals change incompatibly, it raises a
``RuntimeError`` that says what it expected instead of failing later in an obscure way.
"""

from __future__ import annotations

import enum

import peft
from peft.utils import PeftType
from peft.utils.peft_types import register_peft_method

from ._versions import requirement


def _extend_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum if it is missing."""
    if not (isinstance(PeftType, enum.EnumMeta) and issubclass(PeftType, str)):
        raise RuntimeError(
            f"peft {peft.__version__}: PeftType is no longer a str Enum, so peft_ext cannot add {name!r} to it. "
            f'Install a supported release: pip install "{requirement("peft")}"'
        )
    if name in PeftType.__members__:
        return PeftType[name]
    needed = ("_member_map_", "_value2member_map_", "_member_names_")
    missing = [attr for attr in needed if not hasattr(PeftType, attr)]
    if missing:
        raise RuntimeError(
            f"peft {peft.__version__}: the PeftType enum lacks {missing}, so peft_ext cannot register {name!r}. "
            f'Install a supported release: pip install "{requirement("peft")}"'
        )
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13
        PeftType._add_member_(name, member)
    else:
        # EnumType.__setattr__ refuses to rebind members, so bind the attribute first.
        type.__setattr__(PeftType, name, member)
        PeftType._member_map_[name] = member
        PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


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

    peft_type = _extend_peft_type(name.upper())
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
